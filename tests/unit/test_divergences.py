"""ktransfer.divergence against an independent float64 NumPy reference, finite differences and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktransfer import KINDS, divergence

DEFAULT_SUPPORT = {"forward_kl": "teacher", "skew_forward_kl": "teacher", "reverse_kl": "learner",
                   "skew_reverse_kl": "learner", "jsd": "union", "tvd": "union"}


# ----------------------------------------------------------------------------------------------------------------------
# Reference: plain NumPy float64, one position at a time, written from the definitions.


def _log_softmax(x):
    """log softmax in log space, so that tiny probabilities keep exact logs (logits of 1e4 underflow exp)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x[np.isfinite(x)]) if np.isfinite(x).any() else 0.0
    return x - m - np.log(np.exp(x - m).sum())


def _kl(a, b, loga=None, logb=None):
    """sum a log(a / b) with 0 log 0 = 0; logs given where they are more exact than log(a)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        loga = np.log(a) if loga is None else loga
        logb = np.log(b) if logb is None else logb
        terms = np.where(a > 0, a * (loga - logb), 0.0)
    return terms.sum()


def ref_support(p, q, support, k):
    if k is None:
        return np.arange(len(p))
    # top-k by logits = top-k by probabilities; stable order is irrelevant for the sum
    top_p = set(np.argsort(-p, kind="stable")[:k].tolist())
    top_q = set(np.argsort(-q, kind="stable")[:k].tolist())
    chosen = {"learner": top_p, "teacher": top_q, "union": top_p | top_q}[support]
    return np.array(sorted(chosen))


def ref_row(z, u, kind, top_k=None, support=None, T=1.0, beta=0.5, alpha=0.1, renormalize=False):
    if kind == "half":
        return 0.5 * ref_row(z, u, "forward_kl", top_k, support, T, beta, alpha, renormalize) + 0.5 * ref_row(
            z, u, "reverse_kl", top_k, support, T, beta, alpha, renormalize
        )
    logp, logq = _log_softmax(np.asarray(z) / T), _log_softmax(np.asarray(u) / T)
    p, q = np.exp(logp), np.exp(logq)
    S = ref_support(p, q, support or DEFAULT_SUPPORT[kind], top_k)
    pS, qS, logpS, logqS = p[S], q[S], logp[S], logq[S]
    if renormalize:
        logpS, logqS = _log_softmax(logpS), _log_softmax(logqS)
        pS, qS = np.exp(logpS), np.exp(logqS)
    return ref_terms(kind, pS, qS, logpS, logqS, beta, alpha)


def ref_terms(kind, pS, qS, logpS=None, logqS=None, beta=0.5, alpha=0.1):
    """sum over the outcomes given of kind's f(p, q) (any outcomes: a support, or a coarsening with a tail)."""
    if kind == "half":
        return 0.5 * ref_terms("forward_kl", pS, qS, logpS, logqS) + 0.5 * ref_terms("reverse_kl", pS, qS, logpS,
                                                                                    logqS)
    if kind == "forward_kl":
        return _kl(qS, pS, logqS, logpS)
    if kind == "reverse_kl":
        return _kl(pS, qS, logpS, logqS)
    if kind == "jsd":
        m = beta * qS + (1 - beta) * pS
        return beta * _kl(qS, m) + (1 - beta) * _kl(pS, m)
    if kind == "skew_forward_kl":
        return _kl(qS, alpha * qS + (1 - alpha) * pS)
    if kind == "skew_reverse_kl":
        return _kl(pS, alpha * pS + (1 - alpha) * qS)
    if kind == "tvd":
        return 0.5 * np.abs(pS - qS).sum()
    raise AssertionError(kind)


