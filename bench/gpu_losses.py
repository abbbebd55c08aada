"""Sections of ``bench/gpu.py`` on the losses: correctness against float64, ``divergence`` timings, the fused head.

- ``correctness``: every kind of ``ktransfer.divergence``, full and top-k supports (default, union, tail), float32
  and bf16 logits, value and gradient on the device against the float64 Python path on the CPU (same inputs upcast);
  on CUDA also the compiled chunk (``use_compile(True)``) of the three timed configurations.
- ``divergence``: forward + backward time and peak memory of reverse_kl top-8, forward_kl and jsd beta 0.5 on bf16
  logits, ktransfer eager and compiled against plain PyTorch, TRL's ``generalized_jsd_loss`` and Liger's Triton
  ``LigerKLDIVLoss`` / ``LigerJSD`` (on log_softmax outputs) where they compute the same divergence.
- ``fused``: ``fused_linear_divergence`` (jsd beta 0.5 and forward KL) against materialised logits (plain and TRL),
  Liger's Triton ``LigerFusedLinearJSD`` and its chunked ``LigerFusedLinearJSDLoss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from gpu_common import Options, failure_text, liger_module, measure, rel_error, row, triton_runs_here, trl_jsd

import ktransfer
from ktransfer.losses import divergences

KINDS = divergences.KINDS
# (label, options) of the supports checked for every kind.
SUPPORTS = (("full", {}), ("top-8", {"top_k": 8}), ("top-8 union", {"top_k": 8, "support": "union"}),
            ("top-8 tail", {"top_k": 8, "tail": True}))
# The three timed configurations: (label, kind, options of ktransfer.divergence).
TIMED = (("reverse_kl top-8", "reverse_kl", {"top_k": 8}), ("forward_kl", "forward_kl", {}),
         ("jsd beta=0.5", "jsd", {"beta": 0.5}))
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # bf16: the gradient comes back in bf16


def distinct_bf16_logits(n: int, v: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, v]`` bf16 logits with no ties in a row (v <= 256): a permutation of k/16, k in [-128, 128), each exact
    in bf16, so that top-k picks are the same on every device."""
    if v > 256:
        raise ValueError(f"distinct bf16 logits need v <= 256, got {v}")
    grid = (torch.arange(256, dtype=torch.float32) - 128) / 16
    idx = torch.stack([torch.randperm(256, generator=gen)[:v] for _ in range(n)])
    return grid[idx].to(torch.bfloat16)


