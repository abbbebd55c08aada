"""No silently wrong loss (issue 30): the Python path of ``divergence`` (float64, ``KTRANSFER_NATIVE=0``, CUDA) is
exact for any finite logits, one huge learner logit included, against an mpmath reference at 50 digits; token counts
that are not a finite number > 0 raise instead of giving a loss of 0."""

from __future__ import annotations

import math

import pytest
import torch

mpmath = pytest.importorskip("mpmath")
mpmath.mp.dps = 50

from ktransfer.losses import native  # noqa: E402
from ktransfer.losses.divergences import divergence  # noqa: E402
from ktransfer.losses.hf_loss import hf_loss  # noqa: E402
from ktransfer.losses.objectives import transfer_loss  # noqa: E402

TEACHER = [0.3, -1.2, 2.0, 0.5, -0.7, 1.1, 0.0, -2.5]


def reference(kind: str, z: list[float], u: list[float], beta: float = 0.5, alpha: float = 0.1) -> float:
    """D(p, q) for p = softmax(z), q = softmax(u), in 50-digit arithmetic (0 log 0 = 0)."""
    def logsoftmax(x):
        x = [mpmath.mpf(v) for v in x]
        m = max(x)
        lse = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in x))
        return [v - lse for v in x]

    lp, lq = logsoftmax(z), logsoftmax(u)
    p, q = [mpmath.exp(v) for v in lp], [mpmath.exp(v) for v in lq]

    def kl(a, la, lb):  # sum a (log a - log b)
        return mpmath.fsum(ai * (lai - lbi) for ai, lai, lbi in zip(a, la, lb, strict=True) if ai > 0)

    def log_mix(w, la, lb):  # log(w a + (1 - w) b)
        return [mpmath.log(w * mpmath.exp(x) + (1 - w) * mpmath.exp(y)) for x, y in zip(la, lb, strict=True)]

    if kind == "forward_kl":
        return float(kl(q, lq, lp))
    if kind == "reverse_kl":
        return float(kl(p, lp, lq))
    if kind == "half":
        return float((kl(q, lq, lp) + kl(p, lp, lq)) / 2)
    if kind == "jsd":
        lm = log_mix(beta, lq, lp)
        return float(beta * kl(q, lq, lm) + (1 - beta) * kl(p, lp, lm))
    if kind == "skew_forward_kl":
        return float(kl(q, lq, log_mix(alpha, lq, lp)))
    if kind == "skew_reverse_kl":
        return float(kl(p, lp, log_mix(alpha, lp, lq)))
    return float(mpmath.fsum(abs(a - b) for a, b in zip(p, q, strict=True)) / 2)  # tvd


KINDS = ("forward_kl", "reverse_kl", "half", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


@pytest.fixture
def python_path():
    """The Python path for float32 too (what ``KTRANSFER_NATIVE=0`` and CUDA take)."""
    enabled = native._STATE["enabled"]
    native.use_native(False)
    yield
    native.use_native(enabled)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("big", [1e8, 1e20, 1e38, 1e300])
def test_one_huge_learner_logit_float64(python_path, kind, big):
    """The issue's row: ``a[3] = 1e8`` gave reverse KL 8.0 (true 4.5955); 1e38 gave 0.0 (true 4.1649)."""
    z = [0.1, -0.4, 0.9, big, 0.2, -1.0, 0.5, 0.0]
    expect = reference(kind, z, TEACHER)
    got = divergence(torch.tensor([z], dtype=torch.float64), torch.tensor([TEACHER], dtype=torch.float64), kind)
    assert got.dtype == torch.float64
    assert math.isclose(float(got), expect, rel_tol=1e-12), (float(got), expect)
    if kind in ("reverse_kl", "skew_reverse_kl"):  # p is one-hot on token 3: -log q_3 (closed form, no mpmath)
        lse = math.log(sum(math.exp(v) for v in TEACHER))
        closed = lse - TEACHER[3] if kind == "reverse_kl" else -math.log(0.1 + 0.9 * math.exp(TEACHER[3] - lse))
        assert math.isclose(float(got), closed, rel_tol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("big", [1e8, 1e20, 1e38, -3e38])
def test_one_huge_learner_logit_float32(python_path, kind, big):
    z = [0.1, -0.4, 0.9, big, 0.2, -1.0, 0.5, 0.0]
    z32 = torch.tensor([z], dtype=torch.float32)
    u32 = torch.tensor([TEACHER], dtype=torch.float32)
    expect = reference(kind, z32[0].double().tolist(), u32[0].double().tolist())  # the float32 inputs, exactly
    got = divergence(z32, u32, kind)
    assert got.dtype == torch.float32
    if math.isinf(expect):
        assert math.isinf(float(got))
    else:
        assert math.isclose(float(got), expect, rel_tol=2e-6, abs_tol=1e-7), (float(got), expect)


@pytest.mark.parametrize("big", [1e8, 1e300])
def test_huge_logits_top_k_nll_and_gradient_float64(python_path, big):
    """A top-k support, the NLL term and the gradient on the same kind of row: finite and right."""
    z = torch.tensor([[0.1, -0.4, 0.9, big, 0.2, -1.0, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([TEACHER], dtype=torch.float64)
    topk = divergence(z, u, "reverse_kl", top_k=2)  # p's top-2: {3, 2}; p_2 = 0 exactly: -log q_3 stays
    lse = math.log(sum(math.exp(v) for v in TEACHER))
    assert math.isclose(float(topk), lse - TEACHER[3], rel_tol=1e-12)
    out = transfer_loss(z, u, torch.tensor([2]), objective="ka", lam=0.5)
    nll = big - 0.9  # -log p_2 = lse(z) - z_2
    assert math.isclose(float(out.nll), nll, rel_tol=1e-12)
    out.loss.backward()
    grad = z.grad[0]
    q3 = math.exp(TEACHER[3] - lse)
    assert torch.isfinite(grad).all() and abs(float(grad.sum())) < 1e-12  # softmax gradients sum to 0
    assert math.isclose(float(grad[2]), -0.5, rel_tol=1e-12) and math.isclose(float(grad[3]), 0.5, rel_tol=1e-12)
    assert q3 > 0


@pytest.mark.parametrize("count", [0, -3, float("nan"), float("inf"), torch.tensor(0), torch.tensor(float("nan"))])
def test_token_counts_must_be_finite_and_positive(count):
    z, u, labels = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match=r"num_tokens must be a finite number > 0"):
        transfer_loss(z, u, labels, objective="kd", num_tokens=count)
    with pytest.raises(ValueError, match=r"num_items_in_batch must be a finite number > 0"):
        hf_loss(z, u, labels, labels_shifted=True, num_items_in_batch=count)
    good = transfer_loss(z, u, labels, objective="kd", num_tokens=3)  # 6 tokens counted over 3: twice the mean
    mean = transfer_loss(z, u, labels, objective="kd")
    assert torch.allclose(good.loss, 2 * mean.loss)
