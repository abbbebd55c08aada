"""A teacher cache for reference-prefix objectives: one teacher pass over the training data, stored on disk, instead
of a teacher forward in every step of every epoch.

With reference prefixes (teacher forcing) the teacher sees the same inputs every epoch, only batched differently, so
its predictions can be computed once. Per target position t of training example i the cache holds, at the training
temperature T (u = teacher logits, log q = log_softmax(u / T)):

    ids[i, t]   int32 [K]     the teacher's top-K tokens (largest first)
    logq[i, t]  float [K]     log q of those tokens (float32 by default, see below)
    lse[i, t]   float32       the log-normaliser logsumexp(u / T), so that u_y / T = logq_y + lse

Exactness. A divergence whose every term lives on the teacher's top-k support (``kd`` = forward_kl with top_k <= K
and support teacher, which is its default; also skew_forward_kl, and jsd/tvd with ``support=teacher``), with or
without ``renormalize`` or ``tail`` (the rest mass 1 - q(S) is the cached q of S subtracted from 1), reads q only on
those k tokens and the learner's full log-probabilities, so it equals the value and gradient with the live teacher
up to float32 rounding (``teacher_logits`` below). Anything else needs q off the cached ids (``ka`` = reverse_kl
reads q on the learner's top-k; full-vocabulary divergences read all of q) and is refused. ``teacher_logits``
spreads the residual mass 1 - q(S_K) uniformly over the other V - K tokens; that is an approximation wherever q off
S_K is read, which only the library-level call may use knowingly.

Storage dtype: float32 by default, because float16 keeps 11 significant bits: a log-probability near -10 is off by
up to 2**-7 (q off by 0.4 %), which breaks the "exact up to float32 rounding" contract. ``dtype=torch.float16`` halves
that part of the file for a stated error (tests/training/test_teacher_cache.py measures it).

On disk (a folder)::

    manifest.json               format, K, T, dtype, the teacher checkpoint's digest and path, the tokenizer's
                                digest, data settings and a digest of the encoded training ids; written last
    shard-00000.safetensors     offsets int64 [n + 1] (positions of the shard's examples), ids, logq, lse
    ...

Rows are keyed by example index (the order of ``encode_pairs``'s output) and position, so any batching or shuffling
reads the right rows. A manifest that does not match the run (another teacher, tokenizer, data, temperature, bf16,
or K < top_k) is refused with the differing keys named.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ktransfer.runtime import tempdirs
from ktransfer.runtime.digest import file_sha256
from ktransfer.training.rules import exact_for  # noqa: F401  (re-exported: which objectives the cache serves)

FORMAT = "ktransfer-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# residual mass below this (float rounding can make 1 - q(S_K) <= 0) is raised to it: q off S_K stays finite
MIN_RESIDUAL = 1e-30
# manifest keys recorded for the reader but not compared on their own: the digests of the teacher's weights, the
# tokenizer and the encoded training ids decide whether a cache is stale
INFO_KEYS = ("teacher_path", "corpus", "train", "src_lang", "tgt_lang", "train_limit", "max_length")  # train_limit:
# data.max_train_samples, under its manifest name of format 1


class TeacherCacheError(ValueError):
    """A cache folder that is missing parts, stale (built for another run) or unusable for an objective."""


@dataclass
class TeacherCache:
    """A loaded cache: rows ``offsets[i] .. offsets[i+1]`` are the target positions of training example i."""

    path: Path
    manifest: dict[str, Any]
    offsets: torch.Tensor  # int64 [n + 1]
    ids: torch.Tensor  # int32 [P, K]
    logq: torch.Tensor  # float32 or float16 [P, K]
    lse: torch.Tensor  # float32 [P]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def rows(self, example_index: torch.Tensor, length: int, shift: torch.Tensor | None = None):
        """Cache rows ``[B, length]`` for label columns 0..length-1 of examples ``example_index`` [B], and a mask of
        the columns that hold a target (False before an example's first target and past its last, where the row
        is clamped to a valid one). ``shift`` [B]: the column of each example's first target (``first_targets``;
        None = 0, the seq2seq layout)."""
        index = torch.as_tensor(example_index, dtype=torch.long).reshape(-1)
        start, end = self.offsets[index], self.offsets[index + 1]
        col = torch.arange(length).unsqueeze(0)
        if shift is not None:
            col = col - torch.as_tensor(shift, dtype=torch.long).reshape(-1, 1)
        pos = start.unsqueeze(-1) + col
        valid = (col >= 0) & (pos < end.unsqueeze(-1))
        return torch.where(valid, pos, start.unsqueeze(-1)), valid

    def teacher_logits(self, example_index: torch.Tensor, length: int, *, shift: torch.Tensor | None = None,
                       device=None) -> torch.Tensor:
        """Stand-in teacher logits ``[B, length, V]`` (float32) for ``transfer_loss``: u' = T * log q' with
        q' = q on the cached top-K ids and the residual mass spread uniformly over the other V - K tokens.

        Exact (up to float32 rounding) for divergences on the teacher's top-k support, k <= K; columns that hold
        no target of the example are 0 (padding or a causal prompt: labels -100, never read).
        """
        rows, valid = self.rows(example_index, length, shift)
        # only the [B, L, K] rows travel to the device; the [B, L, V] stand-in is built there
        ids = self.ids[rows].to(device=device, dtype=torch.long)
        logq = self.logq[rows].to(device=device, dtype=torch.float64)
        valid = valid.to(device)
        V, K = self.vocab_size, self.k
        mass = logq.exp().sum(-1, keepdim=True)  # q(S_K), in float64 so that 1 - q(S_K) keeps its digits
        residual = ((1.0 - mass).clamp_min(MIN_RESIDUAL) / max(V - K, 1)).log()  # [B, L, 1]
        # below the least cached log q, so that the top-k of u' are the cached ids even where 1 - q(S_K) is rounding
        # noise (a very peaked q); the margin survives u' / T in float32
        least = logq.min(-1, keepdim=True).values
        residual = torch.minimum(residual, least - 1e-6 * (1.0 + least.abs())).float()
        out = residual.expand(*rows.shape, V).clone()  # float32 [B, L, V]: the size of the live teacher's logits
        out.scatter_(-1, ids, logq.float())
        if self.temperature != 1.0:
            out.mul_(self.temperature)
        return out.masked_fill_(~valid.unsqueeze(-1), 0.0)


# --------------------------------------------------------------------------------------------------------------
# Building, writing and reading
# --------------------------------------------------------------------------------------------------------------
def ids_digest(src: list[list[int]], tgt: list[list[int]]) -> str:
    """sha256 of the encoded training pairs (lengths and ids of both sides, in order)."""
    h = hashlib.sha256()
    for rows in (src, tgt):
        h.update(np.asarray([len(r) for r in rows], dtype=np.int64).tobytes())
        h.update(np.asarray([x for r in rows for x in r], dtype=np.int64).tobytes())
    return h.hexdigest()


@torch.no_grad()
def first_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The column of each row's first target in ``labels`` [B, L] (0 for seq2seq labels; a causal batch's scored
    window starts each response at its own column). Targets are contiguous from there."""
    scored = labels != ignore_index
    return torch.where(scored.any(-1), scored.int().argmax(-1), 0).cpu()


