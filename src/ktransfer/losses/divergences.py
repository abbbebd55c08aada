"""Divergences between a learner p and a frozen teacher q, computed from logits in chunks with exact gradients.

Notation (per position): z = learner logits, u = teacher logits, both ``[..., V]``; T = temperature;
p = softmax(z / T), q = softmax(u / T); S = the support (all of V unless ``top_k`` is given).

Every kind is a sum over y in S of a term f(p_y, q_y):

=================  ===============================================  =====================  ================
kind               value                                            default top-k support  also known as
=================  ===============================================  =====================  ================
forward_kl         sum_S q (log q - log p) = KL(q || p)             teacher (q tells)      KD, "Forward"
reverse_kl         sum_S p (log p - log q) = KL(p || q)             learner (p proposes)   KA, "Backward"
half               1/2 forward_kl + 1/2 reverse_kl (own supports)   each its own           paper's "1/2KA+1/2KD"
jsd                b KL(q || m) + (1-b) KL(p || m), m = b q+(1-b) p  union                  TRL generalized JSD
                   b = 0: forward_kl, b = 1: reverse_kl (TRL's ends)
skew_forward_kl    KL(q || a q + (1-a) p)                            teacher                DistiLLM SKL
skew_reverse_kl    KL(p || a p + (1-a) q)                            learner                DistiLLM SRKL
tvd                1/2 sum_S |p - q|                                 union                  total variation
=================  ===============================================  =====================  ================

Gradient. Write s = z / T and w_y = p_y * df/dp_y (y in S). For a support without renormalisation

    dD/ds = w * 1_S - p * sum_S w          and      dD/dz = dD/ds / T,

which is what the chunked sweep writes (see ``docs/divergences.md`` for w of every kind). With
``renormalize=True``, p and q are first renormalised over S (p~ = p / p(S)), and dD/ds = (w~ - p~ sum_S w~) on S,
0 off S.

Speed. On a CPU, float32/bfloat16/float16 logits go through ktransfer's compiled kernel (``ktransfer.losses.native``:
both log-normalisers, the terms, the NLL and the gradient in four passes over a cached row, top-k selection included),
built on first use; float64, CUDA tensors, or a machine without a C++ compiler take the Python path below, which is also
the kernel's reference in the tests.

Memory. Rows are processed ``chunk_size`` at a time: both log-normalisers, the value and the gradient of a chunk are
computed in one sweep while the chunk is hot in cache, and only the gradient ``[N, V]`` (needed anyway) is kept for the
backward pass. Extra memory is O(chunk_size x V) and does not grow with the number of positions.
"""

from __future__ import annotations

import logging
import math

import torch

from ktransfer.losses import chunking, native
from ktransfer.losses.chunk_math import SweepSpec, Term, compute_dtype, sweep_chunk

