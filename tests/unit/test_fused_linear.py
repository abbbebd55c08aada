"""fused_linear_divergence equals transfer_loss on materialised logits: value and every gradient."""

from __future__ import annotations

import pytest
import torch

from ktransfer import transfer_loss
from ktransfer.losses.fused_linear import fused_linear_divergence


def _setup(seed=0, B=3, T=7, H=6, Ht=5, V=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=dtype)
    W = torch.randn(V, H, generator=g, dtype=dtype)
    b = torch.randn(V, generator=g, dtype=dtype)
    ht = torch.randn(B, T, Ht, generator=g, dtype=dtype)
    Wt = torch.randn(V, Ht, generator=g, dtype=dtype)
    bt = torch.randn(V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    return h, W, b, ht, Wt, bt, labels


@pytest.mark.parametrize("kind,top_k", [("ka", None), ("kd", 5), ("half", 4), ("jsd", None), ("nll", None)])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_equals_unfused(kind, top_k, chunk):
    h, W, b, ht, Wt, bt, labels = _setup()
    leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
    r = fused_linear_divergence(leaves[0], leaves[1], ht, Wt, kind, labels=labels, lam=0.4, top_k=top_k,
                                temperature=1.5, learner_bias=leaves[2], teacher_bias=bt, chunk_size=chunk)
    (2.0 * r.loss).backward()
    ref_leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
    z = ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]
    u = ht @ Wt.T + bt
    want = transfer_loss(z, u, labels, objective=kind, lam=0.4, top_k=top_k, temperature=1.5)
    (2.0 * want.loss).backward()
    torch.testing.assert_close(r.loss, want.loss)
    torch.testing.assert_close(r.nll, want.nll)
    torch.testing.assert_close(r.divergence, want.divergence)
    for got, ref in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad, ref.grad)


def test_linear_modules_and_frozen_teacher():
    h, W, b, ht, Wt, bt, labels = _setup(seed=1, dtype=torch.float32)
    learner = torch.nn.Linear(6, 40)
    teacher = torch.nn.Linear(5, 40)
    hr = h.clone().requires_grad_(True)
    htr = ht.clone().requires_grad_(True)
    r = fused_linear_divergence(hr, learner, htr, teacher, "ka", labels=labels, lam=0.5)
    r.loss.backward()
    assert learner.weight.grad is not None and learner.bias.grad is not None
    assert teacher.weight.grad is None and htr.grad is None
    want = transfer_loss(h @ learner.weight.T + learner.bias, (ht @ teacher.weight.T + teacher.bias).detach(),
                         labels, objective="ka", lam=0.5)
    torch.testing.assert_close(r.loss, want.loss)


def test_pure_divergence_without_labels():
    from ktransfer import divergence

    h, W, b, ht, Wt, bt, _ = _setup(seed=2)
    r = fused_linear_divergence(h, W, ht, Wt, "reverse_kl", top_k=3)
    torch.testing.assert_close(r.loss, divergence(h @ W.T, ht @ Wt.T, "reverse_kl", top_k=3))
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_divergence(h, W, ht, Wt, "ka", lam=0.5)


def test_shape_errors():
    h, W, b, ht, Wt, bt, labels = _setup(seed=3)
    with pytest.raises(ValueError, match=r"learner_head must be \[V, H=6\], got \[40, 5\]"):
        fused_linear_divergence(h, Wt, ht, Wt, "ka", labels=labels)
    with pytest.raises(ValueError, match="vocabulary sizes differ: learner V=40, teacher V=39"):
        fused_linear_divergence(h, W, ht, Wt[:39], "ka", labels=labels)
