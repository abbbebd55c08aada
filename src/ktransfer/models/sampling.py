"""Seeded ancestral sampling for on-policy prefixes: one uniform per row and step, drawn by inverse CDF.

At step t row b takes the token

    y_t = min { i : F_i > u_bt * F_V },   F_i = sum_{j <= i} w_j  (vocabulary order),   u_bt ~ U[0, 1)

where ``w`` are the unnormalised probabilities of the learner's next-token distribution after temperature, top-k and
top-p (the order and the rules of ``transformers``' warpers: a token survives top-p when the mass of the tokens
ranked strictly above it is below ``top_p``), with the suppressed ids (``<pad>``, embedding padding) at probability
0. Tokens of probability 0 are never drawn (``F_i > F_{i-1}`` is needed to pass the threshold). One uniform and one
cumulative sum per row and step replace ``torch.multinomial``'s V exponential draws per row and step.

The uniforms ``u [B, n]`` come from a CPU ``torch.Generator`` seeded by the caller (``SampleSettings.seed``): the
same seed gives the same samples on CPU and GPU, on one process or several, and no global random stream moves.

Sample lengths: row b stops at its first ``</s>`` (kept) or after ``limits[b]`` tokens; ``row_limits`` bounds them by
the reference: ``min(cap, ceil(scale * n_b) + margin)`` with ``n_b`` the row's reference tokens (``None`` scale: the
cap alone), so that a learner that does not stop yet pays for about twice the reference, not for the cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

IGNORE_INDEX = -100


def inverse_cdf(logits: torch.Tensor, u: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (suppressed ids at -inf) for the uniforms ``u [B]`` in [0, 1): the
    module docstring's rule. Returns int64 ``[B]``."""
    x = logits.float() / temperature
    V = x.shape[-1]
    w = torch.softmax(x, dim=-1).double()  # float64 sums: a token of probability 1e-9 keeps its share
    if 0 < top_k < V or top_p < 1.0:  # truncation ranks the tokens; the CDF stays in vocabulary order
        ranked, order = w.topk(top_k, dim=-1) if 0 < top_k < V else w.sort(dim=-1, descending=True)
        if top_p < 1.0:
            cum = ranked.cumsum(dim=-1)
            ranked = ranked.masked_fill(cum - ranked >= top_p * cum[:, -1:], 0.0)  # mass ranked strictly above
        w = torch.zeros_like(w).scatter_(-1, order, ranked)
    cdf = w.cumsum(dim=-1)
    total = cdf[:, -1:]
    # strictly below F_V (u * F_V rounds to F_V once in 2^53 draws), so the first F_i above it has w_i > 0
    target = torch.minimum(u.to(cdf.dtype).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def row_limits(labels: torch.Tensor, cap: int, scale: float | None, margin: int) -> torch.Tensor:
    """Most tokens sampled per row, int64 ``[B]``: ``min(cap, ceil(scale * n_b) + margin)``, ``n_b`` the scored
    tokens of row b of ``labels`` (the reference); ``cap`` for every row when ``scale`` is None."""
    B = labels.shape[0]
    if scale is None:
        return torch.full((B,), int(cap), dtype=torch.long)
    n = (labels != IGNORE_INDEX).sum(dim=1).cpu().tolist()
    return torch.tensor([min(int(cap), math.ceil(scale * k) + int(margin)) for k in n], dtype=torch.long)


def describe(cap: int, scale: float | None, margin: int) -> str:
    """The length rule in words, for the run log."""
    if scale is None:
        return f"at most {cap} tokens per sample (objective.sample_max_length)"
    return (f"at most min({cap}, ceil({scale:g} x the reference's tokens) + {margin}) tokens per sample "
            "(objective.sample_length_scale, sample_length_margin, sample_max_length)")


@torch.no_grad()
def ancestral(next_logits: Callable[[torch.Tensor | None], torch.Tensor], limits: torch.Tensor, *,
              eos_id: int | Sequence[int], fill_id: int, seed: int, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, suppressed: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample until every row has its ``</s>`` or its limit.

    Args:
        next_logits: ``next_logits(None)`` gives the first step's logits ``[B, V]``, ``next_logits(tokens [B])``
            those after feeding the tokens just drawn (the family's model with its KV cache).
        limits: int64 ``[B]``, most tokens per row (>= 1).
        eos_id: ends a row (kept): an id, or several (a chat model's end-of-turn token beside ``</s>``);
            fill_id: fed for a row that has ended.
        seed: seeds the CPU generator of the uniforms ``[B, max(limits)]``.

    Returns:
        ``(tokens [B, n], lengths [B])``: row b's sample is ``tokens[b, :lengths[b]]`` (``fill_id`` after it).
    """
    B, n_max = limits.shape[0], int(limits.max())
    u = torch.rand((B, n_max), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    logits = next_logits(None)
    device = logits.device
    u, limits = u.to(device), limits.to(device)
    suppressed = torch.tensor(list(suppressed), dtype=torch.long, device=device)
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long,
                         device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    out = []
    for t in range(n_max):
        if t:
            logits = next_logits(out[-1])
        if suppressed.numel():
            logits = logits.index_fill(-1, suppressed, float("-inf"))
        token = inverse_cdf(logits, u[:, t], temperature=temperature, top_k=top_k, top_p=top_p)
        token = token.masked_fill(done, fill_id)
        out.append(token)
        lengths += (~done).long()
        done = done | torch.isin(token, stops) | (lengths >= limits)
        if bool(done.all()):
            break
    return torch.stack(out, dim=1), lengths