def peaked_bf16_logits(n: int, v: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """``[n, v]`` bf16 logits 3 * N(0, 1) clipped to [-8, 8], with 8 positions per row set to 10, 10.25, ..., 11.75
    (exact in bf16): the top-8 of every row is unique and well apart from the rest, so a top-8 support is the same
    whichever way a device breaks ties (random bf16 logits tie often among 32000 values)."""
    z = (3 * torch.randn(n, v, generator=gen, device=device)).clamp_(-8, 8)
    top = torch.rand(n, v, generator=gen, device=device).topk(8, dim=-1).indices
    z.scatter_(-1, top, 10 + 0.25 * torch.arange(8, device=device, dtype=z.dtype).expand(n, 8))
    return z.to(torch.bfloat16)


def value_and_grad(z: torch.Tensor, u: torch.Tensor, kind: str, **opts):
    """``divergence`` forward + backward on a fresh leaf copy of ``z``: ``(value, grad)``."""
    zz = z.detach().clone().requires_grad_(True)
    value = ktransfer.divergence(zz, u, kind, **opts)
    value.backward()
    return value.detach(), zz.grad


def check_against_float64(z: torch.Tensor, u: torch.Tensor, kind: str, **opts) -> float:
    """Max relative error (value and gradient) of ``divergence`` on ``z, u`` as given (device, dtype) against the
    float64 Python path on the CPU of the same numbers."""
    got_v, got_g = value_and_grad(z, u, kind, **opts)
    ref_v, ref_g = value_and_grad(z.detach().to("cpu", torch.float64), u.to("cpu", torch.float64), kind, **opts)
    return rel_error(got_v, got_g, ref_v, ref_g)


def correctness(opts: Options, emit) -> None:
    """One row per (dtype, kind): the worst error over its supports; compiled rows on CUDA."""
    gen = torch.Generator().manual_seed(0)
    n, v = (8, 300) if opts.tiny else (256, 32000)
    inputs = {
        torch.float32: (torch.randn(n, v, generator=gen) * 3, torch.randn(n, v, generator=gen) * 3, f"[{n}x{v}]"),
        # 200 of the 256 grid values: the two softmaxes have different normalisers, so p_y = q_y only by chance
        torch.bfloat16: (distinct_bf16_logits(n, 200, gen), distinct_bf16_logits(n, 200, gen), f"[{n}x200]"),
    }
    for dtype, (z, u, shape) in inputs.items():
        z, u = z.to(opts.device), u.to(opts.device)
        for kind in KINDS:
            if opts.out_of_time():
                emit(row("correctness", f"{kind} {dtype}", status="skipped", note="section budget spent"))
                continue
            errs = {label: check_against_float64(z, u, kind, **o) for label, o in SUPPORTS}
            worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else math.inf)
            emit(row("correctness", f"{kind} {str(dtype).split('.')[-1]} {shape} vs float64 CPU",
                     errors={"ktransfer": errs[worst]}, tol=TOL[dtype],
                     note=f"{', '.join(errs)}; worst: {worst}"))
    # chunk boundaries: a chunk of 7 rows must give the same as one chunk (float32)
    z, u, _ = inputs[torch.float32]
    z, u = z.to(opts.device), u.to(opts.device)
    err = max(rel_error(*value_and_grad(z, u, k, chunk_size=7, **o), *value_and_grad(z, u, k, **o))
              for _, k, o in TIMED)
    emit(row("correctness", "chunk_size=7 vs default chunk (3 timed configs)", errors={"ktransfer": err},
             tol=1e-5))
    compiled_correctness(opts, emit, z, u)


def compiled_correctness(opts: Options, emit, z, u) -> None:
    """The compiled chunk against float64 for the timed configurations (CUDA only: on a CPU, float32 logits run the
    C++ kernel whether or not compiling is on)."""
    if not opts.device.startswith("cuda"):
        emit(row("correctness", "compiled chunk vs float64", status="skipped",
                 note="CPU: float32/bf16 logits take the C++ kernel, compiling applies to CUDA (and float64) only"))
        return
    if opts.out_of_time(30):
        emit(row("correctness", "compiled chunk vs float64", status="skipped", note="section budget spent"))
        return
    divergences.use_compile(True)
    try:
        errs = {label: check_against_float64(z, u, k, **o) for label, k, o in TIMED}
    finally:
        divergences.use_compile(False)
    worst = max(errs, key=errs.get)
    emit(row("correctness", "compiled chunk vs float64 (3 timed configs)", errors={"ktransfer compiled": errs[worst]},
             tol=TOL[torch.float32], note=f"worst: {worst}"))


# --- plain PyTorch, written independently of ktransfer (float32 math on bf16 logits) ---

def plain_divergence(z: torch.Tensor, u: torch.Tensor, kind: str, top_k: int | None = None,
                     beta: float = 0.5) -> torch.Tensor:
    """Mean over rows of forward_kl / reverse_kl / jsd (TRL's beta), top-k of the learner for reverse_kl."""
    logp = F.log_softmax(z.float(), dim=-1)
    logq = F.log_softmax(u.float(), dim=-1)
    if top_k is not None:
        if kind != "reverse_kl":
            raise ValueError("plain top-k: reverse_kl only")
        idx = z.detach().topk(top_k, dim=-1).indices
        logp, logq = logp.gather(-1, idx), logq.gather(-1, idx)
    if kind == "forward_kl":
        per_row = (logq.exp() * (logq - logp)).sum(-1)
    elif kind == "reverse_kl":
        per_row = (logp.exp() * (logp - logq)).sum(-1)
    elif kind == "jsd":
        logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
        per_row = beta * (logq.exp() * (logq - logm)).sum(-1) + (1 - beta) * (logp.exp() * (logp - logm)).sum(-1)
    else:
        raise ValueError(kind)
    return per_row.mean()