def ref(z, u, kind, reduction="mean", mask=None, **kw):
    z = np.asarray(z, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    lead = z.shape[:-1]
    zf, uf = z.reshape(-1, z.shape[-1]), u.reshape(-1, u.shape[-1])
    mf = np.ones(len(zf), bool) if mask is None else np.asarray(mask).reshape(-1)
    vals = np.array([ref_row(a, b, kind, **kw) if m else 0.0 for a, b, m in zip(zf, uf, mf, strict=True)])
    if reduction == "none":
        return vals.reshape(lead)
    if reduction == "sum":
        return vals.sum()
    return vals.sum() / mf.sum() if mf.sum() else 0.0


def _logits(*shape, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


# kind x support configurations: (top_k, support); support None = the kind's default
CONFIGS = [(None, None), (3, None), (3, "learner"), (3, "teacher"), (3, "union")]


# ----------------------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k,support", CONFIGS)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("T", [1.0, 0.7, 2.5])
def test_value_matches_numpy_reference(kind, top_k, support, renormalize, T):
    z, u = _logits(2, 3, 9, seed=1), _logits(2, 3, 9, seed=2)
    got = divergence(z, u, kind, top_k=top_k, support=support, temperature=T, renormalize=renormalize,
                     reduction="none")
    want = ref(z.numpy(), u.numpy(), kind, reduction="none", top_k=top_k, support=support, T=T,
               renormalize=renormalize)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("coef", [0.05, 0.3, 0.9])
def test_beta_alpha_match_reference(kind, coef):
    z, u = _logits(4, 7, seed=3), _logits(4, 7, seed=4)
    got = divergence(z, u, kind, beta=coef, alpha=coef, reduction="none")
    want = ref(z.numpy(), u.numpy(), kind, reduction="none", beta=coef, alpha=coef)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_reductions_and_mask(kind):
    z, u = _logits(3, 4, 6, seed=5), _logits(3, 4, 6, seed=6)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    for reduction in ("mean", "sum", "none"):
        got = divergence(z, u, kind, mask=mask, reduction=reduction, top_k=2)
        want = ref(z.numpy(), u.numpy(), kind, reduction=reduction, mask=mask.numpy(), top_k=2)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    none = divergence(z, u, kind, reduction="none")
    assert none.shape == (3, 4)
    torch.testing.assert_close(divergence(z, u, kind, reduction="sum"), none.sum())
    torch.testing.assert_close(divergence(z, u, kind, reduction="mean"), none.mean())


def test_closed_forms():
    # identical distributions: every divergence is 0
    z = _logits(5, 11, seed=7)
    for kind in KINDS:
        assert abs(float(divergence(z, z.clone(), kind))) < 1e-12
    # two-token closed form: KL(Bern(a) || Bern(b))
    a, b = 0.3, 0.8
    z = torch.tensor([[math.log(a), math.log(1 - a)]], dtype=torch.float64)
    u = torch.tensor([[math.log(b), math.log(1 - b)]], dtype=torch.float64)
    kl_ab = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    kl_ba = b * math.log(b / a) + (1 - b) * math.log((1 - b) / (1 - a))
    assert float(divergence(z, u, "reverse_kl")) == pytest.approx(kl_ab, rel=1e-12)
    assert float(divergence(z, u, "forward_kl")) == pytest.approx(kl_ba, rel=1e-12)
    assert float(divergence(z, u, "tvd")) == pytest.approx(abs(a - b), rel=1e-12)
    assert float(divergence(z, u, "half")) == pytest.approx(0.5 * (kl_ab + kl_ba), rel=1e-12)
    # generalised JSD with beta=0.5 is the symmetric Jensen-Shannon divergence, bounded by log 2
    z, u = _logits(6, 10, seed=8), _logits(6, 10, seed=9)
    js = divergence(z, u, "jsd", beta=0.5, reduction="none")
    torch.testing.assert_close(js, divergence(u, z, "jsd", beta=0.5, reduction="none"))
    assert bool((js <= math.log(2) + 1e-12).all())
    # jsd(p, q; beta) == jsd(q, p; 1 - beta)
    torch.testing.assert_close(divergence(z, u, "jsd", beta=0.2, reduction="none"),
                               divergence(u, z, "jsd", beta=0.8, reduction="none"))


def test_half_is_mean_of_both_directions_on_their_own_supports():
    z, u = _logits(4, 12, seed=10), _logits(4, 12, seed=11)
    half = divergence(z, u, "half", top_k=4)
    fwd = divergence(z, u, "forward_kl", top_k=4, support="teacher")
    rev = divergence(z, u, "reverse_kl", top_k=4, support="learner")
    torch.testing.assert_close(half, 0.5 * fwd + 0.5 * rev)


def test_topk_equal_to_vocab_is_full_support():
    z, u = _logits(3, 8, seed=12), _logits(3, 8, seed=13)
    for kind in KINDS:
        torch.testing.assert_close(divergence(z, u, kind, top_k=8), divergence(z, u, kind))


# ----------------------------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k,support", CONFIGS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_gradcheck(kind, top_k, support, renormalize):
    z = _logits(2, 2, 7, seed=14).requires_grad_(True)
    u = _logits(2, 2, 7, seed=15)
    mask = torch.tensor([[True, False], [True, True]])

    def fn(x):
        return divergence(x, u, kind, top_k=top_k, support=support, renormalize=renormalize, temperature=1.3,
                          mask=mask, reduction="none")

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_finite_differences_of_numpy_reference(kind):
    """Central differences of the NumPy reference (no autograd involved) against our analytic gradient."""
    z = _logits(2, 6, seed=16)
    u = _logits(2, 6, seed=17)
    zr = z.clone().requires_grad_(True)
    divergence(zr, u, kind, top_k=3, temperature=0.8).backward()
    h = 1e-6
    fd = np.zeros(z.shape)
    zn = z.numpy()
    for idx in np.ndindex(*z.shape):
        zp, zm = zn.copy(), zn.copy()
        zp[idx] += h
        zm[idx] -= h
        fd[idx] = (ref(zp, u.numpy(), kind, top_k=3, T=0.8) - ref(zm, u.numpy(), kind, top_k=3, T=0.8)) / (2 * h)
    np.testing.assert_allclose(zr.grad.numpy(), fd, atol=1e-7)


def test_teacher_gets_no_gradient_and_grad_output_scales():
    z = _logits(3, 9, seed=18).requires_grad_(True)
    u = _logits(3, 9, seed=19).requires_grad_(True)
    (3.0 * divergence(z, u, "reverse_kl")).backward()
    assert u.grad is None
    g3 = z.grad.clone()
    z.grad = None
    divergence(z, u, "reverse_kl").backward()
    torch.testing.assert_close(g3, 3.0 * z.grad)


def test_no_gradient_work_when_not_needed():
    z, u = _logits(3, 9, seed=20), _logits(3, 9, seed=21)
    with torch.no_grad():
        v = divergence(z.clone().requires_grad_(True), u, "half")
    assert not v.requires_grad
    torch.testing.assert_close(v, divergence(z, u, "half"))


# ----------------------------------------------------------------------------------------------------------------------
# Chunking and memory


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [None, 4])
def test_chunked_equals_unchunked(kind, top_k):
    z = _logits(37, 50, seed=22, dtype=torch.float32)
    u = _logits(37, 50, seed=23, dtype=torch.float32)
    results = []
    for chunk in (1, 5, 37, None):
        zr = z.clone().requires_grad_(True)
        v = divergence(zr, u, kind, top_k=top_k, chunk_size=chunk)
        v.backward()
        results.append((v.detach(), zr.grad))
    for v, g in results[1:]:
        torch.testing.assert_close(v, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, results[0][1], rtol=1e-6, atol=1e-9)


def test_saved_memory_is_only_the_gradient():
    """Backward keeps one [N, V] tensor (the gradient) and nothing that grows with N beyond it."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    N, V = 300, 64
    z = _logits(N, V, seed=24, dtype=torch.float32).requires_grad_(True)
    u = _logits(N, V, seed=25, dtype=torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = divergence(z, u, "half", chunk_size=16)
    assert sum(saved) <= N * V * 4
    loss.backward()
    assert z.grad.shape == (N, V)


# ----------------------------------------------------------------------------------------------------------------------
# Dtypes and extreme values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    z = _logits(4, 5, 30, seed=26, dtype=dtype).requires_grad_(True)
    u = _logits(4, 5, 30, seed=27, dtype=dtype)
    v = divergence(z, u, "reverse_kl")
    assert v.dtype == torch.float32
    v.backward()
    assert z.grad.dtype == dtype
    want = ref(z.detach().double().numpy(), u.double().numpy(), "reverse_kl")
    assert float(v.detach()) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits_stay_finite(kind):
    z = _logits(4, 16, seed=28, scale=1e4, dtype=torch.float32).requires_grad_(True)
    u = _logits(4, 16, seed=29, scale=1e4, dtype=torch.float32)
    v = divergence(z, u, kind, top_k=4)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(z.grad).all()
    want = ref(z.detach().double().numpy(), u.double().numpy(), kind, top_k=4)
    assert float(v) == pytest.approx(want, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [None, 3, 9])
def test_padded_vocabulary_with_minus_inf(kind, top_k):
    """-inf columns in both models (a padded vocabulary) change nothing and get zero gradient."""
    z, u = _logits(3, 8, seed=30), _logits(3, 8, seed=31)
    pad = torch.full((3, 4), -math.inf, dtype=torch.float64)
    zp = torch.cat([z, pad], -1).requires_grad_(True)
    up = torch.cat([u, pad], -1)
    k = None if top_k is None else min(top_k, 8)
    v = divergence(zp, up, kind, top_k=top_k)
    v.backward()
    zr = z.clone().requires_grad_(True)
    divergence(zr, u, kind, top_k=k).backward()
    assert not torch.isnan(v)
    if top_k != 9:  # top-9 of a padded row picks one -inf token: a zero-weight term
        torch.testing.assert_close(v, divergence(z, u, kind, top_k=k))
        torch.testing.assert_close(zp.grad[:, :8], zr.grad)
    assert not torch.isnan(zp.grad).any()
    assert (zp.grad[:, 8:] == 0).all()


def test_zero_weight_minus_inf_terms_contribute_zero():
    z, u = _logits(2, 6, seed=32), _logits(2, 6, seed=33)
    u_inf = u.clone()
    u_inf[:, 0] = -math.inf  # teacher gives token 0 no mass: forward KL's weight q is 0 there
    v = divergence(z, u_inf, "forward_kl", reduction="none")
    np.testing.assert_allclose(v.numpy(), ref(z.numpy(), u_inf.numpy(), "forward_kl", reduction="none"), rtol=1e-12)
    z_inf = z.clone().requires_grad_(False)
    z_inf[:, 1] = -math.inf  # learner gives token 1 no mass: reverse KL's weight p is 0 there
    zr = z_inf.clone().requires_grad_(True)
    v = divergence(zr, u, "reverse_kl", reduction="none")
    np.testing.assert_allclose(v.detach().numpy(), ref(z_inf.numpy(), u.numpy(), "reverse_kl", reduction="none"),
                               rtol=1e-12)
    v.sum().backward()
    assert torch.isfinite(zr.grad).all()


def test_empty_selection_gives_zero_value_and_gradient():
    z = _logits(2, 3, 5, seed=34).requires_grad_(True)
    u = _logits(2, 3, 5, seed=35)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        v = divergence(z, u, "reverse_kl", mask=mask, reduction=reduction)
        v.backward()
        assert float(v) == 0.0 and not torch.isnan(v)
        assert (z.grad == 0).all()
        z.grad = None
    assert (divergence(z, u, "tvd", mask=mask, reduction="none") == 0).all()
    empty = divergence(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5), "forward_kl")
    assert float(empty) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Random shapes and values


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    V=st.integers(2, 12),
    kind=st.sampled_from(KINDS),
    k=st.one_of(st.none(), st.integers(1, 12)),
    renormalize=st.booleans(),
    T=st.floats(0.3, 3.0),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 20.0),
)
def test_random_shapes_match_reference(lead, V, kind, k, renormalize, T, seed, scale):
    k = None if k is None else min(k, V)
    z, u = _logits(*lead, V, seed=seed, scale=scale), _logits(*lead, V, seed=seed + 1, scale=scale)
    got = divergence(z, u, kind, top_k=k, renormalize=renormalize, temperature=T, reduction="none")
    want = ref(z.numpy(), u.numpy(), kind, reduction="none", top_k=k, renormalize=renormalize, T=T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kind": "kl"}, r"unknown divergence kind 'kl'; valid kinds: forward_kl, reverse_kl, half, jsd"),
        ({"top_k": 0}, r"top_k must be None or an integer in \[1, V=6\], got 0"),
        ({"top_k": 7}, r"top_k .* got 7"),
        ({"top_k": 2.5}, r"top_k .* got 2.5"),
        ({"support": "both"}, r"unknown support 'both'; valid supports: learner, teacher, union"),
        ({"beta": -0.1, "kind": "jsd"}, r"beta must be in \[0, 1\] \(0: forward_kl, 1: reverse_kl, as TRL\), got -0.1"),
        ({"beta": 1.5}, r"beta .* got 1.5"),
        ({"alpha": 1.0}, r"alpha must be in the open interval \(0, 1\), got 1.0"),
        ({"temperature": 0}, r"temperature must be a finite number > 0, got 0"),
        ({"reduction": "avg"}, r"unknown reduction 'avg'; valid reductions: mean, sum, none"),
        ({"chunk_size": 0}, r"chunk_size must be None or a positive integer, got 0"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, r"mask shape \[2, 4\] must equal .* \[2, 3\]"),
        ({"mask": torch.ones(2, 3)}, r"mask must be a bool tensor, got torch.float32"),
    ],
)
def test_errors_name_the_problem(kwargs, message):
    z, u = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    kwargs = {"kind": "reverse_kl", **kwargs}
    with pytest.raises(ValueError, match=message):
        divergence(z, u, **kwargs)


def test_shape_errors_show_both_shapes():
    with pytest.raises(ValueError, match=r"vocabulary sizes differ: learner V=6, teacher V=8 .*\[2, 6\].*\[2, 8\]"):
        divergence(torch.randn(2, 6), torch.randn(2, 8), "forward_kl")
    with pytest.raises(ValueError, match=r"same shape, got learner \[2, 6\] and teacher \[3, 6\]"):
        divergence(torch.randn(2, 6), torch.randn(3, 6), "forward_kl")


def test_all_minus_inf_row_is_reported():
    z = torch.randn(3, 5)
    z[1] = -math.inf
    with pytest.raises(ValueError, match=r"position 1 .* no finite logit"):
        divergence(z, torch.randn(3, 5), "reverse_kl")
    mask = torch.tensor([True, False, True])  # masked out: fine
    assert torch.isfinite(divergence(z, torch.randn(3, 5), "reverse_kl", mask=mask))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [None, 5])
def test_cuda_matches_cpu(kind, top_k):
    z = _logits(64, 300, seed=36, dtype=torch.float32).requires_grad_(True)
    u = _logits(64, 300, seed=37, dtype=torch.float32)
    zc = z.detach().cuda().requires_grad_(True)
    v = divergence(z, u, kind, top_k=top_k)
    vc = divergence(zc, u.cuda(), kind, top_k=top_k)
    v.backward()
    vc.backward()
    torch.testing.assert_close(vc.cpu(), v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zc.grad.cpu(), z.grad, rtol=1e-4, atol=1e-7)
