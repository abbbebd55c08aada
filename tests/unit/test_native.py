"""The compiled CPU kernel (``ktransfer.losses.native``) against the Python path in float64, which test_divergences.py
checks
against an independent NumPy reference: every kind, full and top-k supports, renormalisation, the tail bucket,
temperature, NLL with label smoothing, masks, -inf logits, low-precision inputs, thread counts, a long vocabulary, and
the build fallback.

Skipped only where no C++ compiler exists (then ``divergence`` runs the Python path, tested elsewhere).
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

import ktransfer.losses.divergences as D
from ktransfer import KINDS, divergence, transfer_loss
from ktransfer.losses import native

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="needs a C++ compiler to build the kernel")


@pytest.fixture(scope="module")
def kernel():
    saved = dict(native._STATE)
    native.use_native(True)
    mod = native.kernel()
    assert mod is not None, "a C++ compiler is present, so the kernel must build (see the warning above)"
    yield mod
    native._STATE.update(saved)


def _logits(N, V, seed, scale=2.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def _on_both_paths(fn, z, u):
    """fn(z, u) with the kernel on float32/bf16 inputs, and on the Python path in float64: (value, grad) each."""
    out = []
    for x, y, use in ((z, u, True), (z.double(), u.double(), False)):
        native.use_native(use)
        try:
            x = x.detach().clone().requires_grad_(True)
            v = fn(x, y)
            v.backward()
            out.append((v.detach().double(), x.grad.double()))
        finally:
            native.use_native(True)
    return out


def _rel(a, b):
    scale = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / scale)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_full_vocabulary_equals_float64(kernel, kind, T):
    z, u = _logits(13, 301, seed=1), _logits(13, 301, seed=2)  # 301: not a multiple of the vector width
    (vk, gk), (vr, gr) = _on_both_paths(lambda x, y: divergence(x, y, kind, temperature=T), z, u)
    assert float(abs(vk - vr) / vr.abs()) < 2e-6
    assert _rel(gk, gr) < 2e-6


@pytest.mark.parametrize("option", [None, "renormalize", "tail"])
@pytest.mark.parametrize("support", [None, "learner", "teacher", "union"])
@pytest.mark.parametrize("kind", KINDS)
def test_top_k_supports_equal_float64(kernel, kind, support, option):
    """Plain, renormalised and tail (test_tail.py checks the float64 path's tail against the coarsened reference)."""
    z, u = _logits(11, 203, seed=3), _logits(11, 203, seed=4)
    extra = {option: True} if option else {}
    (vk, gk), (vr, gr) = _on_both_paths(
        lambda x, y: divergence(x, y, kind, top_k=7, support=support, temperature=1.5, **extra), z, u)
    assert float(abs(vk - vr) / vr.abs()) < 5e-6
    assert _rel(gk, gr) < 5e-6


@pytest.mark.parametrize("support", ["learner", "teacher", "union"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_tail_keeps_its_digits_when_the_support_holds_nearly_all_the_mass(kernel, kind, support):
    """Rests of ~2e-6 (learner) and ~1e-4 (teacher): the kernel sums them over the rest, so the value and the gradient
    at the rest's entries match float64 to 1e-4 for every support, where 1 - p(S) in float32 (rounding ~6e-8) would be
    off by about 3% in p_rest (the check at the end shows that form missing the same tolerance)."""
    z, u = _logits(4, 203, seed=43, scale=1.0), _logits(4, 203, seed=44, scale=1.0)
    z[:, :3] += 18.0
    u[:, :3] += 14.0
    fn = lambda x, y: divergence(x, y, kind, top_k=3, support=support, tail=True, reduction="sum")  # noqa: E731
    (vk, gk), (vr, gr) = _on_both_paths(fn, z, u)
    assert float(abs(vk - vr) / vr.abs()) < 1e-4
    assert _rel(gk[:, 3:], gr[:, 3:]) < 1e-4
    p_rest = torch.softmax(z.double(), -1)[:, 3:].sum(-1)
    cancelled = 1 - torch.softmax(z, -1)[:, :3].sum(-1).double()
    assert float(((cancelled - p_rest) / p_rest).abs().max()) > 1e-2


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("k", [1, 16, 17, 70, 256, 300])
def test_top_k_selection_for_small_and_large_k(kernel, k, tail):
    """k up to 16 x the vector width starts from pass 1's bound; larger k from -inf: both pick the top-k exactly (and,
    with a tail, sum the rest over exactly the entries not picked)."""
    z, u = _logits(5, 1000, seed=23), _logits(5, 1000, seed=24)
    z[1, ::3] = -torch.inf  # a row with fewer finite logits in some vector groups
    for support in ("learner", "teacher", "union"):
        (vk, gk), (vr, gr) = _on_both_paths(
            lambda x, y, support=support: divergence(x, y, "jsd", top_k=k, support=support, tail=tail), z, u)
        assert float(abs(vk - vr) / vr.abs()) < 5e-6, support
        assert _rel(gk, gr) < 5e-6, support


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("k", [3, 16, 70])
def test_top_k_with_tied_logits_keeps_exactly_k(kernel, k, tail):
    """Logits with many exact ties at the k-th value (integers 0..5, and the learner a function of the teacher, so
    that every choice among tied entries gives the same value and the same multiset of gradient entries per row): the
    kernel's selection, whose buffer cuts keep ties by position, must equal torch.topk's on the Python path; with a
    tail, the rest must hold exactly the entries not kept."""
    g = torch.Generator().manual_seed(40 + k)
    u = torch.randint(0, 6, (6, 1000), generator=g).float()
    z = 2.0 - 0.7 * u
    for support in ("learner", "teacher", "union"):
        (vk, gk), (vr, gr) = _on_both_paths(
            lambda x, y, support=support: divergence(x, y, "jsd", top_k=k, support=support, tail=tail), z, u)
        assert float(abs(vk - vr) / vr.abs()) < 5e-6, support
        assert _rel(gk.sort(-1).values, gr.sort(-1).values) < 5e-6, support


def test_tail_after_cuts_in_the_middle_of_a_row(kernel):
    """k = 1100 of 5000 is past the bound from pass 1 (64 groups x the vector width): the selection starts from -inf,
    fills its buffer (4k) and cuts it in the middle of the row, then again at the end; the support it ends with, and
    the rest taken over the entries outside it, must give the float64 tail for every support."""
    z, u = _logits(3, 5000, seed=45), _logits(3, 5000, seed=46)
    for kind, support in (("forward_kl", "teacher"), ("reverse_kl", "learner"), ("jsd", "union")):
        (vk, gk), (vr, gr) = _on_both_paths(
            lambda x, y, kind=kind, support=support: divergence(x, y, kind, top_k=1100, support=support, tail=True),
            z, u)
        assert float(abs(vk - vr) / vr.abs()) < 5e-6, support
        assert _rel(gk, gr) < 5e-6, support


def test_top_k_of_the_whole_vocabulary_is_the_full_divergence(kernel):
    z, u = _logits(6, 40, seed=5), _logits(6, 40, seed=6)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        for support in ("learner", "teacher", "union"):
            full = divergence(z, u, kind)
            top = divergence(z, u, kind, top_k=40, support=support)
            assert float(abs(top - full)) <= 1e-6 * float(abs(full))


def test_tiny_vocabulary_and_a_single_row(kernel):
    for V in (1, 2, 5, 16, 17):
        z, u = _logits(1, V, seed=V), _logits(1, V, seed=V + 50)
        (vk, gk), (vr, gr) = _on_both_paths(lambda x, y: divergence(x, y, "jsd"), z, u)
        assert float(abs(vk - vr)) <= 1e-6 * max(1.0, float(vr.abs()))
        assert float((gk - gr).abs().max()) <= 1e-6


@pytest.mark.parametrize("objective", ["nll", "kd", "ka", "half", "jsd"])
def test_transfer_loss_with_labels_smoothing_and_ignored_positions(kernel, objective):
    B, L, V = 3, 5, 97
    z = _logits(B * L, V, seed=7).reshape(B, L, V)
    u = _logits(B * L, V, seed=8).reshape(B, L, V)
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(9))
    labels[0, 3:] = -100
    labels[2, 0] = -100
    for T in (1.0, 3.0):
        for eps in (0.0, 0.1):
            (vk, gk), (vr, gr) = _on_both_paths(
                lambda x, y, T=T, eps=eps: transfer_loss(x, y, labels, objective=objective, lam=0.3, temperature=T,
                                                         label_smoothing=eps).loss, z, u)
            assert float(abs(vk - vr) / vr.abs()) < 2e-6, (T, eps)
            assert _rel(gk, gr) < 2e-6, (T, eps)
            assert float(gk[0, 3:].abs().max()) == 0.0  # ignored positions get no gradient


def test_minus_infinity_logits_and_masks(kernel):
    z, u = _logits(8, 64, seed=10), _logits(8, 64, seed=11)
    z[:, 60:] = -torch.inf  # a learner that cannot emit 4 tokens, a teacher that cannot emit 2 others
    u[:, 50:52] = -torch.inf
    u[:, 60:] = -torch.inf
    mask = torch.ones(8, dtype=torch.bool)
    mask[[1, 4]] = False
    # the skew kinds get 5e-6: their gradients lose a little more to float32 rounding on these rows (skew_reverse_kl:
    # 2.4e-6 from the kernel on AVX2, 1.5e-6 from the float32 Python path)
    for kind, tol in (("forward_kl", 2e-6), ("jsd", 2e-6), ("tvd", 2e-6), ("skew_forward_kl", 5e-6),
                      ("skew_reverse_kl", 5e-6)):
        fn = lambda x, y, kind=kind: divergence(x, y, kind, mask=mask, reduction="sum")  # noqa: E731
        (vk, gk), (vr, gr) = _on_both_paths(fn, z, u)
        assert torch.isfinite(vk) and float(abs(vk - vr) / vr.abs()) < tol, kind
        assert _rel(gk, gr) < tol, kind
        assert float(gk[[1, 4]].abs().max()) == 0.0
    # KL(p || q) is infinite where the learner puts mass on a token the teacher cannot emit
    assert divergence(z, u, "reverse_kl").item() == float("inf")
    z[5] = -torch.inf
    with pytest.raises(ValueError, match="position 5 .* no finite logit"):
        divergence(z, u, "forward_kl")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_a_nan_logit_gives_a_nan_value_not_a_finite_one(kernel, dtype, use_kernel):
    """A NaN logit in either model must make its row's value NaN, on the kernel (whose exp has no clamps) and on the
    Python path, never be dropped as a 0 log 0 term (the Python path's forward/reverse KL once turned it into 0)."""
    native.use_native(use_kernel)
    try:
        for model in ("learner", "teacher"):
            z, u = _logits(4, 50, seed=30, dtype=dtype), _logits(4, 50, seed=31, dtype=dtype)
            (z if model == "learner" else u)[1, 3] = torch.nan
            for kind in KINDS:
                for top_k in (None, 5):
                    rows = divergence(z, u, kind, top_k=top_k, reduction="none")
                    assert torch.isnan(rows[1]), (model, kind, top_k)
                    assert bool(torch.isfinite(rows[[0, 2, 3]]).all()), (model, kind, top_k)
    finally:
        native.use_native(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(kernel, dtype):
    z, u = _logits(9, 130, seed=12, dtype=dtype), _logits(9, 130, seed=13, dtype=dtype)
    for kind in ("reverse_kl", "half", "jsd"):
        (vk, gk), (vr, gr) = _on_both_paths(lambda x, y, kind=kind: divergence(x, y, kind, top_k=None), z, u)
        assert float(abs(vk - vr) / vr.abs()) < 2e-6  # the same inputs, computed in float32
        assert _rel(gk, gr) < 1e-2  # the gradient is stored in the input's dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradient_is_the_float32_gradient_rounded_once(kernel, dtype):
    """bf16/fp16 logits are exact in float32, so the kernel's gradient in the input's dtype must be its float32
    gradient on the same values rounded once (round to nearest even), label term included: checked bit for bit for
    widths around the 32-entry blocks the reduced gradient is written in, with labels, smoothing, ignored positions,
    masks and a top-k support."""
    def grads(fn, z, u):
        out = []
        for x in (z, z.float()):
            x = x.detach().clone().requires_grad_(True)
            fn(x, u.to(x.dtype)).backward()
            out.append(x.grad)
        return out[0], out[1].to(dtype)

    for V in (17, 32, 77, 130):
        z, u = _logits(7, V, seed=V, dtype=dtype), _logits(7, V, seed=V + 1, dtype=dtype)
        labels = torch.randint(0, V, (7,), generator=torch.Generator().manual_seed(V))
        labels[3] = -100
        labels[5] = V - 1  # a label in the last, partial block
        mask = torch.ones(7, dtype=torch.bool)
        mask[2] = False
        cases = {
            **{kind: lambda x, y, kind=kind: divergence(x, y, kind) for kind in KINDS},
            "masked jsd": lambda x, y, mask=mask: divergence(x, y, "jsd", mask=mask),
            "top-k ka": lambda x, y: divergence(x, y, "reverse_kl", top_k=5),
            **{f"ka T={T} eps={eps}": lambda x, y, T=T, eps=eps, labels=labels: transfer_loss(
                x, y, labels, objective="ka", lam=0.4, temperature=T, label_smoothing=eps).loss
               for T in (1.0, 2.0) for eps in (0.0, 0.1)},
            "nll": lambda x, y, labels=labels: transfer_loss(x, y, labels, objective="nll").loss,
        }
        for name, fn in cases.items():
            g_low, g_rounded = grads(fn, z, u)
            assert g_low.dtype == dtype
            assert torch.equal(g_low, g_rounded), (V, name)


def test_the_kernels_log_is_accurate_on_probabilities(kernel):
    """The table-driven log of jsd and the skew kinds (AVX-512 and AVX2), on 4M random float32 bit patterns in
    [FLT_MIN, 1.5) and a dense grid near 1, against float64: within half an ulp of its result plus 5e-8 (1e-8 near 1,
    where log x ~ 0). Other instruction sets use ATen's log: within 4 ulps there. NaN stays NaN."""
    bounds = torch.tensor([torch.finfo(torch.float32).tiny, 1.5]).view(torch.int32).tolist()
    bits = torch.randint(*bounds, (1 << 22,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    x = torch.cat([bits.to(torch.int32).view(torch.float32), torch.linspace(-0.1, 0.1, 100_003).exp().float()])
    y = kernel.log_prob(x)
    err = (y.double() - x.double().log()).abs()
    ulp = (y.abs().nextafter(torch.tensor(torch.inf)) - y.abs()).double()
    assert torch.isnan(kernel.log_prob(torch.tensor([torch.nan]))).all()
    if native.capability() in ("AVX512", "AVX2"):
        assert float((err - ulp / 2).max()) <= 5e-8
        near_one = x.double().log().abs() <= 0.1
        assert float(err[near_one].max()) <= 1e-8
    else:
        assert float((err - 4 * ulp).max()) <= 5e-8


def test_the_kernels_exp_is_accurate_where_it_is_used(kernel):
    """The inlined exp (Cephes' polynomial on AVX-512 and AVX2), on 4M random x in [-87.3, 0] (shifted logits and log
    probabilities: what the kernel feeds it), a dense grid across the underflow at log(FLT_MIN) and around 0, and
    positives up to 88.3, against float64: within 2 ulps wherever exp(x) is a normal float (seen: 1.26 on AVX2);
    exactly 0 below log(FLT_MIN) on both instruction sets (so a -inf logit gives p = 0), NaN kept."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(1 << 22, generator=g, dtype=torch.float64).mul(-87.3).float(),
                   torch.linspace(-88.5, -86.5, 100_001), torch.linspace(-1e-3, 1e-3, 10_001),
                   torch.linspace(0.0, 88.3, 10_001)])
    y, ref = kernel.exp(x).double(), x.double().exp()
    normal = ref >= torch.finfo(torch.float32).tiny
    ulp = (ref.float().nextafter(torch.tensor(torch.inf)) - ref.float()).double()
    assert float(((y - ref).abs() / ulp)[normal].max()) <= 2.0
    edge = kernel.exp(torch.tensor([-torch.inf, torch.nan, 0.0]))
    assert edge[0] == 0.0 and torch.isnan(edge[1]) and edge[2] == 1.0
    if native.capability() in ("AVX512", "AVX2"):
        assert float(y[x < -87.33654475].abs().max()) == 0.0


def test_long_vocabulary_sums_stay_accurate(kernel):
    z, u = _logits(3, 150_001, seed=14, scale=1.0), _logits(3, 150_001, seed=15, scale=1.0)
    for kind in ("forward_kl", "reverse_kl"):
        (vk, gk), (vr, gr) = _on_both_paths(lambda x, y, kind=kind: divergence(x, y, kind), z, u)
        assert float(abs(vk - vr) / vr.abs()) < 1e-5
        assert _rel(gk, gr) < 1e-5


def test_one_or_two_threads_give_identical_bits(kernel):
    z, u = _logits(33, 257, seed=16), _logits(33, 257, seed=17)
    saved = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = z.clone().requires_grad_(True)
            v = divergence(x, u, "half", top_k=5)
            v.backward()
            out.append((v.detach(), x.grad))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("extra", [{}, {"top_k": 5, "tail": True}])
def test_fused_head_uses_the_kernel_and_matches_float64(kernel, extra):
    from ktransfer import fused_linear_divergence

    g = torch.Generator().manual_seed(18)
    h = torch.randn(20, 16, generator=g, dtype=torch.float64)
    W = torch.randn(300, 16, generator=g, dtype=torch.float64) * 0.3
    ht = torch.randn(20, 24, generator=g, dtype=torch.float64)
    Wt = torch.randn(300, 24, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, 300, (20,), generator=g)
    grads = []
    for dtype, use in ((torch.float32, True), (torch.float64, False)):
        native.use_native(use)
        try:
            Wx = W.to(dtype).requires_grad_(True)
            loss = fused_linear_divergence(h.to(dtype), Wx, ht.to(dtype), Wt.to(dtype), "reverse_kl", labels=labels,
                                           lam=0.5, **extra).loss
            loss.backward()
            grads.append((loss.detach().double(), Wx.grad.double()))
        finally:
            native.use_native(True)
    assert float(abs(grads[0][0] - grads[1][0]) / grads[1][0].abs()) < 2e-6
    assert _rel(grads[0][1], grads[1][1]) < 1e-5


def test_a_failed_build_falls_back_to_the_python_path_once(monkeypatch, caplog):
    from torch.utils import cpp_extension

    saved = dict(native._STATE)
    calls = []

    def broken_load(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Error building extension: no compiler\nc++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken_load)
    native._STATE.update(module=None, failed=False, enabled=True)
    try:
        z, u = _logits(4, 30, seed=19), _logits(4, 30, seed=20)
        with caplog.at_level(logging.WARNING, logger="ktransfer.losses.native"):
            a = divergence(z, u, "jsd")
            b = divergence(z, u, "jsd")
        want = divergence(z.double(), u.double(), "jsd")
        assert len(calls) == 1 and not native.native_enabled()
        assert sum("could not be built" in r.getMessage() for r in caplog.records) == 1
        assert "c++: not found" in caplog.text
        assert float(abs(a - want)) < 1e-6 and torch.equal(a, b)
    finally:
        native._STATE.update(saved)


def test_switch_is_checked_and_float64_never_uses_the_kernel(kernel):
    with pytest.raises(ValueError, match="True or False"):
        native.use_native("yes")
    z, u = _logits(3, 10, seed=21, dtype=torch.float64), _logits(3, 10, seed=22, dtype=torch.float64)
    assert D._native_module(z, u) is None
    assert D._native_module(z.float(), u.float()) is kernel
    assert D._native_module(z.float(), u.to(torch.bfloat16)) is None  # mixed dtypes take the Python path
