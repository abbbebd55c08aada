"""transfer_loss (Eq. 12) against torch.nn.functional.cross_entropy and an independent float64 divergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ktransfer import transfer_loss
from ktransfer.losses.objectives import OBJECTIVES


def _data(seed=0, B=3, T=5, V=13, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=dtype)
    u = torch.randn(B, T, V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    return z, u, labels


def _reference(z, u, labels, objective, lam, T=1.0, eps=0.0, num_tokens=None):
    """Plain autograd composition: cross_entropy + KL written out in float64."""
    m = labels != -100
    n = m.sum() if num_tokens is None else num_tokens
    nll = F.cross_entropy(z[m], labels[m], label_smoothing=eps, reduction="sum") / n
    if objective == "nll":
        return nll
    lp, lq = F.log_softmax(z[m] / T, -1), F.log_softmax(u[m] / T, -1)
    fwd = (lq.exp() * (lq - lp)).sum() / n
    rev = (lp.exp() * (lp - lq)).sum() / n
    d = {"kd": fwd, "ka": rev, "half": 0.5 * fwd + 0.5 * rev}[objective]
    return (1 - lam) * nll + lam * d


@pytest.mark.parametrize("objective", ["nll", "kd", "ka", "half"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("T,eps", [(1.0, 0.0), (2.0, 0.1)])
def test_matches_reference_value_and_gradient(objective, lam, T, eps):
    z, u, labels = _data()
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    r = transfer_loss(z1, u, labels, objective=objective, lam=lam, temperature=T, label_smoothing=eps)
    want = _reference(z2, u, labels, objective, lam, T, eps)
    r.loss.backward()
    want.backward()
    torch.testing.assert_close(r.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-12)
    if objective != "nll":  # the identity loss = (1 - lam) nll + lam D holds for the logged parts
        torch.testing.assert_close(r.loss.detach(), (1 - lam) * r.nll + lam * r.divergence)
    assert int(r.num_tokens) == int((labels != -100).sum())


def test_logged_parts_are_the_two_means():
    z, u, labels = _data(seed=1)
    r = transfer_loss(z, u, labels, objective="ka", lam=0.3)
    m = labels != -100
    torch.testing.assert_close(r.nll, F.cross_entropy(z[m], labels[m]))
    lp, lq = F.log_softmax(z[m], -1), F.log_softmax(u[m], -1)
    torch.testing.assert_close(r.divergence, (lp.exp() * (lp - lq)).sum(-1).mean())


def test_num_tokens_replaces_the_local_count():
    """Two halves with the global count sum to the loss and gradient of the whole batch (accumulation, DDP)."""
    z, u, labels = _data(seed=2, B=4)
    whole = z.clone().requires_grad_(True)
    transfer_loss(whole, u, labels, objective="half", lam=0.5, top_k=4).loss.backward()
    n = int((labels != -100).sum())
    parts = z.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        r = transfer_loss(parts[sl], u[sl], labels[sl], objective="half", lam=0.5, top_k=4, num_tokens=n)
        r.loss.backward()
        total = total + r.loss.detach()
    torch.testing.assert_close(total, transfer_loss(z, u, labels, objective="half", lam=0.5, top_k=4).loss)
    torch.testing.assert_close(parts.grad, whole.grad)


def test_all_positions_ignored_gives_zero():
    z, u, labels = _data(seed=3)
    labels[:] = -100
    zr = z.clone().requires_grad_(True)
    r = transfer_loss(zr, u, labels, objective="ka")
    r.loss.backward()
    assert float(r.loss.detach()) == 0.0 and float(r.nll) == 0.0 and float(r.divergence) == 0.0
    assert (zr.grad == 0).all() and not torch.isnan(zr.grad).any()


def test_top_k_and_options_reach_the_divergence():
    from ktransfer import divergence

    z, u, labels = _data(seed=4)
    r = transfer_loss(z, u, labels, objective="jsd", lam=1.0, top_k=3, beta=0.3, renormalize=True)
    m = labels != -100
    torch.testing.assert_close(r.loss, divergence(z, u, "jsd", top_k=3, beta=0.3, renormalize=True, mask=m))


def test_float32_and_bf16():
    z, u, labels = _data(seed=5, dtype=torch.float32)
    zb = z.to(torch.bfloat16).requires_grad_(True)
    r = transfer_loss(zb, u.to(torch.bfloat16), labels, objective="kd")
    r.loss.backward()
    assert r.loss.dtype == torch.float32 and zb.grad.dtype == torch.bfloat16
    want = _reference(zb.detach().double(), u.to(torch.bfloat16).double(), labels, "kd", 0.5)
    assert float(r.loss.detach()) == pytest.approx(float(want), rel=1e-5)


def test_nll_needs_no_teacher_and_other_objectives_do():
    z, u, labels = _data(seed=6)
    r = transfer_loss(z, None, labels, objective="nll")
    assert float(r.divergence) == 0.0
    with pytest.raises(ValueError, match="objective 'ka' needs teacher_logits"):
        transfer_loss(z, None, labels, objective="ka")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"objective": "kld"}, r"unknown objective 'kld'; valid objectives: nll, kd, ka"),
        ({"objective": "ka", "lam": 1.5}, r"lam must be in \[0, 1\], got 1.5"),
        ({"objective": "ka", "label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1.0"),
        ({"objective": "ka", "betta": 0.1}, r"unknown divergence option\(s\) \['betta'\]"),
        ({"objective": "ka", "top_k": 99}, r"top_k .* \[1, V=13\], got 99"),
    ],
)
def test_errors(kwargs, message):
    z, u, labels = _data()
    with pytest.raises(ValueError, match=message):
        transfer_loss(z, u, labels, **kwargs)


def test_label_errors():
    z, u, labels = _data()
    with pytest.raises(ValueError, match=r"labels shape \[3, 4\] must equal .* \[3, 5\]"):
        transfer_loss(z, u, labels[:, :4], objective="kd")
    bad = labels.clone()
    bad[1, 1] = 13
    with pytest.raises(ValueError, match=r"label 13 is outside the vocabulary \[0, 13\)"):
        transfer_loss(z, u, bad, objective="kd")
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        transfer_loss(z, u, labels.float(), objective="kd")


def test_every_objective_runs():
    z, u, labels = _data(seed=7)
    for objective in OBJECTIVES:
        zr = z.clone().requires_grad_(True)
        r = transfer_loss(zr, u, labels, objective=objective, top_k=4)
        r.loss.backward()
        assert torch.isfinite(r.loss) and torch.isfinite(zr.grad).all()