KINDS = ("forward_kl", "reverse_kl", "half", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
SUPPORTS = ("learner", "teacher", "union")
REDUCTIONS = ("mean", "sum", "none")
DEFAULT_SUPPORT = {
    "forward_kl": "teacher",
    "skew_forward_kl": "teacher",
    "reverse_kl": "learner",
    "skew_reverse_kl": "learner",
    "jsd": "union",
    "tvd": "union",
}
# jsd's end points, as TRL's generalized_jsd_loss defines them (beta is the teacher's weight in m): beta = 0 is
# KL(q || p), beta = 1 is KL(p || q). They are not limits of the mixture formula, which tends to 0 at both ends.
JSD_END_POINTS = {0.0: "forward_kl", 1.0: "reverse_kl"}

_log = logging.getLogger(__name__)
# Opt-in torch.compile of the per-chunk math (see ``use_compile``); never used unless switched on.
_COMPILE = {"enabled": False, "fn": None, "failed": False}


def check_options(kind, shape_l, shape_t, top_k, support, temperature, beta, alpha, reduction, chunk_size,
                  tail=False, renormalize=False):
    """Raise ``ValueError`` naming the first option of ``divergence`` that is out of range or inconsistent."""
    if tail and top_k is None:
        raise ValueError("tail=True needs a top_k support: the rest of the vocabulary is what lies outside it")
    if tail and renormalize:
        raise ValueError("tail=True and renormalize=True exclude each other: renormalising drops the rest of the "
                         "vocabulary, the tail keeps it as one outcome")
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if len(shape_l) == 0:
        raise ValueError("logits must have a vocabulary dimension: got a 0-dimensional tensor")
    if shape_l != shape_t:
        if shape_l[:-1] == shape_t[:-1]:
            raise ValueError(
                f"vocabulary sizes differ: learner V={shape_l[-1]}, teacher V={shape_t[-1]} "
                f"(learner_logits {list(shape_l)}, teacher_logits {list(shape_t)}); "
                "the two models must share a vocabulary; if one is padded (e.g. 151936 vs 152064 rows), pass "
                "vocab_size=<the tokenizer's size> to compare the shared ids [0, vocab_size) only"
            )
        raise ValueError(
            f"learner_logits and teacher_logits must have the same shape, got learner {list(shape_l)} "
            f"and teacher {list(shape_t)}"
        )
    vocab = shape_l[-1]
    if vocab < 1:
        raise ValueError(f"the vocabulary dimension is empty (logits shape {list(shape_l)})")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or an integer in [1, V={vocab}], got {top_k!r}")
    if support is not None and support not in SUPPORTS:
        raise ValueError(
            f"unknown support {support!r}; valid supports: {', '.join(SUPPORTS)} (or None for the default)"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(beta, (int, float)) and 0 <= beta <= 1):
        raise ValueError(f"beta must be in [0, 1] (0: forward_kl, 1: reverse_kl, as TRL), got {beta!r}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha must be in the open interval (0, 1), got {alpha!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: {', '.join(REDUCTIONS)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")


def check_vocab_size(vocab_size: int | None, **sizes: int | None) -> None:
    """Raise ValueError unless ``vocab_size`` is None or an integer in [1, every given size] (None sizes skipped)."""
    if vocab_size is None:
        return
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be None or a positive integer, got {vocab_size!r}")
    for name, size in sizes.items():
        if size is not None and size < vocab_size:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {name}'s {size} vocabulary rows")


def slice_vocab(learner_logits: torch.Tensor, teacher_logits: torch.Tensor | None, vocab_size: int | None):
    """``(z[..., :vocab_size], u[..., :vocab_size])``: the ids two padded vocabularies share (views; None stays None).

    Models whose output layers are padded to different sizes (Qwen-style 151936 vs 152064 rows) share the tokenizer's
    ids ``[0, vocab_size)``; the rows above are padding. Softmaxes are then taken over the shared ids only, and the
    padding columns get a zero gradient. ``vocab_size=None`` returns both unchanged.

    Raises:
        ValueError: vocab_size is not a positive integer or exceeds either tensor's last dimension.
    """
    check_vocab_size(vocab_size, learner_logits=learner_logits.shape[-1],
                     teacher_logits=None if teacher_logits is None else teacher_logits.shape[-1])
    if vocab_size is None:
        return learner_logits, teacher_logits

    def cut(x):
        return x if x is None or x.shape[-1] == vocab_size else x[..., :vocab_size]

    return cut(learner_logits), cut(teacher_logits)


def terms_of(kind: str, top_k: int | None, support: str | None, beta: float = 0.5) -> tuple[Term, ...]:
    """The summands of divergence ``kind`` (``half`` has two; jsd at beta 0 or 1 is a KL), each with its support."""
    def one(k, weight, default_of=None):
        return Term(k, None if top_k is None else (support or DEFAULT_SUPPORT[default_of or k]), weight)

    if kind == "jsd" and beta in JSD_END_POINTS:  # TRL's end points; the top-k support stays jsd's (union)
        return (one(JSD_END_POINTS[beta], 1.0, default_of="jsd"),)
    if kind == "half":
        return (one("forward_kl", 0.5), one("reverse_kl", 0.5))
    return (one(kind, 1.0),)


def use_compile(enabled: bool = True) -> None:
    """Switch on (or off) ``torch.compile`` of the per-chunk math of ``divergence`` (off by default).

    When on, each chunk's value and gradient (``sweep_chunk``: both softmaxes, the elementwise terms, the row sums and
    the gradient ``[c, V]``) run as one Inductor graph (``fullgraph=True, dynamic=True``) that fuses the ~10-30
    elementwise passes of the eager path into a few vectorised loops. Same formulas, same chunking, same autograd
    Function; values and gradients agree with the eager path to float32 rounding (Inductor sums a row in a different
    order: measured max relative gradient differences up to ~5e-5 of the largest entry in float32, see
    ``docs/divergences.md``). The first call per (kind, support, dtype, ...) compiles, seconds of CPU each; to make room
    for one graph per configuration this raises ``torch._dynamo.config.recompile_limit`` to at least 64. If compiling or
    running the compiled graph fails (no C++ compiler, unsupported build), a warning is logged once and the eager path
    is used from then on. Where the C++ kernel applies (``ktransfer.losses.native``: CPU, float32/bf16/fp16) it runs
    instead of either, being faster (docs/benchmarks.md); compiling then matters for CUDA tensors, float64, and machines
    where the kernel cannot be built. ``fused_linear_divergence`` takes the same route per chunk.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"use_compile(enabled) takes True or False, got {enabled!r}")
    _COMPILE["enabled"] = enabled
    if enabled and _COMPILE["fn"] is None and not _COMPILE["failed"]:
        try:
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
            _COMPILE["fn"] = torch.compile(sweep_chunk, fullgraph=True, dynamic=True)
        except Exception as exc:  # torch.compile unavailable in this build
            _COMPILE["failed"] = True
            _log.warning("ktransfer.losses.divergences.use_compile: torch.compile unavailable (%s); "
                         "using the eager path", exc)


_SUPPORT_CODES = {None: -1, "learner": 0, "teacher": 1, "union": 2}


def _native_module(z, u):
    """The compiled CPU kernel if it applies to these logits (CPU; float32, bf16 or fp16; one dtype), else None."""
    if z.device.type != "cpu" or z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if u is not None and u.dtype != z.dtype:
        return None
    return native.kernel()


def _native_sweep(mod, z, u, labels, rows, spec, div_scale, nll_scale, grad):
    """One kernel call over the rows ``rows`` (None = all) of ``z``/``u`` ``[N, V]``; the gradient goes into ``grad``.

    ``div_scale``/``nll_scale`` ``[N]`` scale each row's divergence / NLL gradient (None without gradient). Returns
    values ``[N]`` (None without teacher), nll ``[N]`` (None without labels) and ``[N]`` bool marking processed rows
    with no finite logit.
    """
    need_grad = grad is not None
    values, nll, lse_s, lse_t = mod.sweep(
        z.contiguous(), None if u is None else u.contiguous(), None if labels is None else labels.contiguous(),
        rows, [native.KIND_CODES[t.kind] for t in spec.terms], [t.weight for t in spec.terms],
        [_SUPPORT_CODES[t.support] for t in spec.terms], spec.top_k or 0, spec.renormalize, spec.tail,
        spec.temperature, spec.beta, spec.alpha, spec.label_smoothing,
        div_scale.to(torch.float32).contiguous() if (need_grad and u is not None) else None,
        nll_scale.to(torch.float32).contiguous() if (need_grad and labels is not None) else None, grad)
    bad = torch.isneginf(lse_s) | (torch.isneginf(lse_t) if u is not None else False)
    if rows is not None:
        bad = bad.index_select(0, rows)
    return (values if u is not None else None), (nll if labels is not None else None), bad


def run_chunk(z, u, labels, spec, div_coef, nll_coef, need_grad):
    """``sweep_chunk`` through the compiled CPU kernel where it applies, else the compiled graph when
    ``use_compile(True)`` is on, else eagerly. The gradient comes back in the compute dtype."""
    mod = _native_module(z, u)
    if mod is not None:
        grad = torch.empty(z.shape, dtype=torch.float32) if need_grad else None
        dc = div_coef.squeeze(-1) if div_coef is not None else None
        nc = nll_coef.squeeze(-1) if nll_coef is not None else None
        values, nll, bad = _native_sweep(mod, z, u, labels, None, spec, dc, nc, grad)
        return values, nll, grad, bad
    fn = _COMPILE["fn"]
    if _COMPILE["enabled"] and fn is not None and not _COMPILE["failed"]:
        try:
            return fn(z, u, labels, spec, div_coef, nll_coef, need_grad)
        except Exception as exc:  # compile/run failure: fall back for good, say so once
            _COMPILE["failed"] = True
            _log.warning("ktransfer.losses.divergences.use_compile: compiled chunk failed (%s: %s); "
                         "using the eager path",
                         type(exc).__name__, exc)
    return sweep_chunk(z, u, labels, spec, div_coef, nll_coef, need_grad)


def _sweep(z2, u2, labels, rows, spec, div_scale, nll_scale, need_grad, chunk_size):
    """Run ``sweep_chunk`` over selected rows of ``z2``/``u2`` ``[N, V]``.

    Returns per-row divergence ``[N]`` and NLL ``[N]`` (0 at unselected rows) and the gradient ``[N, V]`` in z2's dtype,
    with each row's divergence gradient scaled by ``div_scale`` and its NLL gradient by ``nll_scale`` (``[N]`` each).
    """
    N, V = z2.shape
    mod = _native_module(z2, u2)
    if mod is not None:  # one kernel call over all rows: its memory is O(threads x V), no chunks needed
        grad = None
        if need_grad:
            grad = torch.empty(z2.shape, dtype=z2.dtype) if rows is None else torch.zeros(z2.shape, dtype=z2.dtype)
        values, nll, bad = _native_sweep(mod, z2, u2, labels, rows, spec, div_scale, nll_scale, grad)
        _raise_on_bad_rows(bad, rows, spec.temperature)
        return values, nll, grad
    cdt = compute_dtype(z2, u2)
    n_sel = N if rows is None else rows.numel()
    chunk = chunk_size or chunking.default_chunk_rows(z2.device, V)
    values = z2.new_zeros(N, dtype=cdt) if u2 is not None else None
    nll = z2.new_zeros(N, dtype=cdt) if labels is not None else None
    grad = None
    if need_grad:
        grad = torch.empty_like(z2) if rows is None else torch.zeros_like(z2)
    bad_rows = []
    for start in range(0, n_sel, chunk):
        if rows is None:
            sel = slice(start, min(start + chunk, n_sel))
            zc = z2[sel]
            uc = u2[sel] if u2 is not None else None
        else:
            sel = rows[start : start + chunk]
            zc = z2.index_select(0, sel)
            uc = u2.index_select(0, sel) if u2 is not None else None
        lc = labels[sel] if labels is not None else None
        dc = div_scale[sel].to(cdt).unsqueeze(-1) if need_grad else None
        nc = nll_scale[sel].to(cdt).unsqueeze(-1) if (need_grad and labels is not None) else None
        v, n, g, bad = run_chunk(zc, uc, lc, spec, dc, nc, need_grad)
        if v is not None:
            values[sel] = v
        if n is not None:
            nll[sel] = n
        if g is not None:
            grad[sel] = g.to(grad.dtype)
        bad_rows.append(bad)
    if bad_rows:
        _raise_on_bad_rows(torch.cat(bad_rows), rows, spec.temperature)
    return values, nll, grad


def _raise_on_bad_rows(bad, rows, temperature: float = 1.0):
    """ValueError naming the first processed row (``bad`` ``[n_sel]`` bool) whose logits are all -inf."""
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        row = first if rows is None else int(rows[first])
        hint = (f" (or the logits divided by temperature {temperature:g} overflow: use a larger temperature)"
                if temperature < 1 else "")
        raise ValueError(
            f"position {row} (flattened) has no finite logit in the learner or the teacher: "
            f"every logit is -inf, so softmax is undefined there; mask that position out{hint}"
        )


class FusedSweep(torch.autograd.Function):
    """Value in forward, gradient computed in the same sweep; backward only scales it by grad_output."""

    @staticmethod
    def forward(ctx, z2, u2, labels, rows, spec, div_scale, nll_scale, out_mode, chunk_size):
        need_grad = ctx.needs_input_grad[0]
        values, nll, grad = _sweep(z2, u2, labels, rows, spec, div_scale, nll_scale, need_grad, chunk_size)
        ctx.out_mode = out_mode
        if need_grad:
            ctx.save_for_backward(grad)
        if out_mode == "rows":  # per-row divergence; gradient rows scaled by grad_output in backward
            return values, values.new_zeros(()), values.new_zeros(())
        div_total = (values * div_scale.to(values.dtype)).sum() if values is not None else None
        nll_total = (nll * nll_scale.to(nll.dtype)).sum() if nll is not None else None
        loss = sum(x for x in (div_total, nll_total) if x is not None)
        extra_div = values.sum() if values is not None else loss.new_zeros(())
        extra_nll = nll.sum() if nll is not None else loss.new_zeros(())
        ctx.mark_non_differentiable(extra_div, extra_nll)
        return loss, extra_div, extra_nll

    @staticmethod
    def backward(ctx, grad_out, _g1, _g2):
        (grad,) = ctx.saved_tensors
        if ctx.out_mode == "rows":
            grad = grad * grad_out.to(grad.dtype).unsqueeze(-1)
        elif not bool(grad_out == 1):
            grad = grad * grad_out.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None


def _flatten(learner_logits, teacher_logits, mask):
    V = learner_logits.shape[-1]
    z2 = learner_logits.reshape(-1, V)
    u2 = teacher_logits.detach().reshape(-1, V) if teacher_logits is not None else None
    rows = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(learner_logits.shape[:-1]):
            raise ValueError(
                f"mask shape {list(mask.shape)} must equal the logits shape without the vocabulary dimension, "
                f"{list(learner_logits.shape[:-1])} (logits {list(learner_logits.shape)})"
            )
        flat = mask.reshape(-1).to(z2.device)
        if not bool(flat.all()):
            rows = flat.nonzero().squeeze(-1)
    return z2, u2, rows


def divergence(
    learner_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    top_k: int | None = None,
    support: str | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    renormalize: bool = False,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    tail: bool = False,
) -> torch.Tensor:
    """Divergence D(p, q) between learner p = softmax(z/T) and teacher q = softmax(u/T), per position, reduced.

    Args:
        learner_logits: z ``[..., V]``, any float dtype (bf16/fp16 are computed in float32); receives the gradient.
        teacher_logits: u ``[..., V]``, same shape; treated as a constant (never receives a gradient).
        kind: one of ``KINDS`` (see the module docstring for each formula).
        top_k: keep only k tokens per position (the support S); None = all V tokens.
        support: which top-k: ``"learner"`` (top-k of p), ``"teacher"`` (top-k of q) or ``"union"``; None = the kind's
            default (learner for reverse KLs, teacher for forward KLs, union for jsd/tvd; ``half`` keeps each term's
            own default unless ``support`` is given, which then applies to both). Selecting S is not differentiated.
        temperature: T > 0 divides both logits. No T^2 factor is applied: multiply the result by ``T**2`` for
            Hinton et al.'s gradient scaling.
        beta: mixture weight of ``jsd``, m = beta q + (1 - beta) p, 0 <= beta <= 1 (TRL's convention, end points
            included: beta = 0 is ``forward_kl`` KL(q || p), beta = 1 is ``reverse_kl`` KL(p || q)).
        alpha: skew of ``skew_forward_kl`` / ``skew_reverse_kl``, 0 < alpha < 1 (DistiLLM's convention).
        renormalize: renormalise p and q over S before the sum (default False: terms outside S are just dropped, the
            paper's Sec. 3.3 formula).
        tail: with a top-k support, add one outcome "the rest of V" with p_rest = 1 - p(S), q_rest = 1 - q(S): the
            divergence of the (k + 1)-outcome coarsenings of p and q, a proper divergence (>= 0, zero iff p and q
            agree on S and on the rest mass), unlike the paper's formula. p_rest and q_rest are summed over the rest,
            not taken as 1 - p(S), on both paths (the C++ kernel and the Python one).
        mask: bool ``[...]``; positions where it is False are ignored (value 0, gradient 0).
        reduction: ``"mean"`` (sum over selected positions / their count; 0 when none), ``"sum"``, or ``"none"``
            (a float tensor of shape ``[...]``, 0 at unselected positions).
        chunk_size: positions per chunk of the Python path (memory O(chunk_size x V)); None picks about 2**17 / V on
            a CPU and, on a GPU, 2**20-2**26 elements / V scaled to the free memory (``ktransfer.losses.chunking``).
            The C++ kernel works row by row (O(threads x V)) and ignores it.
        vocab_size: compare only the ids ``[0, vocab_size)`` (``slice_vocab``): for models with padded output layers
            of different sizes. None: both logits must have the same V.

    Returns:
        A float32 scalar (float64 for float64 inputs), or ``[...]`` for ``reduction="none"``.

    Raises:
        ValueError: unknown kind/support/reduction, shape or vocabulary mismatch, bad top_k/beta/alpha/temperature,
            bad mask, or a selected position whose logits are all -inf.
    """
    if not isinstance(learner_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise ValueError("learner_logits and teacher_logits must be tensors")
    learner_logits, teacher_logits = slice_vocab(learner_logits, teacher_logits, vocab_size)
    check_options(kind, tuple(learner_logits.shape), tuple(teacher_logits.shape), top_k, support, temperature, beta,
                  alpha, reduction, chunk_size, tail, renormalize)
    spec = SweepSpec(terms_of(kind, top_k, support, beta), top_k, float(temperature), float(beta), float(alpha),
                     bool(renormalize), tail=bool(tail))
    z2, u2, rows = _flatten(learner_logits, teacher_logits, mask)
    N = z2.shape[0]
    n_sel = N if rows is None else rows.numel()
    if reduction == "none":
        scale = z2.new_ones(N, dtype=torch.float32)
        values, _, _ = FusedSweep.apply(z2, u2, None, rows, spec, scale, None, "rows", chunk_size)
        return values.reshape(learner_logits.shape[:-1])
    per_row = 1.0 / n_sel if (reduction == "mean" and n_sel > 0) else 1.0
    scale = torch.full((N,), per_row, dtype=torch.float64, device=z2.device)
    loss, _, _ = FusedSweep.apply(z2, u2, None, rows, spec, scale, None, "total", chunk_size)
    return loss
