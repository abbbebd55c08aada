"""Training at LLM scale, the parts that run on a CPU: gradient checkpointing gives the loss and gradients of the
plain pass (both families), a bf16 teacher gives the float32 loss to bf16 precision, a bf16 learner trains and its
checkpoint keeps its dtype. Memory is measured in ``bench/gradient_checkpointing.py``, not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ktransfer.training.config import load_config
from ktransfer.training.train import compute_loss, setup

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seq2seq_teacher(small_tokenizer, tmp_path_factory) -> Path:
    from ktransfer.models.family import build_model

    folder = tmp_path_factory.mktemp("marian") / "teacher"
    torch.manual_seed(0)
    build_model("tiny", small_tokenizer, dropout=0.0).save_pretrained(folder)
    small_tokenizer.save(folder)
    return folder


def _run(shared_data, tmp_path, teacher: Path, preset: str, *extra):
    cfg = load_config(None, [f"data.corpus={shared_data / 'multi30k-de-en'}", f"model.teacher={teacher}",
                             f"model.preset={preset}", "model.dropout=0.0", "objective.kind=kd",
                             "objective.divergence_weight=0.5", "data.max_train_samples=64",
                             "data.max_eval_samples=4", "data.max_tokens=400",
                             "data.max_length=40", "train.seed=3", f"train.out_dir={tmp_path}", *extra])
    return setup(cfg)


def _loss_and_grads(run) -> tuple[float, dict[str, torch.Tensor]]:
    from ktransfer.training.train import collate_batch

    batch = collate_batch(run, run.data.train_ids, run.data.sampler.epoch_batches(0)[0])
    run.model.zero_grad(set_to_none=True)
    out = compute_loss(run, batch)
    out.loss.backward()
    return float(out.loss), {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, shared_data, tmp_path, llama_folder,
                                                                  seq2seq_teacher):
    teacher, preset = (seq2seq_teacher, "tiny") if family == "seq2seq" else (llama_folder, "llama-tiny")
    plain = _run(shared_data, tmp_path / "plain", teacher, preset)
    ckpt = _run(shared_data, tmp_path / "ckpt", teacher, preset, "train.gradient_checkpointing=true")
    assert ckpt.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    ckpt.model.load_state_dict(plain.model.state_dict())  # the same weights (two builds draw the same, but be sure)
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(ckpt)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 4
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_a_bf16_teacher_gives_the_float32_loss_to_bf16_precision(shared_data, tmp_path, llama_folder):
    full = _run(shared_data, tmp_path / "f32", llama_folder, "llama-tiny", "model.teacher_dtype=float32")
    half = _run(shared_data, tmp_path / "bf16", llama_folder, "llama-tiny", "model.teacher_dtype=bfloat16")
    assert next(half.teacher.parameters()).dtype == torch.bfloat16
    assert next(full.teacher.parameters()).dtype == torch.float32  # auto on a CPU: float32
    half.model.load_state_dict(full.model.state_dict())
    a, b = _loss_and_grads(full)[0], _loss_and_grads(half)[0]
    assert a != b and b == pytest.approx(a, rel=2e-2)  # bf16 has 8 bits of mantissa: ~0.4% per logit


def test_a_bf16_learner_trains_and_keeps_its_dtype(shared_data, tmp_path, llama_folder):
    from ktransfer.cli import main
    from ktransfer.models.family import load_model

    out = tmp_path / "run"
    assert main(["train", f"data.corpus={shared_data / 'multi30k-de-en'}", f"model.teacher={llama_folder}",
                 "model.preset=llama-tiny", "model.dtype=bfloat16", "objective.kind=kd", "data.max_train_samples=64",
                 "data.max_eval_samples=4", "data.max_tokens=400", "eval.max_length=8", "train.max_steps=3",
                 "train.epochs=1", f"train.out_dir={out}"]) == 0
    model, _ = load_model(out / "checkpoints" / "last")
    assert next(model.parameters()).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------------------
# LoRA learners (peft)
# --------------------------------------------------------------------------------------------------------------
def _lora_args(shared_data, base: Path, out: Path, steps: int) -> list[str]:
    return ["train", f"data.corpus={shared_data / 'multi30k-de-en'}", f"model.init={base}", "model.lora_r=4",
            "model.lora_alpha=8", "objective.kind=nll", "data.max_train_samples=96", "data.max_eval_samples=4",
            "data.max_tokens=400", "data.max_length=40", "eval.max_length=6", "optim.lr=1e-2",
            f"train.max_steps={steps}", "train.epochs=50", "train.log_every=1", "train.save_every=1",
            "train.num_threads=1", f"train.out_dir={out}"]


def test_a_lora_learner_trains_only_its_adapters_and_merges(shared_data, tmp_path, llama_folder):
    pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ktransfer.cli import main
    from ktransfer.models import adapters
    from ktransfer.models.family import load_model

    run = tmp_path / "run"
    assert main(_lora_args(shared_data, llama_folder, run, 12)) == 0
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # it learns
    last = run / "checkpoints" / "last"
    assert (last / "adapter_model.safetensors").is_file() and not (last / "model.safetensors").is_file()
    # the base weights are bit for bit those of the base folder; only lora_A / lora_B were trained
    model, tok = load_model(last)
    assert adapters.is_lora(model)
    base = load_file(llama_folder / "model.safetensors")
    state = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
             for k, v in model.state_dict().items() if "lora_" not in k}
    assert base.keys() <= state.keys() | {"lm_head.weight"}
    for name, w in base.items():
        if name in state:
            assert torch.equal(state[name], w), name
    saved = load_file(last / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved) and any(v.abs().sum() > 0 for k, v in saved.items()
                                                              if "lora_B" in k)
    # merged (the exported folder, read by plain transformers) and unmerged give the same logits
    assert main(["export", str(last), "--out", str(tmp_path / "merged")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([tok.encode("Ein Mann fährt Fahrrad.")])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(ids).logits, load_model(llama_folder)[0](ids).logits)


def test_a_lora_run_resumes_exactly(shared_data, tmp_path, llama_folder):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from ktransfer.cli import main

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_lora_args(shared_data, llama_folder, straight, 6)) == 0
    assert main(_lora_args(shared_data, llama_folder, resumed, 3)) == 0
    assert main(_lora_args(shared_data, llama_folder, resumed, 6)) == 0  # continues from checkpoints/last
    a = load_file(straight / "checkpoints/last/adapter_model.safetensors")
    b = load_file(resumed / "checkpoints/last/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_a_preset_is_refused(shared_data, tmp_path, capsys):
    pytest.importorskip("peft")
    from ktransfer.cli import main

    args = _lora_args(shared_data, Path("unused"), tmp_path / "run", 2)
    args = [a for a in args if not a.startswith("model.init=")] + ["model.preset=gpt2-tiny"]
    assert main(args) == 2
    assert "LoRA adapts pretrained weights" in capsys.readouterr().err and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------------------
# The fused head for causal models
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize(("objective", "top_k"), [("kd", None), ("ka", 4), ("nll", None)])
def test_causal_fused_head_equals_materialised_logits(preset, objective, top_k, shared_data, llama_folder):
    """``fused_model_loss`` on a causal batch (with ``logits_to_keep``) against ``transfer_loss`` on the logits:
    value and every gradient."""
    from ktransfer import transfer_loss
    from ktransfer.losses.fused_linear import fused_model_loss
    from ktransfer.models.causal import CausalFamily
    from ktransfer.models.family import build_model, load_model

    teacher, tok = load_model(llama_folder)
    torch.manual_seed(0)
    learner = build_model(preset, tok, dropout=0.0).train()
    family = CausalFamily()
    family.prepare(learner, tok, src_lang="de", tgt_lang="en")
    de, en = ((shared_data / f"multi30k-de-en/train.{lang}").read_text().splitlines()[:6] for lang in ("de", "en"))
    pairs = list(zip(de, en, strict=True))
    src, tgt = family.encode(pairs, tok, 100, model=learner)
    inputs, labels = family.model_inputs(family.collate(src, tgt, learner, tok))
    assert inputs["logits_to_keep"] < inputs["input_ids"].shape[1]  # the prompt columns are skipped
    kw = dict(objective=objective, lam=0.6, top_k=top_k)
    params = [p for p in learner.parameters() if p.requires_grad]
    V = tok.vocab_size
    logits = learner(**inputs, use_cache=False).logits[..., :V]
    with torch.no_grad():
        t_logits = teacher(**inputs, use_cache=False).logits[..., :V]
    want = transfer_loss(logits, t_logits, labels, **kw)
    want_grads = torch.autograd.grad(want.loss, params)
    got = fused_model_loss(learner, teacher, inputs, labels, **kw)
    got_grads = torch.autograd.grad(got.loss, params)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_fused_head_refuses_logit_softcapping_by_name(llama_folder):
    from ktransfer.losses.fused_linear import output_head
    from ktransfer.models.family import load_model

    model, _ = load_model(llama_folder)
    body, head, _ = output_head(model)
    assert body is model.model and head is model.lm_head
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30.0\): the fused head would leave that out"):
        output_head(model)


def test_causal_training_with_the_fused_head_equals_unfused(shared_data, tmp_path, llama_folder):
    from safetensors.torch import load_file

    from ktransfer.cli import main

    def args(out, fused):
        return ["train", f"data.corpus={shared_data / 'multi30k-de-en'}", f"model.teacher={llama_folder}",
                "model.preset=llama-tiny", "objective.kind=ka", "objective.top_k=4", "data.max_train_samples=48",
                "data.max_eval_samples=4", "data.max_tokens=400", "eval.max_length=6", "train.max_steps=3",
                "train.epochs=1", f"train.fused_head={str(fused).lower()}", f"train.out_dir={out}"]

    assert main(args(tmp_path / "plain", False)) == 0 and main(args(tmp_path / "fused", True)) == 0
    a = load_file(tmp_path / "plain/checkpoints/last/model.safetensors")
    b = load_file(tmp_path / "fused/checkpoints/last/model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_causal_training_from_the_teacher_cache_equals_the_live_teacher(shared_data, tmp_path, llama_folder):
    """kd on the teacher's top-4 for a causal learner: the cached teacher (rows keyed by response position, read at
    each row's own column of the scored window) gives the weights of the live teacher."""
    from safetensors.torch import load_file

    from ktransfer.cli import main

    def args(out, *extra):
        return ["train", f"data.corpus={shared_data / 'multi30k-de-en'}", f"model.teacher={llama_folder}",
                "model.preset=llama-tiny", "objective.kind=kd", "objective.top_k=4", "data.max_train_samples=48",
                "data.max_eval_samples=4", "data.max_tokens=400", "eval.max_length=6", "train.max_steps=4",
                "train.epochs=1", f"train.out_dir={out}", *extra]

    assert main(args(tmp_path / "live")) == 0
    assert main(args(tmp_path / "cached", f"train.teacher_cache={tmp_path / 'cache'}")) == 0
    assert (tmp_path / "cache" / "manifest.json").is_file()
    a = load_file(tmp_path / "live/checkpoints/last/model.safetensors")
    b = load_file(tmp_path / "cached/checkpoints/last/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
