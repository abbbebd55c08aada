"""``tail=True``: the rest of the vocabulary as one outcome beside a top-k support (issue #17's proper top-k
divergence). Checked against the NumPy float64 reference of ``test_divergences`` applied to the (k + 1)-outcome
coarsenings of p and q, finite differences, the divergence properties (>= 0, zero iff p and q agree on S and on the
rest mass), and p(S) -> 1; through ``transfer_loss``, the fused head and a training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_divergences import ref_support, ref_terms

import ktransfer
from ktransfer.losses.divergences import KINDS, SUPPORTS


def _reference(z: np.ndarray, u: np.ndarray, kind: str, k: int, support: str) -> np.ndarray:
    """Per row: the support S as ``support`` picks it (``test_divergences``' reference), then f over S plus the rest
    as one outcome."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    out = []
    for pr, qr in zip(softmax(z), softmax(u), strict=True):
        m = np.zeros(len(pr), dtype=bool)
        m[ref_support(pr, qr, support, k)] = True
        out.append(ref_terms(kind, np.append(pr[m], pr[~m].sum()), np.append(qr[m], qr[~m].sum())))
    return np.array(out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("support", SUPPORTS)
def test_value_and_gradient_match_the_coarsened_reference(kind, support):
    gen = torch.Generator().manual_seed(hash((kind, support)) % 2**31)
    z = torch.randn(6, 13, dtype=torch.float64, generator=gen) * 2
    u = torch.randn(6, 13, dtype=torch.float64, generator=gen) * 2
    got = ktransfer.divergence(z, u, kind, top_k=3, support=support, tail=True, reduction="none")
    np.testing.assert_allclose(got.numpy(), _reference(z.numpy(), u.numpy(), kind, 3, support), rtol=1e-12,
                               atol=1e-14)
    # gradient against central finite differences of the independent reference (S fixed near z)
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ktransfer.divergence(zz, u, kind, top_k=3, support=support, tail=True,
                                                    reduction="sum"), zz)
    h = 1e-6
    fd = np.zeros(z.shape)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            a, b = z.numpy().copy(), z.numpy().copy()
            a[i, j] += h
            b[i, j] -= h
            fd[i, j] = (_reference(a, u.numpy(), kind, 3, support).sum()
                        - _reference(b, u.numpy(), kind, 3, support).sum()) / (2 * h)
    np.testing.assert_allclose(g.numpy(), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_it_is_a_divergence_on_the_coarsening(kind):
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(4, 20, dtype=torch.float64, generator=gen)
    z = torch.randn(4, 20, dtype=torch.float64, generator=gen)
    d = ktransfer.divergence(z, u, kind, top_k=4, support="teacher", tail=True, reduction="none")
    assert (d > 0).all()
    # p agrees with q on S (the teacher's top-4) and on the rest mass, but not inside the rest: zero
    q = torch.softmax(u, -1)
    S = q.topk(4, -1).indices
    p = torch.rand(4, 20, dtype=torch.float64, generator=gen) + 0.1
    rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, S, False)
    p = torch.where(rest, p / (p * rest).sum(-1, keepdim=True) * (q * rest).sum(-1, keepdim=True), q)
    same = ktransfer.divergence(p.log(), u, kind, top_k=4, support="teacher", tail=True, reduction="none")
    assert same.abs().max() < 1e-12
    # the paper's formula (no tail) is zero there too, but it goes negative once mass moves off S; the tail not
    if kind == "reverse_kl":
        plain = ktransfer.divergence(p.log(), u, kind, top_k=4, support="teacher", reduction="none")
        assert plain.abs().max() < 1e-12
        moved = torch.where(rest, p * 2.0, p)
        moved = moved / moved.sum(-1, keepdim=True)  # mass moved off S: the paper's formula goes negative
        assert (ktransfer.divergence(moved.log(), u, kind, top_k=4, support="teacher", reduction="none") < 0).all()
        assert (ktransfer.divergence(moved.log(), u, kind, top_k=4, support="teacher", tail=True,
                                     reduction="none") > 0).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_support_holding_nearly_all_the_mass_stays_accurate(kind):
    """p(S) -> 1: the rest mass is summed over the rest (not 1 - p(S)), so a rest of 1e-30 keeps its digits."""
    z = torch.zeros(1, 10, dtype=torch.float64)
    z[0, :3] = 70.0  # p_rest ~ 7 e^-70 ~ 3e-30
    u = torch.zeros(1, 10, dtype=torch.float64)
    u[0, :3] = 60.0
    got = ktransfer.divergence(z.requires_grad_(True), u, kind, top_k=3, support="learner", tail=True)
    want = _reference(z.detach().numpy(), u.numpy(), kind, 3, "learner")[0]
    assert np.isfinite(float(got)) and float(got) == pytest.approx(want, rel=1e-9, abs=1e-300)
    (g,) = torch.autograd.grad(got, z)
    assert torch.isfinite(g).all()
    z32 = z.detach().float().requires_grad_(True)
    (g32,) = torch.autograd.grad(ktransfer.divergence(z32, u.float(), kind, top_k=3, support="learner", tail=True), z32)
    assert torch.isfinite(g32).all()


def test_tail_in_transfer_loss_and_the_fused_head():
    gen = torch.Generator().manual_seed(3)
    H, V, N = 8, 30, 12
    h = torch.randn(N, H, dtype=torch.float64, generator=gen, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(N, H, dtype=torch.float64, generator=gen)
    Wt = torch.randn(V, H, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    kw = dict(objective="ka", lam=0.7, top_k=5, tail=True)
    want = ktransfer.transfer_loss(h @ W.T, g @ Wt.T, labels, **kw)
    grads = torch.autograd.grad(want.loss, (h, W))
    got = ktransfer.fused_linear_divergence(h, W, g, Wt, "ka", labels=labels, lam=0.7, top_k=5, tail=True)
    got_grads = torch.autograd.grad(got.loss, (h, W))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    plain = ktransfer.transfer_loss(h @ W.T, g @ Wt.T, labels, objective="ka", lam=0.7, top_k=5)
    assert float(want.divergence) != float(plain.divergence)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tail": True}, "tail=True needs a top_k support"),
    ({"tail": True, "top_k": 3, "renormalize": True}, "tail=True and renormalize=True exclude each other"),
])
def test_bad_tail_options_are_named(kwargs, message):
    z, u = torch.randn(2, 9), torch.randn(2, 9)
    with pytest.raises(ValueError, match=message):
        ktransfer.divergence(z, u, "reverse_kl", **kwargs)


def test_a_run_with_objective_tail(shared_data, tmp_path):
    from ktransfer.cli import main
    from ktransfer.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="objective.tail: needs objective.top_k"):
        load_config(None, ["objective.kind=ka", "objective.tail=true"])
    teacher = tmp_path / "teacher"
    base = [f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=100", "data.max_eval_samples=4",
            "data.vocab_size=400", "data.max_tokens=400", "model.preset=tiny", "eval.max_length=6",
            "train.epochs=1", "train.num_threads=1"]
    assert main(["train", *base, "train.max_steps=2", f"train.out_dir={teacher}"]) == 0
    assert main(["train", *base, "train.max_steps=3", "objective.kind=ka", "objective.top_k=4",
                 "objective.tail=true", f"model.teacher={teacher}", f"train.out_dir={tmp_path / 'ka'}"]) == 0
