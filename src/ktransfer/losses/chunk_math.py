"""The math of one chunk of rows on the Python path (CPU float64, CUDA, no C++ compiler): both log-normalisers, each
term of a divergence on its support (with the tail bucket and renormalisation), the NLL, and the gradient, in one
sweep while the chunk is hot in cache. ``ktransfer.losses.divergences`` runs it chunk by chunk (or the C++ kernel,
``ktransfer.losses.native``, instead); the formulas are derived in ``docs/divergences.md``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Term:
    """One summand of a divergence: ``weight * sum_{y in S} f_kind(p_y, q_y)``; support None = all of V."""

    kind: str
    support: str | None
    weight: float


@dataclass(frozen=True)
class SweepSpec:
    """Everything one sweep over a chunk of rows needs: the divergence's terms and the options that change a value
    (shared by ``divergence``, ``objectives.transfer_loss`` and the fused head)."""

    terms: tuple[Term, ...]
    top_k: int | None
    temperature: float
    beta: float
    alpha: float
    renormalize: bool
    label_smoothing: float = 0.0
    tail: bool = False  # one more outcome, "the rest of V", beside each top-k support (see ``divergence``)



def _kept(x: torch.Tensor) -> torch.Tensor:
    """Where a ``x log(...)`` term is kept: x > 0, or x is NaN (so that a NaN logit is never dropped as 0 log 0)."""
    return ~(x <= 0)


def _log_mix(loga: torch.Tensor, logb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b), exactly log a where a == b (so p == q gives a divergence of exactly 0, not a rounding
    residue of log(w) + log(1 / w))."""
    logm = torch.logaddexp(loga + math.log(w), logb + math.log1p(-w)) if 0 < w < 1 else (loga if w == 1 else logb)
    return torch.where(loga == logb, loga, logm)


def _value_and_w(kind: str, logp: torch.Tensor, logq: torch.Tensor, beta: float, alpha: float, p=None, q=None):
    """Elementwise term f(p, q) and w = p * df/dp for one kind; zero-weight terms give exactly 0 (no NaN from
    0 log 0), while a NaN (from a NaN logit) stays NaN."""
    p = logp.exp() if p is None else p
    q = logq.exp() if q is None else q
    zero = logp.new_zeros(())
    if kind == "forward_kl":
        f = torch.where(_kept(q), q * (logq - logp), zero)
        w = -q
    elif kind == "reverse_kl":
        f = torch.where(_kept(p), p * (logp - logq), zero)
        w = f + p
    elif kind == "jsd":
        logm = _log_mix(logq, logp, beta)
        fp = torch.where(_kept(p), p * (logp - logm), zero)
        f = beta * torch.where(_kept(q), q * (logq - logm), zero) + (1 - beta) * fp
        w = (1 - beta) * fp
    elif kind == "skew_forward_kl":
        logm = _log_mix(logq, logp, alpha)
        f = torch.where(_kept(q), q * (logq - logm), zero)
        w = -(1 - alpha) * torch.where(_kept(q), (logp + logq - logm).exp(), zero)
    elif kind == "skew_reverse_kl":
        logm = _log_mix(logp, logq, alpha)
        f = torch.where(_kept(p), p * (logp - logm), zero)
        w = f + p - alpha * torch.where(_kept(p), (2 * logp - logm).exp(), zero)
    elif kind == "tvd":
        d = p - q
        f = 0.5 * d.abs()
        w = 0.5 * p * d.sign()
    else:  # pragma: no cover - guarded by check_options
        raise ValueError(kind)
    return f, w


def _support_index(s: torch.Tensor, t: torch.Tensor, support: str, k: int):
    """Indices ``[c, k']`` of the support and a validity mask (False for duplicates of a union); no gradient."""
    if support == "learner":
        return s.topk(k, dim=-1, sorted=False).indices, None
    if support == "teacher":
        return t.topk(k, dim=-1, sorted=False).indices, None
    ip = s.topk(k, dim=-1, sorted=False).indices
    iq = t.topk(k, dim=-1, sorted=False).indices
    dup = (iq.unsqueeze(-1) == ip.unsqueeze(-2)).any(-1)  # (c, k): q's pick already among p's
    valid = torch.cat([torch.ones_like(dup), ~dup], dim=-1)
    return torch.cat([ip, iq], dim=-1), valid


def _rest_mass(x: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor, valid) -> torch.Tensor:
    """log of the mass of softmax(x) outside the support ``idx`` [c, k] (``valid`` masks a union's duplicates),
    summed over the rest (accurate when the support holds nearly all the mass): ``[c, 1]``, -inf when nothing is
    left."""
    keep = idx if valid is None else torch.where(valid, idx, idx[..., :1])
    rest = x.scatter(-1, keep, -math.inf)
    return torch.logsumexp(rest, dim=-1, keepdim=True) - lse