def _logits_runner(loss_fn, z, u):
    def run():
        zz = z.detach().requires_grad_(True)
        loss = loss_fn(zz, u)
        loss.backward()
        return loss.detach(), zz.grad
    return run


def divergence_competitors(kind: str, o: dict, device: str) -> dict:
    """{column: loss_fn(z, u) or a text saying why there is none} for one timed configuration."""
    top_k, beta = o.get("top_k"), o.get("beta", 0.5)
    cols = {"plain": lambda z, u: plain_divergence(z, u, kind, top_k, beta)}
    trl = trl_jsd()
    trl_beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": beta}[kind]
    cols["TRL"] = ("-" if top_k else (trl if isinstance(trl, str) else
                   (lambda z, u: trl(z, u, beta=trl_beta))))
    why = triton_runs_here(device)  # checked before importing Liger's Triton modules
    if top_k is not None or kind == "reverse_kl":
        cols["Liger"] = "-"
    elif why:
        cols["Liger"] = why
    elif kind == "forward_kl":
        cls = liger_module("LigerKLDIVLoss")
        cols["Liger"] = cls if isinstance(cls, str) else _on_log_probs(cls(reduction="batchmean", log_target=True))
    else:
        cls = liger_module("LigerJSD")
        cols["Liger"] = cls if isinstance(cls, str) else _on_log_probs(cls(beta=beta))
    return cols


def _on_log_probs(loss_module):
    """Liger's losses on log-probabilities (student first), fed log_softmax in float32 of both logits."""
    def loss(z, u):
        return loss_module(F.log_softmax(z.float(), -1), F.log_softmax(u.float(), -1))
    return loss


def time_columns(opts: Options, runners: dict, reference: str) -> tuple[dict, dict]:
    """Measure each runner (or keep its text); errors of every measured column against ``reference``'s output
    (ktransfer's own columns) or against "ktransfer" (the others). Returns ``(cells, errors)``."""
    cells, errors, outputs = {}, {}, {}
    for name, run in runners.items():
        if isinstance(run, str):
            cells[name] = run
            continue
        if opts.out_of_time():
            cells[name] = "skipped: budget"
            continue
        try:
            outputs[name], ms, mib = measure(run, opts.device, opts.repeats)
            cells[name] = (ms, mib)
        except Exception as exc:
            cells[name] = failure_text(exc)
    for name, out in outputs.items():
        ref = reference if name.startswith("ktransfer") else "ktransfer"
        if name != reference and ref in outputs:
            errors[name] = rel_error(*out, *outputs[ref])
    if "ktransfer" in outputs and reference in outputs and reference != "ktransfer":
        errors["ktransfer"] = rel_error(*outputs["ktransfer"], *outputs[reference])
    return cells, errors


def divergence_timings(opts: Options, emit) -> None:
    sizes = ((16, 64), (8, 300)) if opts.tiny else ((8192, 32000), (4096, 128256))
    gen = torch.Generator(device=opts.device).manual_seed(0)
    for n, v in sizes:
        z = peaked_bf16_logits(n, v, gen, opts.device)
        u = (3 * torch.randn(n, v, generator=gen, device=opts.device)).to(torch.bfloat16)
        for label, kind, o in TIMED:
            case = f"divergence {label} [{n}x{v}] bf16"
            if opts.out_of_time():
                emit(row("divergence", case, status="skipped", note="section budget spent"))
                continue
            runners = {"ktransfer": _logits_runner(lambda a, b, k=kind, o=o: ktransfer.divergence(a, b, k, **o), z, u)}
            runners.update({c: (f if isinstance(f, str) else _logits_runner(f, z, u))
                            for c, f in divergence_competitors(kind, o, opts.device).items()})
            runners["ktransfer compiled"] = _compiled(runners["ktransfer"])
            cells, errors = time_columns(opts, runners, reference="plain")
            emit(row("divergence", case, cells=cells, errors=errors, tol=TOL[torch.bfloat16],
                     note="errors: ktransfer vs plain, others vs ktransfer"))
        del z, u


