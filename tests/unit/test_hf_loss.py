"""Hugging Face outputs (``ktransfer.hf_loss``), padded vocabularies (``vocab_size=``) and jsd's end points.

References: Hugging Face's own loss (``model(..., labels=...).loss``, with and without ``num_items_in_batch``) for the
label shift, a float64 log-softmax composition for the sliced vocabularies, and TRL's ``generalized_jsd_loss`` for
beta in [0, 1] where TRL is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import hf_tiny
import pytest
import torch

import ktransfer
from ktransfer.losses import native
from ktransfer.losses.fused_linear import fused_linear_divergence

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(shared_data):
    return hf_tiny.tokenizer(shared_data)


@pytest.fixture(scope="module")
def causal_batch(tok, shared_data):
    rows = hf_tiny.causal_dataset(tok, shared_data, 4, max_length=12)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(params=["kernel", "python"])
def path(request):
    """Run a test on the C++ kernel (float32 on CPU) and on the Python path."""
    native.use_native(request.param == "kernel")
    yield request.param
    native.use_native(True)


def test_importing_ktransfer_never_imports_trl_or_trainer():
    code = ("import sys, ktransfer, ktransfer.integrations; "
            "assert 'trl' not in sys.modules and 'transformers.trainer' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------------------
# The causal shift
# --------------------------------------------------------------------------------------------------------------
def test_shift_labels_moves_targets_left_and_ignores_the_last_position():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert ktransfer.shift_labels(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]


def test_causal_nll_equals_hugging_face_loss_with_and_without_num_items(tok, causal_batch, path):
    model = hf_tiny.gpt2(tok, 0)
    inputs = {k: causal_batch[k] for k in ("input_ids", "attention_mask")}
    labels = causal_batch["labels"]
    ref = model(**inputs, labels=labels)
    (g_ref,) = torch.autograd.grad(ref.loss, model.lm_head.weight)
    out = model(**inputs)
    got = ktransfer.hf_loss(out, None, labels, objective="nll")  # the output class says causal: shifted
    (g_got,) = torch.autograd.grad(got.loss, model.lm_head.weight)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)
    assert int(got.num_tokens) == int((labels[:, 1:] != -100).sum())
    # gradient accumulation: the global token count replaces the local one, as in Hugging Face's loss
    n = torch.tensor(3 * int(got.num_tokens))
    ref_n = model(**inputs, labels=labels, num_items_in_batch=n).loss
    got_n = ktransfer.hf_loss(model(**inputs), None, labels, objective="nll", model=model, num_items_in_batch=n)
    torch.testing.assert_close(got_n.loss, ref_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_n.loss * 3, got.loss, rtol=1e-5, atol=1e-6)


def test_the_unshifted_mistake_is_now_loud(tok, causal_batch):
    model = hf_tiny.gpt2(tok, 0)
    out = model(input_ids=causal_batch["input_ids"], attention_mask=causal_batch["attention_mask"])
    labels = causal_batch["labels"]
    ref = model(**{k: causal_batch[k] for k in ("input_ids", "attention_mask")}, labels=labels).loss
    # the old mistake: raw logits and unshifted labels into transfer_loss score the wrong tokens
    wrong = ktransfer.transfer_loss(out.logits, None, labels, objective="nll").loss
    assert abs(float(wrong.detach()) - float(ref.detach())) > 1e-3
    with pytest.raises(ValueError, match=r"Hugging Face model output: use ktransfer.hf_loss"):
        ktransfer.transfer_loss(out, None, labels, objective="nll")
    with pytest.raises(ValueError, match=r"cannot tell how labels line up with Tensor logits: pass model="):
        ktransfer.hf_loss(out.logits, None, labels, objective="nll")
    with pytest.raises(ValueError, match=r"labels \[4, \d+\] must have the logits' positions"):
        ktransfer.hf_loss(out, None, labels[:, 1:], objective="nll")  # already sliced labels: refused
    by_flag = ktransfer.hf_loss(out.logits, None, labels, objective="nll", labels_shifted=False).loss
    by_model = ktransfer.hf_loss(out.logits, None, labels, objective="nll", model=model).loss
    torch.testing.assert_close(by_flag, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_model, ref, rtol=1e-5, atol=1e-6)


def test_seq2seq_labels_are_not_shifted(tok, causal_batch):
    model = hf_tiny.marian(tok, 0)
    labels = causal_batch["labels"]
    inputs = {"input_ids": causal_batch["input_ids"], "attention_mask": causal_batch["attention_mask"]}
    ref = model(**inputs, labels=labels)
    got = ktransfer.hf_loss(ref, None, labels, objective="nll")
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert int(got.num_tokens) == int((labels != -100).sum())
    by_model = ktransfer.hf_loss(ref.logits, None, labels, objective="nll", model=model.config)
    torch.testing.assert_close(by_model.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_hf_loss_divergence_counts_the_same_positions_as_the_shifted_call(tok, causal_batch):
    learner, teacher = hf_tiny.gpt2(tok, 0), hf_tiny.gpt2(tok, 1, n_layer=1)
    inputs = {k: causal_batch[k] for k in ("input_ids", "attention_mask")}
    out, t_out = learner(**inputs), teacher(**inputs)
    got = ktransfer.hf_loss(out, t_out, causal_batch["labels"], objective="ka", lam=0.3, top_k=4)
    labels = causal_batch["labels"][:, 1:]
    ref = ktransfer.transfer_loss(out.logits[:, :-1], t_out.logits[:, :-1], labels, objective="ka", lam=0.3, top_k=4)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.divergence, ref.divergence, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# Padded vocabularies
# --------------------------------------------------------------------------------------------------------------
def _ref_kl(z, u, labels=None, lam=1.0):
    """float64 mean over positions of KL(q || p) (and the NLL mix) on the given logits."""
    logp, logq = z.double().log_softmax(-1), u.double().log_softmax(-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    if labels is None:
        return kl.mean()
    keep = labels != -100
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return ((1 - lam) * nll + lam * kl)[keep].mean()


def test_padded_vocabularies_compare_the_shared_ids(path):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 70, generator=g, requires_grad=True)  # learner padded to 70 rows
    u = torch.randn(3, 5, 64, generator=g) * 2  # teacher padded to 64, tokenizer has 60 ids
    with pytest.raises(ValueError, match=r"vocabulary sizes differ.*pass vocab_size="):
        ktransfer.divergence(z, u, "forward_kl")
    got = ktransfer.divergence(z, u, "forward_kl", vocab_size=60)
    (grad,) = torch.autograd.grad(got, z)
    zr = z.detach()[..., :60].double().requires_grad_(True)
    ref = _ref_kl(zr, u[..., :60])
    (gref,) = torch.autograd.grad(ref, zr)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad[..., :60].double(), gref, rtol=1e-5, atol=1e-7)
    assert bool((grad[..., 60:] == 0).all())
    labels = torch.randint(0, 60, (3, 5), generator=g)
    labels[0, :2] = -100
    out = ktransfer.transfer_loss(z, u, labels, objective="kd", lam=0.4, vocab_size=60)
    torch.testing.assert_close(out.loss.double(), _ref_kl(z.detach()[..., :60], u[..., :60], labels, 0.4),
                               rtol=1e-6, atol=1e-7)
    labels[1, 1] = 65
    with pytest.raises(ValueError, match=r"label 65 is outside the vocabulary \[0, 60\)"):
        ktransfer.transfer_loss(z, u, labels, objective="kd", vocab_size=60)
    with pytest.raises(ValueError, match=r"vocab_size=65 exceeds the teacher_logits's 64 vocabulary rows"):
        ktransfer.divergence(z, u, "forward_kl", vocab_size=65)


def test_fused_head_with_padded_vocabularies_equals_sliced_logits():
    g = torch.Generator().manual_seed(1)
    h, ht = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 24, generator=g)
    head, t_head = torch.nn.Linear(16, 70), torch.nn.Linear(24, 64)
    labels = torch.randint(0, 60, (2, 6), generator=g)
    got = fused_linear_divergence(h, head, ht, t_head, "kd", labels=labels, lam=0.5, vocab_size=60)
    got.loss.backward()
    g_w = head.weight.grad.clone()
    head.weight.grad = None
    z, u = (h @ head.weight.T + head.bias)[..., :60], (ht @ t_head.weight.T + t_head.bias)[..., :60]
    ref = ktransfer.transfer_loss(z, u.detach(), labels, objective="kd", lam=0.5)
    ref.loss.backward()
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_w, head.weight.grad, rtol=1e-4, atol=1e-6)
    assert bool((g_w[60:] == 0).all())


# --------------------------------------------------------------------------------------------------------------
# jsd's end points
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [None, 3])
def test_jsd_end_points_are_forward_and_reverse_kl(path, top_k):
    g = torch.Generator().manual_seed(2)
    z, u = torch.randn(4, 9, 50, generator=g), torch.randn(4, 9, 50, generator=g)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        got = ktransfer.divergence(z, u, "jsd", beta=beta, top_k=top_k, temperature=2.0)
        ref = ktransfer.divergence(z, u, kind, top_k=top_k, support=None if top_k is None else "union",
                                   temperature=2.0)
        assert float(got) == float(ref)
    # the interior formula shrinks to 0 towards both ends: the end points are not its limits
    near0 = ktransfer.divergence(z, u, "jsd", beta=1e-6)
    assert 0 < float(near0) < 1e-4 * float(ktransfer.divergence(z, u, "forward_kl"))


def _trl_loss():
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_jsd_matches_trl_for_beta_in_closed_interval(path, beta, T):
    trl_jsd = _trl_loss()
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32 if path == "kernel" else torch.float64
    z = (torch.randn(3, 7, 40, generator=g, dtype=dtype) * 2).requires_grad_(True)
    u = torch.randn(3, 7, 40, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, 40, (3, 7), generator=g)
    labels[0, :3] = -100
    ref = trl_jsd(z, u, labels=labels, beta=beta, temperature=T)
    (g_ref,) = torch.autograd.grad(ref, z)
    got = ktransfer.transfer_loss(z, u, labels, objective="jsd", lam=1.0, beta=beta, temperature=T)
    (g_got,) = torch.autograd.grad(got.loss, z)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.loss.to(dtype), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g_got, g_ref, rtol=tol * 10, atol=tol)