def _tail_term(kind, s, t, lse_s, lse_t, idx, valid, spec):
    """``(f(p_rest, q_rest), df/dp at p_rest, log p_rest)`` ``[c, 1]`` each, of the tail outcome of one top-k term."""
    logp_r, logq_r = _rest_mass(s, lse_s, idx, valid), _rest_mass(t, lse_t, idx, valid)
    f, w = _value_and_w(kind, logp_r, logq_r, spec.beta, spec.alpha)
    g = torch.where(torch.isneginf(logp_r), torch.zeros_like(w), w * (-logp_r).exp())  # w = p f'(p): f' = w / p
    return f, g, logp_r


def compute_dtype(z, u):
    """float64 when either input is float64, else float32 (bf16/fp16 inputs are computed in float32)."""
    return torch.float64 if torch.float64 in (z.dtype, getattr(u, "dtype", None)) else torch.float32


def _shift(x: torch.Tensor) -> torch.Tensor:
    """``x - max(x)`` per row (a row with no finite maximum is left as it is): softmax and every divergence are
    invariant to it, and the shifted row has its maximum at exactly 0, so ``log p = x - logsumexp(x)`` never
    subtracts two huge numbers (a logit of 1e8 in float32, or 1e300 in float64, costs no precision)."""
    m = x.amax(-1, keepdim=True)
    return x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _softmax_lse(x: torch.Tensor):
    """softmax(x) and logsumexp(x) ``[c, 1]`` over the last dim of a shifted ``x`` (``_shift``: max 0) with a single
    exp pass (rows of -inf give lse -inf)."""
    e = x.exp()
    Z = e.sum(-1, keepdim=True)
    return e.div_(Z), Z.log()