def _compiled(run):
    """``run`` with ``use_compile(True)`` around it (the first call compiles)."""
    def wrapped():
        divergences.use_compile(True)
        try:
            return run()
        finally:
            divergences.use_compile(False)
    return wrapped


def fused_head(opts: Options, emit) -> None:
    n, h, v = (16, 16, 128) if opts.tiny else (8192, 4096, 128256)
    dt = torch.float32 if opts.tiny and not opts.device.startswith("cuda") else torch.bfloat16
    gen = torch.Generator(device=opts.device).manual_seed(0)
    dev = opts.device
    hs = torch.randn(n, h, generator=gen, device=dev).to(dt)
    ht = torch.randn(n, h, generator=gen, device=dev).to(dt)
    W = (torch.randn(v, h, generator=gen, device=dev) / h**0.5).to(dt)
    Wt = (torch.randn(v, h, generator=gen, device=dev) / h**0.5).to(dt)
    y = torch.randint(0, v, (n,), generator=gen, device=dev)
    for label, kind, beta in (("jsd beta=0.5", "jsd", 0.5), ("forward_kl", "forward_kl", 0.0)):
        case = f"fused head {label} BT={n} H={h} V={v} {str(dt).split('.')[-1]}"
        if opts.out_of_time():
            emit(row("fused", case, status="skipped", note="section budget spent"))
            continue
        runners = fused_runners(opts, kind, beta, hs, W, ht, Wt, y)
        cells, errors = time_columns(opts, runners, reference="plain")
        emit(row("fused", case, cells=cells, errors=errors, tol=TOL[dt] if dt == torch.float32 else 2e-2,
                 note="errors (value, grad of h): ktransfer vs plain, others vs ktransfer"))


def fused_runners(opts: Options, kind: str, beta: float, hs, W, ht, Wt, y) -> dict:
    def head_runner(loss_fn):
        def run():
            hh = hs.detach().requires_grad_(True)
            WW = W.detach().requires_grad_(True)
            loss = loss_fn(hh, WW)
            loss.backward()
            return loss.detach(), hh.grad
        return run

    def ours(hh, WW):
        return ktransfer.fused_linear_divergence(hh, WW, ht, Wt, kind, lam=1.0, beta=beta).loss

    def plain(hh, WW):
        return plain_divergence(hh @ WW.T, ht @ Wt.T, kind, beta=beta)

    runners = {"ktransfer": head_runner(ours), "plain": head_runner(plain)}
    trl = trl_jsd()
    runners["TRL"] = trl if isinstance(trl, str) else head_runner(
        lambda hh, WW: trl(hh @ WW.T, ht @ Wt.T, beta=beta))
    triton = triton_runs_here(opts.device) or liger_module("LigerFusedLinearJSD")
    if not isinstance(triton, str):
        triton = triton(jsd_beta=beta)
    runners["Liger"] = triton if isinstance(triton, str) else head_runner(lambda hh, WW: triton(hh, WW, ht, Wt, None))
    chunked = liger_module("LigerFusedLinearJSDLoss")
    compiled = opts.device.startswith("cuda")  # Liger's default; compiling on a CPU takes too long for a dry run
    if not isinstance(chunked, str):
        chunked = chunked(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=compiled)
    runners["Liger chunked"] = chunked if isinstance(chunked, str) else head_runner(
        lambda hh, WW: chunked(hh, WW, ht, Wt, y))
    runners["ktransfer compiled"] = _compiled(runners["ktransfer"])
    return runners
