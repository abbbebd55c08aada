"""An independent reference for ``ktransfer.models.sampling``: the next-token distribution in float64 with plain
Python rules (temperature, then top-k, then top-p as ``transformers``' warpers), and a sampler that recomputes the
whole forward pass at every step (no KV cache) and draws with the same uniforms by a Python loop over the CDF."""

from __future__ import annotations

import math

import torch


def distribution(logits, temperature=1.0, top_k=0, top_p=1.0, suppressed=()) -> list[float]:
    """Probabilities of one row of logits (a list or a 1-D tensor), float64, suppressed ids at 0."""
    x = [float(v) / temperature for v in logits]
    for i in suppressed:
        x[i] = -math.inf
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order[:top_k] if top_k else order)
    m = max(x)
    w = {i: math.exp(x[i] - m) for i in keep}
    total = sum(w.values())
    if top_p < 1.0:
        above, kept = 0.0, set()
        for i in order:
            if i in keep and above / total < top_p:
                kept.add(i)
            above += w.get(i, 0.0)
        w = {i: w[i] for i in kept}
        total = sum(w.values())
    return [w.get(i, 0.0) / total for i in range(len(x))]


def draw(probs: list[float], u: float) -> int:
    """The first token whose cumulative probability exceeds u (tokens of probability 0 skipped)."""
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if p > 0 and acc > u:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)


def naive_sample(last_logits, B: int, limits: list[int], *, eos_id: int, seed: int, temperature=1.0, top_k=0,
                 top_p=1.0, suppressed=()) -> list[list[int]]:
    """Samples with ``last_logits(prefixes)`` = the logits [B, V] after each row's prefix (a full forward pass, no
    cache); the uniforms are those ``sampling.ancestral`` draws for ``seed``."""
    u = torch.rand((B, max(limits)), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    rows: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(max(limits)):
        if all(done):
            break
        logits = last_logits(rows)
        for b in range(B):
            if done[b]:
                continue
            p = distribution(logits[b].double().tolist(), temperature, top_k, top_p, suppressed)
            rows[b].append(draw(p, u[b][t]))
            done[b] = rows[b][-1] == eos_id or len(rows[b]) >= limits[b]
    return rows