def _guard(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Zero-weight terms (0 * -inf, -inf - -inf) give NaN in the fast path: set x to 0 where its weight is 0, in
    place. A NaN from a NaN logit (whose weight is NaN, or nonzero) stays NaN."""
    return x.masked_fill_(weight == 0, 0.0)


def _accumulate(grad, x, weight):
    """grad + weight * x, reusing x's memory when grad is still empty (None)."""
    if grad is None:
        return x if weight == 1 else x.mul_(weight)
    return grad.add_(x, alpha=weight)


def _full_kl(kind, s, t, p, lse_s, q, lse_t, weight, values, grad, coef, need_grad):
    """Fast path of forward/reverse KL over all of V: few in-place passes over a cache-resident chunk.

    Returns the updated gradient accumulator (the part before ``- p * coef``); ``coef`` is updated in place.
    """
    if kind == "forward_kl":  # sum q (log q - log p); w = -q, sum w = -1  =>  grad_s = -q + p
        d = torch.sub(t, s)
        d.sub_(lse_t - lse_s).mul_(q)
        values += weight * _guard(d, q).sum(-1)
        if need_grad:
            grad = _accumulate(grad, q, -weight) if grad is not None else torch.mul(q, -weight)
            coef -= weight
        return grad
    # reverse: r = p (log p - log q); w = r + p, sum w = KL + 1  =>  grad_s = r + p - p (KL + 1) = r - p KL
    d = torch.sub(s, t)
    d.sub_(lse_s - lse_t).mul_(p)
    _guard(d, p)
    kl = d.sum(-1, keepdim=True)
    values += weight * kl.squeeze(-1)
    if need_grad:
        grad = _accumulate(grad, d, weight)
        coef += weight * kl
    return grad


def sweep_chunk(z, u, labels, spec: SweepSpec, div_coef, nll_coef, need_grad: bool):
    """Value, NLL and gradient of one chunk of rows.

    Args:
        z: learner logits ``[c, V]``; u: teacher logits ``[c, V]`` or None (NLL only); labels ``[c]`` or None.
        div_coef, nll_coef: ``[c, 1]`` factors of d(divergence)/dz and d(NLL)/dz in the returned gradient.
    Returns:
        values ``[c]`` (divergence per row, None without teacher), nll ``[c]`` or None, grad ``[c, V]`` or None,
        and a ``[c]`` bool tensor marking rows with no finite logit.
    """
    cdt = compute_dtype(z, u)
    T = spec.temperature
    z = z.to(cdt)
    s = _shift(z if T == 1 else z / T)  # max 0 per row: no cancellation of huge logits below
    p, lse_s = _softmax_lse(s)  # (c, V), (c, 1)
    bad = torch.isneginf(lse_s.squeeze(-1))
    grad = None
    values = None
    if u is not None:
        t = u.to(cdt)
        t = _shift(t if T == 1 else t / T)
        full_fast = all(term.support is None and term.kind in ("forward_kl", "reverse_kl") for term in spec.terms)
        needs_q = any(term.kind != "reverse_kl" or term.support is not None for term in spec.terms)
        if needs_q or not full_fast:
            q, lse_t = _softmax_lse(t)
        else:
            q, lse_t = None, torch.logsumexp(t, dim=-1, keepdim=True)
        bad = bad | torch.isneginf(lse_t.squeeze(-1))
        values = s.new_zeros(s.shape[0])
        coef = s.new_zeros(s.shape[0], 1)  # sum over terms of weight * sum_S w (non-renormalised terms)
        sparse = []  # (indices, weight * w) of top-k terms, added to the gradient at the end
        for term in spec.terms:
            if term.support is None and term.kind in ("forward_kl", "reverse_kl"):
                grad = _full_kl(term.kind, s, t, p, lse_s, q, lse_t, term.weight, values, grad, coef, need_grad)
                continue
            if term.support is None:
                logp, logq = s - lse_s, t - lse_t
                f, w = _value_and_w(term.kind, logp, logq, spec.beta, spec.alpha, p, q)
                values += term.weight * f.sum(-1)
                if need_grad:
                    coef += term.weight * w.sum(-1, keepdim=True)
                    grad = _accumulate(grad, w, term.weight)
                continue
            idx, valid = _support_index(s, t, term.support, spec.top_k)
            logp = s.gather(-1, idx) - lse_s
            logq = t.gather(-1, idx) - lse_t
            if spec.renormalize:
                if valid is not None:
                    logp = logp.masked_fill(~valid, -math.inf)
                    logq = logq.masked_fill(~valid, -math.inf)
                logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
                logq = logq - torch.logsumexp(logq, dim=-1, keepdim=True)
            f, w = _value_and_w(term.kind, logp, logq, spec.beta, spec.alpha)
            if valid is not None:  # duplicates of a union count once
                f, w = torch.where(valid, f, 0.0), torch.where(valid, w, 0.0)
            values += term.weight * f.sum(-1)
            if need_grad:
                w_sum = w.sum(-1, keepdim=True)
                if spec.renormalize:  # gradient lives on S only: w~ - p~ * sum_S w~
                    w = w - logp.exp().nan_to_num(0.0) * w_sum
                else:
                    coef += term.weight * w_sum
            if spec.tail:
                f_r, g_r, logp_r = _tail_term(term.kind, s, t, lse_s, lse_t, idx, valid, spec)
                values += term.weight * f_r.squeeze(-1)
                if need_grad:
                    # d f(p_rest)/dz_j = g_r * (p_j [j not in S] - p_rest p_j) = p_j g_r p(S) - [j in S] p_j g_r
                    p_set = -torch.expm1(logp_r)  # p(S) = 1 - p_rest, [c, 1]
                    coef -= term.weight * g_r * p_set
                    p_on = (logp.exp() if valid is None else torch.where(valid, logp.exp(), 0.0))
                    w = w - g_r * p_on
            if need_grad:
                sparse.append((idx, term.weight * w))
        if need_grad:
            k = div_coef / T  # (c, 1)
            if grad is None:  # top-k terms only: one pass for -p * coef, then k-sparse updates
                grad = torch.mul(p, coef.mul_(k).neg_())
            else:
                grad.addcmul_(p, coef, value=-1.0).mul_(k)
            for idx, w in sparse:
                grad.scatter_add_(-1, idx, w.mul_(k))
    nll = None
    if labels is not None:
        if T == 1:
            z, p1, lse_z = s, p, lse_s
        else:
            z = _shift(z)
            p1, lse_z = _softmax_lse(z) if need_grad else (None, torch.logsumexp(z, dim=-1, keepdim=True))
        logp_y = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse_z.squeeze(-1)
        nll = -logp_y
        eps = spec.label_smoothing
        if eps > 0:
            nll = (1 - eps) * nll + eps * (lse_z.squeeze(-1) - z.mean(-1))
        if need_grad:
            g = p1 * nll_coef
            if eps > 0:
                g.sub_(nll_coef * (eps / z.shape[-1]))
            g.scatter_add_(-1, labels.unsqueeze(-1), -(1 - eps) * nll_coef)
            grad = g if grad is None else grad.add_(g)
    return values, nll, grad, bad
