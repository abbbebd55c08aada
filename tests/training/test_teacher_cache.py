"""The teacher cache: its rows are the teacher's top-K log-probabilities (float64 reference), the cached path gives
the loss and gradients of the live teacher for divergences on the teacher's top-k support, a stale or corrupt cache
is refused, objectives that need q off the cache are refused, and training with the cache equals training without.

A tiny random Marian teacher (``final_logits_bias`` drawn with std 3 so that q is peaked) on real Multi30k pairs.
"""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch
import torch

from ktransfer import transfer_loss
from ktransfer.data.batching import collate, encode_pairs
from ktransfer.data.corpora import read_split
from ktransfer.training import teacher_cache as tc
from ktransfer.training.config import ConfigError, load_config
from ktransfer.training.train import train


def _teacher(tokenizer, seed=0):
    from ktransfer.models.family import build_model

    torch.manual_seed(seed)
    model = build_model("tiny", tokenizer).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 3.0)
    return model


@pytest.fixture(scope="module")
def setting(shared_data):
    from ktransfer.models.tokenizer import train_tokenizer

    pairs = read_split(shared_data / "multi30k-de-en", "train", "de", "en")[:60]
    tok = train_tokenizer([x for p in pairs for x in p], vocab_size=300)
    teacher = _teacher(tok)
    ids = encode_pairs(pairs, tok, 64, log=lambda m: None)
    return tok, teacher, ids


def _build(tmp_path, setting, name="cache", **kw):
    tok, teacher, ids = setting
    opts = {"k": 8, "temperature": 1.0, "max_tokens": 200, "shard_examples": 25, **kw}
    from ktransfer.models.family import SEQ2SEQ

    return tc.build(tmp_path / name, teacher, ids, family=SEQ2SEQ, model=teacher, tokenizer=tok, **opts)


