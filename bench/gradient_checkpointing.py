"""Peak memory and time of one training step with and without ``train.gradient_checkpointing``, for a causal and a
seq2seq learner built from presets (random weights: memory and time do not depend on them).

Each row runs in a fresh process: build the model and a random batch of ``--batch`` x ``--length`` tokens, one
step (forward, NLL, backward), then ``--steps`` timed steps. "step peak MiB" is how much the first step raises the
process's peak resident memory (``ru_maxrss``): the activations kept for backward plus the parameters' gradients
(the same with and without checkpointing, so the difference between two rows is activations). Prints a markdown
table.

    .venv/bin/python bench/gradient_checkpointing.py                       # ~1 minute on 2 cores
    .venv/bin/python bench/gradient_checkpointing.py --batch 16 --length 256 --presets cpu-causal-teacher
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _one(preset: str, checkpointing: bool, batch: int, length: int, steps: int) -> dict:
    import torch

    from ktransfer.models.family import build_model, family_of
    from ktransfer.models.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer([f"word{i} token{i % 97}" for i in range(4000)], vocab_size=2000)
    model = build_model(preset, tok, dropout=0.0).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, tok.vocab_size, (batch, length))
    if family_of(model).name == "seq2seq":
        inputs = {"input_ids": ids, "decoder_input_ids": ids, "labels": ids}
    else:
        inputs = {"input_ids": ids, "labels": ids}

    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs, use_cache=False).loss.backward()

    base = _peak_mib()  # model, batch and tokenizer built; no step yet
    step()  # the first step's peak: activations kept for backward, plus the parameters' gradients
    peak = _peak_mib() - base
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"preset": preset, "checkpointing": checkpointing, "ms": 1000 * (time.perf_counter() - start) / steps,
            "step_peak_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["cpu-causal-teacher", "cpu-teacher"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("PRESET", "CKPT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(_one(a.child[0], a.child[1] == "1", a.batch, a.length, a.steps)))
        return
    import torch
    from pipeline import cpu_model

    print(f"{cpu_model()}, torch {torch.__version__}, {a.threads} threads, batch {a.batch} x {a.length} tokens, "
          f"float32, one training step (forward + NLL + backward), time: mean of {a.steps} after the first\n")
    print("| preset | gradient checkpointing | ms / step | step peak MiB |")
    print("|---|---|---:|---:|")
    for preset in a.presets:
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, __file__, "--child", preset, "1" if ckpt else "0", "--batch",
                                  str(a.batch), "--length", str(a.length), "--steps", str(a.steps), "--threads",
                                  str(a.threads)], capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {preset} | {'yes' if ckpt else 'no'} | {r['ms']:,.0f} | {r['step_peak_mib']:,.0f} |")


if __name__ == "__main__":
    main()
