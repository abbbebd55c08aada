"""On-policy distillation of a small Llama on chat data: a ktransfer training step against TRL's ``GKDTrainer`` step,
on-policy (``lmbda=1``: the learner samples each completion, the divergence is taken on the samples) and off-policy
(``lmbda=0``: the reference completion), seconds per step as a ratio in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/on_policy.py --markdown          # ~5-10 minutes on 2 idle cores
    .venv/bin/python bench/on_policy.py --steps 2 --warmup 1                   # a quick smoke run

Built offline: a byte-level BPE with a 32,000-token vocabulary and a chat template, trained on the German and English
training sentences of ``$KTRANSFER_DATA`` (multi30k, wmt-news, tatoeba); a Llama teacher and learner from a
``LlamaConfig`` with that vocabulary (``--teacher-layers`` / ``--learner-layers`` x ``--hidden``; untrained: speed does
not depend on the weights, and an untrained model samples to the length limit on both sides); chat data
``[user: "Translate to English: " + German, assistant: English]`` from Multi30k.

The same ``--batch`` conversations go through every row at step k (rows interleaved, the order rotated from step to
step, so load from other processes hits them alike); the first ``--warmup`` steps are not timed. Both sides use the
forward KL KL(teacher || learner) on the completion (ktransfer ``objective.kind=kd``,
``objective.divergence_weight=1``; GKD
``beta=0``), sampling temperature ``--temperature``, top-k and top-p off, ``--max-new-tokens`` tokens at most, AdamW,
gradient clipping at 1, fp32 on CPU:

* ``ktransfer on``: ``train.train_step`` with ``objective.prefix=learner`` and ``objective.sample_length_scale=null``
  (the cap alone, as GKD): sampling (``ktransfer.models.sampling``), learner forward/backward over the sampled rows,
  teacher forward, update.
* ``TRL GKD lmbda=1``: ``GKDTrainer.training_step`` (``model.generate``, student and teacher forward over the whole
  sequences, ``generalized_jsd_loss``, backward) + gradient clipping + ``optimizer.step``.
* ``ktransfer off`` / ``TRL GKD lmbda=0``: the same on the reference completion.
* ``ktransfer off, fused head`` (``--fused-head``): ``ktransfer off`` with ``train.fused_head=true`` (the output layer
  fused with the loss, ``ktransfer.losses.fused_linear``: no [B, T, V] logits of either model are held).

``ratio`` = t(ktransfer) / t(TRL) per step on the same batch, median [interquartile range].
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import cpu_model, load_average  # noqa: E402  (bench/pipeline.py)

SPECIAL = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPORA = ("multi30k-de-en", "wmt-news-de-en", "tatoeba-de-en")


def _summary(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def build_tokenizer(data: Path, vocab_size: int):
    """Byte-level BPE of ``vocab_size`` tokens on the corpora's training sentences, with pad/eos and a chat
    template (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = []
    for corpus in CORPORA:
        for lang in ("de", "en"):
            path = data / corpus / f"train.{lang}"
            if path.is_file():
                lines += path.read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=256), len(lines)