def build(path: str | os.PathLike, teacher: torch.nn.Module, ids: tuple[list[list[int]], list[list[int]]], *,
          k: int, family, model, tokenizer, temperature: float = 1.0, max_tokens: int = 4096,
          device: torch.device | str = "cpu",
          bf16: bool = False, dtype: torch.dtype = torch.float32, shard_examples: int = 50_000,
          key: dict[str, Any] | None = None, log=None, vocab_size: int | None = None) -> TeacherCache:
    """One teacher pass over ``ids`` = (source ids, target ids) as a family encodes them; writes the cache folder
    ``path`` and returns it. Row j of example i is the teacher at its j-th target (``len(ids[1][i])`` of them).

    Batches: ``family.collate`` / ``family.model_inputs`` with the learner ``model`` and ``tokenizer`` (any family,
    causal included), as training builds them. The teacher runs in eval mode under ``torch.no_grad`` (bf16 autocast
    with ``bf16``) on length-sorted batches of at most ``max_tokens`` padded tokens per side. ``key``: settings that
    identify the run (teacher digest, tokenizer, data), stored in the manifest and compared by ``load``. The folder
    is written under a temporary name and renamed into place, so an interrupted build leaves nothing behind at
    ``path``. ``vocab_size``: the ids learner and teacher share; the teacher's output rows above it (padding) are
    left out before the softmax, as the live loss slices them (``LossSpec.vocab_size``).
    """
    src, tgt = ids
    device = torch.device(device)

    def batch_of(idx):
        batch = family.collate([src[i] for i in idx], [tgt[i] for i in idx], model, tokenizer)
        return family.model_inputs({n: v.to(device) for n, v in batch.items()})

    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    path = Path(path)
    if path.exists():
        raise TeacherCacheError(f"{path} already exists; delete it to rebuild the teacher cache")
    busy = lambda who: (f"{path} is being built by {who} (another training with this teacher cache); "  # noqa: E731
                        "wait for it to finish and run again (the finished cache is reused), or choose another path")
    with tempdirs.building(path, busy) as removed:  # the loser stops at once; a killed build's .tmp-PID goes
        if removed and log is not None:
            log(f"teacher cache: removed {', '.join(p.name for p in removed)} (left by killed builds)")
        if path.exists():  # built by another process while this one loaded
            return load(path)
        t0, tmp = time.perf_counter(), tempdirs.temp_folder(path)
        try:
            manifest = _write(tmp, path, teacher, ids, k=k, family=family, batch_of=batch_of, temperature=temperature,
                              max_tokens=max_tokens, device=device, bf16=bf16, dtype=dtype,
                              shard_examples=shard_examples, key=key, vocab_size=vocab_size, t0=t0)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if log is not None:
        log(f"teacher cache: {manifest['positions']:,} positions x top-{k} ({manifest['dtype']}) of "
            f"{manifest['num_examples']:,} examples written to {path} in {manifest['build_seconds']:.1f}s "
            f"({disk_bytes(path) / 2**20:.1f} MiB)")
    return load(path)