def _live(setting, idx):
    tok, teacher, (src, tgt) = setting
    b = collate([src[i] for i in idx], [tgt[i] for i in idx], tok.pad_id, teacher.config.decoder_start_token_id)
    with torch.no_grad():
        u = teacher(**{k: b[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}).logits
    return u, b["labels"]


def test_rows_are_the_teachers_top_k(tmp_path, setting):
    cache = _build(tmp_path, setting, temperature=2.0)
    assert len(cache.manifest["shards"]) == 3  # 60 examples (or a few fewer) in shards of 25
    _, _, (src, tgt) = setting
    idx = [7, 30, 52]  # one example from each shard
    u, labels = _live(setting, idx)
    logq = torch.log_softmax(u.double() / 2.0, dim=-1)  # float64 reference
    for b, i in enumerate(idx):
        n = len(tgt[i])
        rows = slice(int(cache.offsets[i]), int(cache.offsets[i + 1]))
        assert rows.stop - rows.start == n
        top = logq[b, :n].topk(8, dim=-1)
        assert torch.equal(cache.ids[rows].long(), top.indices)
        torch.testing.assert_close(cache.logq[rows].double(), top.values, rtol=0, atol=1e-5)
        torch.testing.assert_close(cache.lse[rows].double(), torch.logsumexp(u[b, :n].double() / 2.0, -1),
                                   rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("objective,top_k,temperature,options", [
    ("kd", 8, 1.0, {}),
    ("kd", 3, 2.0, {"renormalize": True}),
    ("skew_forward_kl", 5, 1.0, {}),
    ("jsd", 4, 1.0, {"support": "teacher"}),
    ("kd", 8, 1.0, {"tail": True}),  # the rest mass 1 - q(S) comes from the cached log q of S alone
    ("skew_forward_kl", 3, 2.0, {"tail": True}),
])
def test_cached_loss_and_gradient_equal_live_teacher(tmp_path, setting, objective, top_k, temperature, options):
    cache = _build(tmp_path, setting, temperature=temperature)
    idx = [41, 2, 19, 33, 8]  # any order: rows are keyed by example index
    u, labels = _live(setting, idx)
    z = (2.0 * torch.randn(*u.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    kw = dict(objective=objective, lam=0.7, top_k=top_k, temperature=temperature, label_smoothing=0.1, **options)
    want = transfer_loss(z, u, labels, **kw)
    (g_want,) = torch.autograd.grad(want.loss, z)
    got = transfer_loss(z, cache.teacher_logits(torch.tensor(idx), labels.shape[1]), labels, **kw)
    (g_got,) = torch.autograd.grad(got.loss, z)
    assert want.divergence > 0.05
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.divergence, want.divergence, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_k_of_stand_in_logits_are_the_cached_ids_for_a_peaked_teacher(temperature):
    """q(S_K) rounds to 1 and the K-th probability is 1e-40: the residual must still stay below it."""
    # row 1: a flat tail, 0.56 left for 9 tokens (0.062 each) close to q_K = 0.07
    logq = torch.stack([torch.tensor([0.0, -20.0, -92.0]), torch.tensor([0.3, 0.07, 0.07]).log()])
    ids = torch.tensor([[4, 0, 9], [7, 8, 1]], dtype=torch.int32)
    V = 12
    cache = tc.TeacherCache(path=None, manifest={"k": 3, "temperature": temperature, "vocab_size": V},
                            offsets=torch.tensor([0, 2]), ids=ids, logq=logq, lse=torch.zeros(2))
    u = cache.teacher_logits(torch.tensor([0]), 2)
    top = (u / temperature).topk(3, dim=-1)
    assert torch.equal(top.indices.sort(-1).values, ids.long().sort(-1).values.unsqueeze(0))
    assert torch.allclose(top.values, logq.unsqueeze(0), atol=1e-5)
    q = torch.softmax(u[0].double() / temperature, -1)  # row 1: the residual fills the rest of the mass
    torch.testing.assert_close(q[1].sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(q[1, ids[1].long()], logq[1].double().exp(), rtol=1e-5, atol=0)


def test_float16_storage_error(tmp_path, setting):
    """float16 log-probabilities: the stored values are the float32 ones rounded (relative error <= 2**-11), and
    the forward KL moves by at most sum_S q |d log q| <= 2**-11 max |log q| (measured here: 2e-6 relative)."""
    c32 = _build(tmp_path, setting, name="c32")
    c16 = _build(tmp_path, setting, name="c16", dtype=torch.float16)
    assert c16.manifest["dtype"] == "float16" and c16.logq.dtype == torch.float16
    assert torch.equal(c16.logq, c32.logq.half()) and torch.equal(c16.ids, c32.ids)
    assert tc.disk_bytes(c16.path) < tc.disk_bytes(c32.path)
    idx = list(range(0, 50, 3))
    u, labels = _live(setting, idx)
    z = torch.randn(*u.shape, generator=torch.Generator().manual_seed(2))
    kw = dict(objective="kd", lam=1.0, top_k=8)
    d32 = transfer_loss(z, c32.teacher_logits(torch.tensor(idx), labels.shape[1]), labels, **kw).divergence
    d16 = transfer_loss(z, c16.teacher_logits(torch.tensor(idx), labels.shape[1]), labels, **kw).divergence
    bound = 2.0**-11 * float(c32.logq.abs().max())
    assert 0 < abs(float(d16 - d32)) <= bound
    print(f"float16 storage: KD {float(d32):.6f} -> {float(d16):.6f}, relative error {abs(float(d16 / d32 - 1)):.1e}")


def test_stale_and_corrupt_caches_are_refused(tmp_path, setting):
    cache = _build(tmp_path, setting, key={"teacher_sha256": "aaa", "teacher_path": "/x", "corpus": "m30k"})
    ok = {"k_min": 8, "temperature": 1.0, "num_examples": cache.manifest["num_examples"],
          "key": {"teacher_sha256": "aaa", "teacher_path": "/moved", "corpus": "/data/m30k"}}
    tc.load(cache.path, expect=ok)  # a moved teacher or corpus with the same digests is the same
    with pytest.raises(tc.TeacherCacheError, match=r"stale.*temperature 1.0 != 2.0"):
        tc.load(cache.path, expect={**ok, "temperature": 2.0})
    with pytest.raises(tc.TeacherCacheError, match="K 8 < objective.top_k 9"):
        tc.load(cache.path, expect={**ok, "k_min": 9})
    with pytest.raises(tc.TeacherCacheError, match="teacher_sha256 'aaa' != 'bbb'"):
        tc.load(cache.path, expect={**ok, "key": {**ok["key"], "teacher_sha256": "bbb"}})
    with pytest.raises(tc.TeacherCacheError, match="already exists"):
        _build(tmp_path, setting)
    shard = cache.path / "shard-00001.safetensors"
    tensors = safetensors.torch.load_file(shard)
    tensors["logq"][0, 0] += 1.0
    safetensors.torch.save_file(tensors, shard)
    with pytest.raises(tc.TeacherCacheError, match="shard-00001.safetensors: missing or corrupt"):
        tc.load(cache.path)
    (cache.path / "manifest.json").unlink()
    with pytest.raises(tc.TeacherCacheError, match="not a ktransfer teacher cache"):
        tc.load(cache.path)


def test_which_objectives_are_exact():
    assert tc.exact_for("kd", 8, None) is None
    assert tc.exact_for("forward_kl", 8, "teacher", k=8) is None
    assert tc.exact_for("tvd", 4, "teacher") is None
    assert "exceeds the cache's K=8" in tc.exact_for("kd", 9, None, k=8)
    assert "full vocabulary" in tc.exact_for("kd", None, None)
    assert "reverse_kl" in tc.exact_for("ka", 8, None)
    assert "reverse_kl" in tc.exact_for("half", 8, None)
    assert "forward_kl" in tc.exact_for("kd", 8, "union")
    assert "no teacher" in tc.exact_for("nll", None, None)


# --------------------------------------------------------------------------------------------------------------
# In training
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_dir(shared_data, small_tokenizer, tmp_path_factory):
    from ktransfer.models.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("teacher") / "ckpt"
    save_checkpoint(out, model=_teacher(small_tokenizer, seed=5), tokenizer=small_tokenizer, config=None)
    return out


def _cfg(shared_data, out, teacher_dir, *extra):
    return load_config(None, [
        f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=120", "data.max_eval_samples=8",
        "data.max_tokens=300", "model.preset=tiny", "eval.max_length=12", "optim.lr=1e-3", "train.num_threads=1",
        "train.seed=3", "train.epochs=1", "train.max_steps=4", f"train.out_dir={out}", f"model.teacher={teacher_dir}",
        "objective.divergence_weight=0.6", "objective.top_k=6", *extra])


def test_training_with_cache_equals_training_without(shared_data, teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    runs = {}
    for name, extra in (("live", ()), ("cached", (f"train.teacher_cache={cache}",)),
                        ("reused", (f"train.teacher_cache={cache}",))):
        runs[name] = train(_cfg(shared_data, tmp_path / name, teacher_dir, "objective.kind=kd",
                                "objective.temperature=1.5", *extra))
        if name == "cached":
            built = (cache / "manifest.json").stat().st_mtime_ns
    assert (cache / "manifest.json").stat().st_mtime_ns == built  # the second cached run reused it
    assert "teacher cache: building" in (tmp_path / "cached" / "train.log").read_text()
    reused_log = (tmp_path / "reused" / "train.log").read_text()
    assert "teacher cache: building" not in reused_log and "the teacher runs for validation only" in reused_log
    live = safetensors.torch.load_file(tmp_path / "live" / "checkpoints/last/model.safetensors")
    for name in ("cached", "reused"):
        got = safetensors.torch.load_file(tmp_path / name / "checkpoints/last/model.safetensors")
        assert got.keys() == live.keys()
        for key in live:
            torch.testing.assert_close(got[key], live[key], rtol=0, atol=1e-5, msg=key)
        v, w = runs[name]["valid"], runs["live"]["valid"]
        assert v["loss"] == pytest.approx(w["loss"], rel=1e-5) and v["bleu"] == w["bleu"]


@pytest.mark.parametrize("extra,match", [
    (("objective.kind=ka",), r"objective.kind='ka'.*reverse_kl"),
    (("objective.kind=kd", "objective.top_k=null"), "full vocabulary"),
    (("objective.kind=kd", "objective.prefix=learner"), "objective.prefix='learner'"),
    (("objective.kind=kd", "train.fused_head=true"), "train.fused_head"),
])
def test_unsupported_settings_are_refused(shared_data, teacher_dir, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        train(_cfg(shared_data, tmp_path / "run", teacher_dir, f"train.teacher_cache={tmp_path / 'c'}", *extra))
    assert not (tmp_path / "c").exists()


def test_stale_cache_is_refused_in_setup(shared_data, teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    train(_cfg(shared_data, tmp_path / "a", teacher_dir, "objective.kind=kd", "train.max_steps=1",
               f"train.teacher_cache={cache}"))
    with pytest.raises(ConfigError, match=r"train.teacher_cache: .*stale.*temperature 1.0 != 2.0"):
        train(_cfg(shared_data, tmp_path / "b", teacher_dir, "objective.kind=kd", "objective.temperature=2",
                   f"train.teacher_cache={cache}"))
    with pytest.raises(ConfigError, match=r"stale.*ids_sha256 .*train_limit 120 != 100"):
        train(_cfg(shared_data, tmp_path / "c", teacher_dir, "objective.kind=kd", "data.max_train_samples=100",
                   f"train.teacher_cache={cache}"))
    shutil.rmtree(cache)