def build_llama(tok, layers: int, hidden: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, attention_dropout=0.0, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("KTRANSFER_DATA", str(REPO_ROOT.parent / "shared" / "data")),
                        help="folder of the corpora (default: $KTRANSFER_DATA or ../shared/data)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary (default: 32000)")
    parser.add_argument("--hidden", type=int, default=256, help="Llama hidden size of both models (default: 256)")
    parser.add_argument("--teacher-layers", type=int, default=4, help="teacher layers (default: 4)")
    parser.add_argument("--learner-layers", type=int, default=2, help="learner layers (default: 2)")
    parser.add_argument("--batch", type=int, default=8, help="conversations per step (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="sampled tokens at most (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default: 0.9)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--fused-head", action="store_true",
                        help="add an off-policy row with train.fused_head=true (output layer fused with the loss)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", metavar="PATH", help="also write the per-step times to PATH")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    import trl
    from datasets import Dataset

    try:  # TRL >= 1.0 keeps GKD under trl.experimental
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # older TRL
        from trl import GKDConfig, GKDTrainer

    from ktransfer.training.config import load_config
    from ktransfer.training.train import collate_batch, setup, train_step

    data = Path(args.data)
    load_before = load_average()
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    t0 = time.perf_counter()
    tok, n_lines = build_tokenizer(data, args.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="ktransfer-on-policy-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    for name, layers, seed in (("teacher", args.teacher_layers, 1), ("learner", args.learner_layers, 2)):
        build_llama(tok, layers, args.hidden, seed).save_pretrained(work / name)
        tok.save_pretrained(work / name)
    de = (data / "multi30k-de-en" / "train.de").read_text(encoding="utf-8").splitlines()
    en = (data / "multi30k-de-en" / "train.en").read_text(encoding="utf-8").splitlines()
    n = args.batch * (args.warmup + args.steps)
    chats = [{"messages": [{"role": "user", "content": f"Translate to English: {d}"},
                           {"role": "assistant", "content": e}]} for d, e in zip(de[:n + 20], en[:n + 20],
                                                                                  strict=True)]
    (work / "chat").mkdir()
    for split, rows in (("train", chats[:n]), ("valid", chats[n:])):
        (work / "chat" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"setup: BPE {len(tok)} on {n_lines} sentences, {n} conversations ({time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)

    def ktransfer_run(prefix: str, *extra: str):
        overrides = [f"data.corpus={work / 'chat'}", f"model.preset={work / 'learner'}",
                     f"model.teacher={work / 'teacher'}", "objective.kind=kd", "objective.divergence_weight=1",
                     f"objective.prefix={prefix}", f"objective.sample_temperature={args.temperature}",
                     f"objective.sample_max_length={args.max_new_tokens}", "objective.sample_length_scale=null",
                     "model.dropout=0", "optim.clip_norm=1.0", "train.seed=0", f"train.num_threads={args.threads}",
                     "train.device=cpu", f"train.out_dir={work / ('kt-' + prefix + '-'.join(('',) + extra))}",
                     "data.max_length=256", *extra]
        return setup(load_config(None, overrides))

    def trl_trainer(lmbda: float):
        config = GKDConfig(output_dir=str(work / f"trl-{lmbda}"), per_device_train_batch_size=args.batch,
                           learning_rate=1e-4, lmbda=lmbda, beta=0.0, temperature=args.temperature,
                           max_new_tokens=args.max_new_tokens, max_length=256, report_to=[], use_cpu=True,
                           bf16=False, fp16=False, save_strategy="no", logging_strategy="no", seed=0,
                           dataloader_num_workers=0, disable_dropout=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(work / "learner")
        teacher = transformers.AutoModelForCausalLM.from_pretrained(work / "teacher")
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=config, processing_class=tok,
                             train_dataset=Dataset.from_list(chats[:n]))
        trainer.create_optimizer_and_scheduler(num_training_steps=args.warmup + args.steps)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which we do not run
        return trainer

    def kt_step(run):
        def step(k):
            batch = collate_batch(run, run.data.train_ids, list(range(k * args.batch, (k + 1) * args.batch)))
            result = train_step(run, [batch])
            if not result["finite"]:
                raise RuntimeError(f"non-finite ktransfer step: {result}")
        return step

    def trl_step(trainer):
        def step(k):
            inputs = trainer.data_collator(chats[k * args.batch:(k + 1) * args.batch])
            trainer.model.train()
            trainer.training_step(trainer.model, inputs)
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.model.zero_grad(set_to_none=True)
        return step

    kt_on, kt_off = ktransfer_run("learner"), ktransfer_run("reference")
    if len(kt_on.data.train_ids[0]) < n:
        parser.error(f"ktransfer kept {len(kt_on.data.train_ids[0])} of {n} conversations (data.max_length)")
    rows = [SimpleNamespace(name="ktransfer on", pair="on", fn=kt_step(kt_on), times=[]),
            SimpleNamespace(name="TRL GKD lmbda=1", pair="on", fn=trl_step(trl_trainer(1.0)), times=[]),
            SimpleNamespace(name="ktransfer off", pair="off", fn=kt_step(kt_off), times=[]),
            SimpleNamespace(name="TRL GKD lmbda=0", pair="off", fn=trl_step(trl_trainer(0.0)), times=[])]
    if args.fused_head:
        rows.insert(3, SimpleNamespace(name="ktransfer off, fused head", pair="off", times=[],
                                       fn=kt_step(ktransfer_run("reference", "train.fused_head=true"))))
    random.seed(0)
    for k in range(args.warmup + args.steps):
        shift = k % len(rows)
        for r in rows[shift:] + rows[:shift]:
            t = time.perf_counter()
            r.fn(k)
            if k >= args.warmup:
                r.times.append(time.perf_counter() - t)
        print(f"step {k + 1}/{args.warmup + args.steps} done{' (warm-up)' if k < args.warmup else ''}",
              file=sys.stderr)
    load_after = load_average()

    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("learner", kt_on.model),
                                                                           ("teacher", kt_on.teacher))}
    ref_tokens = [len(t) for t in kt_on.data.train_ids[1][:n]]
    print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; {torch.get_num_threads()} torch threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}, Python {platform.python_version()}; "
          f"{datetime.date.today().isoformat()}; load average (1/5/15 min) {load_before} before, {load_after} after.")
    print(f"Command: `{command}`")
    print(f"Llama learner {args.learner_layers} x {args.hidden} ({params['learner'] / 1e6:.1f}M), teacher "
          f"{args.teacher_layers} x {args.hidden} ({params['teacher'] / 1e6:.1f}M), untrained, vocabulary {len(tok)}; "
          f"{args.batch} Multi30k conversations a step (reference completions {min(ref_tokens)}-{max(ref_tokens)} "
          f"tokens), temperature {args.temperature}, at most {args.max_new_tokens} new tokens; forward KL, lam 1 / "
          f"beta 0; {args.steps} timed steps after {args.warmup} warm-up.\n")
    header = ["step", "median s", "ratio ktransfer / TRL"]
    cells, table = [header], []
    for r in rows:
        entry = dict(step=r.name, median_s=statistics.median(r.times), times=r.times)
        if r.name.startswith("ktransfer"):
            other = next(x for x in rows if x.pair == r.pair and x.name.startswith("TRL"))
            entry["ratio"] = _summary([a / b for a, b in zip(r.times, other.times, strict=True)])
        table.append(entry)
        q = entry.get("ratio")
        ratio = f"{q[1]:.2f} [{q[0]:.2f}-{q[2]:.2f}]" if q else "-"
        cells.append([r.name, f"{entry['median_s']:.3f}", ratio])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|---|---:|---:|")
        for c in cells[1:]:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        for c in cells:
            print("  ".join(x.rjust(w) for x, w in zip(c, widths, strict=True)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=command, load_before=load_before, load_after=load_after, rows=table), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