@torch.no_grad()
def _write(tmp: Path, path: Path, teacher, ids, *, k, family, batch_of, temperature, max_tokens, device, bf16, dtype,
           shard_examples, key, vocab_size, t0) -> dict[str, Any]:
    """``build``'s teacher pass and files, written into ``tmp`` and renamed to ``path``; returns the manifest."""
    from ktransfer.data.batching import TokenBatchSampler

    tgt = ids[1]
    was_training = teacher.training
    teacher.eval()
    lengths = np.asarray([len(t) for t in tgt], dtype=np.int64)
    offsets = np.zeros(len(tgt) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    P = int(offsets[-1])
    all_ids = torch.empty(P, k, dtype=torch.int32)
    all_logq = torch.empty(P, k, dtype=dtype)
    all_lse = torch.empty(P, dtype=torch.float32)
    V = None
    sampler = TokenBatchSampler(*family.lengths(ids), max_tokens, shuffle=False)
    for idx in sampler.epoch_batches(0):
        inputs, labels = batch_of(idx)
        shift = first_targets(labels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            u = teacher(**inputs, use_cache=False).logits  # (B, T, V)
        if vocab_size is not None:
            u = u[..., :vocab_size]
        V = u.shape[-1]
        if k > V:
            raise ValueError(f"k={k} exceeds the teacher's vocabulary size {V}")
        t = u.float()  # what the divergence sweep computes in (float32 from float32 or bf16 logits)
        t = t if temperature == 1 else t / temperature
        lse = torch.logsumexp(t, dim=-1)  # (B, T)
        top = t.topk(k, dim=-1)  # sorted: largest first
        logq = (top.values - lse.unsqueeze(-1)).cpu()
        top_ids, lse = top.indices.to(torch.int32).cpu(), lse.cpu()
        for b, i in enumerate(idx):
            rows = slice(int(offsets[i]), int(offsets[i + 1]))
            n = int(lengths[i])
            cols = slice(int(shift[b]), int(shift[b]) + n)
            all_ids[rows], all_logq[rows], all_lse[rows] = top_ids[b, cols], logq[b, cols].to(dtype), lse[b, cols]
    teacher.train(was_training)
    if V is None:
        raise ValueError("no training examples to cache")

    shards = []
    for first in range(0, len(tgt), shard_examples):
        last = min(first + shard_examples, len(tgt))
        lo, hi = int(offsets[first]), int(offsets[last])
        name = f"shard-{len(shards):05d}.safetensors"
        safetensors.torch.save_file({"offsets": torch.from_numpy(offsets[first:last + 1] - lo),
                                     "ids": all_ids[lo:hi].contiguous(), "logq": all_logq[lo:hi].contiguous(),
                                     "lse": all_lse[lo:hi].contiguous()}, tmp / name, metadata={"format": "pt"})
        shards.append({"file": name, "first_example": first, "num_examples": last - first, "positions": hi - lo,
                       "sha256": file_sha256(tmp / name)})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "k": k, "temperature": float(temperature),
                "dtype": next(n for n, d in DTYPES.items() if d == dtype), "bf16": bool(bf16), "vocab_size": V,
                "num_examples": len(tgt), "positions": P, "key": key or {}, "shards": shards,
                "build_seconds": round(time.perf_counter() - t0, 3)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return manifest


def load(path: str | os.PathLike, *, expect: dict[str, Any] | None = None) -> TeacherCache:
    """Read a cache folder; with ``expect`` (settings: ``k_min``, ``temperature``, ``bf16``, ``vocab_size``,
    ``num_examples`` and a ``key`` dict), refuse one built for another run, naming every differing setting.

    Raises:
        TeacherCacheError: not a cache, missing or corrupt shard, or stale.
    """
    path = Path(path)
    mf = path / MANIFEST
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TeacherCacheError(f"{mf} is missing: {path} is not a ktransfer teacher cache") from None
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherCacheError(f"cannot read {mf}: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise TeacherCacheError(f"{mf}: not a {FORMAT} manifest of version {FORMAT_VERSION}")
    if expect is not None:
        _check_fresh(path, manifest, expect)
    parts = {"offsets": [], "ids": [], "logq": [], "lse": []}
    base = 0
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if not file.is_file() or file_sha256(file) != shard["sha256"]:
            raise TeacherCacheError(f"{file}: missing or corrupt (sha256 differs from {mf}); delete {path} to rebuild")
        tensors = safetensors.torch.load_file(file)
        parts["offsets"].append(tensors["offsets"][:-1] + base)
        base += int(tensors["offsets"][-1])
        for name in ("ids", "logq", "lse"):
            parts[name].append(tensors[name])
    offsets = torch.cat([*parts["offsets"], torch.tensor([base], dtype=torch.int64)])
    if len(offsets) != manifest["num_examples"] + 1 or base != manifest["positions"]:
        raise TeacherCacheError(f"{mf}: shards hold {len(offsets) - 1} examples / {base} positions, the manifest "
                                f"says {manifest['num_examples']} / {manifest['positions']}")
    return TeacherCache(path=path, manifest=manifest, offsets=offsets, ids=torch.cat(parts["ids"]),
                        logq=torch.cat(parts["logq"]), lse=torch.cat(parts["lse"]))


def _check_fresh(path: Path, manifest: dict[str, Any], expect: dict[str, Any]) -> None:
    diffs = []
    if "k_min" in expect and manifest["k"] < expect["k_min"]:
        diffs.append(f"K {manifest['k']} < objective.top_k {expect['k_min']}")
    for name in ("temperature", "bf16", "vocab_size", "num_examples"):
        if name in expect and manifest.get(name) != expect[name]:
            diffs.append(f"{name} {manifest.get(name)!r} != {expect[name]!r}")
    have, want = manifest.get("key", {}), expect.get("key") or {}
    differ = [n for n in want if have.get(n) != want[n]]
    # digests decide; paths and data settings are named too, but alone (a moved teacher or corpus) they do not
    if diffs or any(n not in INFO_KEYS for n in differ):
        diffs += [f"{n} {have.get(n)!r} != {want[n]!r}" for n in sorted(differ, key=lambda n: n in INFO_KEYS)]
    if diffs:
        raise TeacherCacheError(f"{path} was built for another run (stale): " + "; ".join(diffs)
                                + f". Delete {path} to rebuild it, or choose another path")


def disk_bytes(path: str | os.PathLike) -> int:
    """Total size of the files of a cache folder."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


# --------------------------------------------------------------------------------------------------------------
# The training loop's entry point
# --------------------------------------------------------------------------------------------------------------
def run_key(cfg, tokenizer) -> dict[str, Any]:
    """The settings a cache of ``cfg``'s run depends on, besides the encoded ids: teacher digest, tokenizer, data."""
    from ktransfer.models import checkpoint as ckpt_lib
    from ktransfer.training.config import ConfigError

    folder = Path(cfg.model.teacher)
    state_file = folder / ckpt_lib.STATE_FILE
    weights = sorted(folder.glob("*.safetensors"))
    try:  # the digest that load_checkpoint verified the teacher's weights against; else that of its weight files
        if state_file.is_file():
            digest = json.loads(state_file.read_text(encoding="utf-8"))["files"][ckpt_lib.MODEL_FILE]["sha256"]
        elif weights:
            digest = hashlib.sha256("".join(file_sha256(w) for w in weights).encode()).hexdigest()
        else:
            raise FileNotFoundError(f"no {ckpt_lib.STATE_FILE} and no *.safetensors in {folder}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"train.teacher_cache: cannot read the teacher's weight digest from {folder}: {e}",
                          key="model.teacher") from None
    d = cfg.data
    return {"teacher_path": str(Path(cfg.model.teacher).resolve()), "teacher_sha256": digest,
            "tokenizer_sha256": tokenizer.fingerprint(),
            "corpus": d.corpus, "train": d.train, "src_lang": d.src_lang, "tgt_lang": d.tgt_lang,
            "train_limit": d.max_train_samples, "max_length": d.max_length}


def open_for_run(cfg, spec, teacher: torch.nn.Module, tokenizer, train_ids, family, model, device: torch.device,
                 log) -> TeacherCache:
    """The cache of ``train.teacher_cache`` for this run and its loss ``spec`` (a ``LossSpec``: top_k, temperature,
    vocab_size), built when the folder does not exist (rank 0; the others wait), refused when stale. Which
    objectives and settings the cache serves is checked before any model loads (``ktransfer.training.rules``).

    Raises:
        ConfigError: a stale or broken cache folder (key ``train.teacher_cache``).
    """
    from ktransfer.runtime import distributed
    from ktransfer.training.config import ConfigError

    key = "train.teacher_cache"
    src, tgt = train_ids
    run = {**run_key(cfg, tokenizer), "ids_sha256": ids_digest(src, tgt)}
    path = Path(cfg.train.teacher_cache)
    if not path.exists():
        if distributed.is_main():
            log(f"teacher cache: building {path} (top-{spec.top_k}, T={spec.temperature})")
            build(path, teacher, train_ids, k=spec.top_k, temperature=spec.temperature, family=family, model=model,
                  tokenizer=tokenizer, max_tokens=cfg.data.max_tokens, device=device, bf16=cfg.train.bf16, key=run,
                  log=log, vocab_size=spec.vocab_size)
        distributed.barrier()
    expect = {"k_min": spec.top_k, "temperature": float(spec.temperature), "bf16": bool(cfg.train.bf16),
              "num_examples": len(tgt), "key": run}
    if spec.vocab_size is not None:
        expect["vocab_size"] = spec.vocab_size
    try:
        cache = load(path, expect=expect)
    except TeacherCacheError as e:
        raise ConfigError(f"{key}: {e}", key=key) from None
    log(f"teacher cache: {path} (top-{cache.k}, {int(cache.offsets[-1]):,} positions, {cache.manifest['dtype']}); "
        "the teacher runs for validation only")
    return cache
