"""The paper's 4-action toy (Fig. 3) and the gradient picture (Fig. 2).

Toy. A frozen teacher q over V actions (default q = (.4, .3, .2, .1)) and a learner p = softmax(z) whose only
parameters are V logits z. Each epoch is one full-batch optimiser step on one of

    Forward  (KD):  D = sum_{y in S} q_y (log q_y - log p_y),   S = top-k of q (fixed: the teacher is frozen)
    Backward (KA):  D = sum_{y in S} p_y (log p_y - log q_y),   S = top-k of p (re-selected at every step)

computed by ``ktransfer.divergence`` (terms outside S dropped, not renormalised, unless ``renormalize=True``).
Fixed points (derivation and runs in ``docs/toy.md``):

    Forward,  not renormalised:  p_S = q_S / q(S), p = 0 off S (reached only asymptotically).
    Backward, not renormalised:  stationary iff p_S = q_S / e with the mass off S free and S still p's top-k, which
                                 needs V >= e k; for V = 4, k = 2 there is none: S keeps being overtaken by the
                                 actions outside it, chatters, and (default q) p -> uniform.
    Either,   renormalised:      p_S proportional to q_S on the final S; the logits off S get no gradient.

Gradient picture. For densities p (one Gaussian) and q (a Gaussian mixture) on a grid, the derivatives of the two KLs
with respect to p(y) (up to the Lagrange constant of sum p = 1) are G_{q||p}(y) = 1 - q(y)/p(y) (forward) and
G_{p||q}(y) = log(p(y)/q(y)) (backward).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ktransfer.losses.divergences import divergence  # noqa: E402

DEFAULT_Q = (0.4, 0.3, 0.2, 0.1)
OPTIMIZERS = ("sgd", "adam")
ORDERS = {"forward": ("forward_kl", "teacher"), "backward": ("reverse_kl", "learner")}  # order -> (kind, top-k of)
# The grid of ``sweep``: (renormalize, optimizer, lr).
SWEEP_GRID = tuple(
    (renorm, opt, lr)
    for renorm in (False, True)
    for opt, lrs in (("sgd", (0.1, 0.5, 2.0)), ("adam", (0.01, 0.05, 0.2)))
    for lr in lrs
)
# Fig. 2: learner p = N(mu, sigma^2); teacher q = sum_i w_i N(mu_i, sigma_i^2).
DEFAULT_LEARNER = (0.5, 1.6)
DEFAULT_TEACHER = ((0.6, -2.0, 0.8), (0.4, 2.5, 0.7))


def check_toy_args(q, k: int, epochs: int, optimizer: str, lr: float, init_logits=None) -> None:
    """Raise ValueError naming the bad value if the toy's settings are unusable."""
    q = [float(x) for x in q]
    if len(q) < 2:
        raise ValueError(f"q needs at least 2 actions, got {q}")
    if not all(math.isfinite(x) and x > 0 for x in q):
        raise ValueError(f"every q_y must be a finite number > 0, got q = {q}")
    if abs(sum(q) - 1) > 1e-6:
        raise ValueError(f"q must sum to 1, got sum(q) = {sum(q):.6g} for q = {q}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(q):
        raise ValueError(f"k must be an integer in [1, {len(q)}] (the number of actions), got {k!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if init_logits is not None:
        init = [float(x) for x in init_logits]
        if len(init) != len(q):
            raise ValueError(f"init_logits has {len(init)} values but q has {len(q)} actions: {init}")
        if not all(math.isfinite(x) for x in init):
            raise ValueError(f"init_logits must be finite, got {init}")


def default_init_logits(q) -> list[float]:
    """The teacher reversed: p_0 = (q_{V-1}, ..., q_0), so p's top-k is q's bottom-k (for distinct q_y)."""
    return [math.log(x) for x in reversed(list(q))]


def train_order(order: str, q, init_logits, *, k: int, epochs: int, optimizer: str, lr: float,
                renormalize: bool, tail: bool = False) -> dict:
    """Fit the learner's logits to q with one order of the top-k KL; record p, the loss and S at epochs 0..epochs.

    Epoch t's entry is measured at the parameters before step t, so entry ``epochs`` is the final learner and
    ``loss[t] = D(p_t, q)`` on ``support[t]``, the S that step t uses.

    Returns:
        ``{"p": [[p_0..p_{V-1}]] * (epochs + 1), "loss": [..], "support": [[sorted S]] * (epochs + 1)}``.
    """
    kind, support_of = ORDERS[order]
    u = torch.tensor(q, dtype=torch.float64).log()  # (V,) teacher logits
    z = torch.tensor(init_logits, dtype=torch.float64).requires_grad_()  # (V,) learner logits, the only parameters
    opt = torch.optim.SGD([z], lr=lr) if optimizer == "sgd" else torch.optim.Adam([z], lr=lr)
    ps, losses, supports = [], [], []
    for t in range(epochs + 1):
        loss = divergence(z, u, kind, top_k=k, renormalize=renormalize, tail=tail)
        with torch.no_grad():  # the S divergence() selects (same torch.topk, same tie-breaking): of q or of p
            ranked = u if support_of == "teacher" else z
            supports.append(sorted(ranked.topk(k).indices.tolist()))
            ps.append(z.softmax(-1).tolist())
            losses.append(loss.item())
        if t < epochs:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"p": ps, "loss": losses, "support": supports}


def summarize(p, q, supports) -> dict:
    """Distances of the final p to q over all V actions, and how often the support S changed."""
    p_final = np.asarray(p[-1], dtype=np.float64)
    qq = np.asarray(q, dtype=np.float64)
    tail = np.asarray(p[-max(1, len(p) // 10):], dtype=np.float64).mean(0)  # last 10% of epochs: averages chatter
    switches = [t for t in range(1, len(supports)) if supports[t] != supports[t - 1]]
    tvs = 0.5 * np.abs(np.asarray(p, dtype=np.float64) - qq).sum(-1)  # (E+1,) TV along the trajectory

    def finite(x):
        return float(x) if math.isfinite(x) else None  # JSON has no inf

    return {
        "p_final": p_final.tolist(),
        "p_tail_mean": tail.tolist(),
        "tv": float(tvs[-1]),  # 1/2 sum_y |p - q| at the final p
        "tv_min": float(tvs.min()),
        "tv_min_epoch": int(tvs.argmin()),
        "kl_q_p": finite(float(np.sum(qq * (np.log(qq) - np.log(p_final))))),  # KL(q || p), all V actions
        "kl_p_q": finite(float(np.sum(p_final * (np.log(p_final) - np.log(qq))))),  # KL(p || q), all V actions
        "support_final": list(supports[-1]),
        "support_switches": len(switches),
        "first_switch_epoch": switches[0] if switches else None,
    }


def run_toy(q=DEFAULT_Q, *, k: int = 2, epochs: int = 200, optimizer: str = "sgd", lr: float = 0.5,
            init_logits=None, renormalize: bool = False, tail: bool = False) -> dict:
    """Run Forward (teacher's top-k) and Backward (learner's top-k) from the same initial logits.

    Args:
        q: teacher probabilities ``[V]``, > 0, summing to 1.
        k: size of the support S.
        epochs: optimiser steps (one full-batch step per epoch).
        optimizer: ``"sgd"`` (plain, no momentum) or ``"adam"`` (torch defaults).
        lr: learning rate.
        init_logits: learner logits at epoch 0 ``[V]``; None = ``default_init_logits(q)`` (q reversed).
        renormalize: renormalise p and q over S before the sum (default False, the paper's Sec. 3.3 formula).
        tail: keep the rest of V as one outcome beside S (``divergence(tail=True)``): a proper divergence.

    Returns:
        ``{"q", "k", "forward": {"p", "loss", "support"}, "backward": {...}, "settings", "summary"}``, JSON-ready.

    Raises:
        ValueError: naming the bad setting (see ``check_toy_args``).
    """
    check_toy_args(q, k, epochs, optimizer, lr, init_logits)
    if tail and renormalize:
        raise ValueError("tail and renormalize exclude each other")
    q = [float(x) for x in q]
    init = default_init_logits(q) if init_logits is None else [float(x) for x in init_logits]
    result = {"q": q, "k": k}
    for order in ORDERS:
        result[order] = train_order(order, q, init, k=k, epochs=epochs, optimizer=optimizer, lr=lr,
                                    renormalize=renormalize, tail=tail)
    result["settings"] = {"epochs": epochs, "optimizer": optimizer, "lr": lr, "init_logits": init,
                          "renormalize": renormalize, "tail": tail, "dtype": "float64",
                          "epoch": "one full-batch optimiser step; entry t is measured before step t"}
    result["summary"] = {order: summarize(result[order]["p"], q, result[order]["support"]) for order in ORDERS}
    return result


def save_json(result: dict, path) -> Path:
    """Write ``result`` as JSON (strict: no NaN/inf) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, allow_nan=False) + "\n")
    return path


def _settings_line(result: dict) -> str:
    s = result["settings"]
    q = ", ".join(f"{x:g}" for x in result["q"])
    renorm = ("renormalised over S" if s["renormalize"] else "with the tail outcome" if s.get("tail")
              else "not renormalised")
    return f"q = ({q}), k = {result['k']}, {s['optimizer']} lr = {s['lr']:g}, {renorm}"


def plot_toy(result: dict, path) -> Path:
    """Fig. 3: p_y over epochs (q_y dashed), the support S, and the loss, Forward left, Backward right."""
    q, k = result["q"], result["k"]
    V = len(q)
    fig, axes = plt.subplots(3, 2, figsize=(11, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 0.9, 1.6]})
    titles = {"forward": f"Forward KL(q||p) on the teacher's top-{k} (KD)",
              "backward": f"Backward KL(p||q) on the learner's top-{k} (KA)"}
    for col, order in enumerate(ORDERS):
        run = result[order]
        p = np.asarray(run["p"])  # (E+1, V)
        epochs = np.arange(len(p))
        ax = axes[0, col]
        for y in range(V):
            color = f"C{y % 10}"
            ax.plot(epochs, p[:, y], color=color, lw=1.6, label=f"learner p{y}")
            ax.axhline(q[y], color=color, ls="--", lw=1.0, label=f"teacher q{y} = {q[y]:g}")
        ax.set_title(titles[order], fontsize=11)
        ax.set_ylabel("probability")
        ax.set_ylim(0, max(1.05 * p.max(), 1.1 * max(q)))
        ax.grid(alpha=0.3)
        member = np.zeros((V, len(p)))  # (V, E+1): 1 where y in S at that epoch
        for t, s in enumerate(run["support"]):
            member[s, t] = 1
        ax = axes[1, col]
        ax.imshow(member, aspect="auto", cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest",
                  extent=(-0.5, len(p) - 0.5, V - 0.5, -0.5))
        ax.set_yticks(range(V), [f"y={y}" for y in range(V)], fontsize=8)
        ax.set_ylabel(f"S (top-{k})", fontsize=9)
        ax = axes[2, col]
        ax.plot(epochs, run["loss"], color="k", lw=1.2)
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_ylabel("loss D on S")
        ax.set_xlabel("epoch (one optimiser step)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"4-action toy (Fig. 3): {_settings_line(result)}  —  support S in black", fontsize=11)
    handles, labels = axes[0, 0].get_legend_handles_labels()  # p0, q0, p1, q1, ...: a row of p's over a row of q's
    fig.legend(handles, labels, loc="lower center", ncol=V, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def sweep(q=DEFAULT_Q, *, k: int = 2, epochs: int = 2000, init_logits=None, grid=SWEEP_GRID) -> list[dict]:
    """Run the toy for every (renormalize, optimizer, lr) of ``grid``; one row per setting and order."""
    rows = []
    for renorm, opt, lr in grid:
        result = run_toy(q, k=k, epochs=epochs, optimizer=opt, lr=lr, init_logits=init_logits, renormalize=renorm)
        for order in ORDERS:
            rows.append({"renormalize": renorm, "optimizer": opt, "lr": lr, "order": order,
                         **result["summary"][order]})
    return rows


def format_sweep(rows: list[dict]) -> str:
    """A markdown table of ``sweep`` rows."""

    def vec(x):
        return "(" + ", ".join(f"{v:.3f}" for v in x) + ")"

    def num(x):
        return "inf" if x is None else f"{x:.3f}"

    lines = ["| renorm | opt | lr | order | final p | mean p, last 10% | TV | min TV (epoch) | KL(q‖p) | KL(p‖q) "
             "| final S | switches | 1st switch |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {'yes' if r['renormalize'] else 'no'} | {r['optimizer']} | {r['lr']:g} | {r['order']} "
                     f"| {vec(r['p_final'])} | {vec(r['p_tail_mean'])} | {r['tv']:.3f} "
                     f"| {r['tv_min']:.3f} ({r['tv_min_epoch']}) | {num(r['kl_q_p'])} "
                     f"| {num(r['kl_p_q'])} | {r['support_final']} | {r['support_switches']} "
                     f"| {'-' if r['first_switch_epoch'] is None else r['first_switch_epoch']} |")
    return "\n".join(lines)


def log_gaussian(y: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    """Log density of N(mu, sigma^2) at y."""
    return -0.5 * ((y - mu) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))


def gradient_curves(y: np.ndarray, learner=DEFAULT_LEARNER, teacher=DEFAULT_TEACHER) -> dict:
    """Densities and the per-y derivatives of the two KLs (Fig. 2).

    Args:
        y: grid ``[N]``.
        learner: ``(mu, sigma)`` of p = N(mu, sigma^2).
        teacher: ``((w, mu, sigma), ...)`` of q = sum_i w_i N(mu_i, sigma_i^2), weights summing to 1.

    Returns:
        ``{"y", "p", "q", "g_forward": 1 - q/p, "g_backward": log(p/q)}``, arrays ``[N]``.
        G_{q||p} = d KL(q||p) / dp(y) + 1 and G_{p||q} = d KL(p||q) / dp(y) - 1. With p = softmax(z), a descent step
        moves z_y by -lr p(y) (G(y) - E_p[G]), where E_p[G] = 0 (forward) and KL(p||q) >= 0 (backward).
    """
    y = np.asarray(y, dtype=np.float64)
    weights = [w for w, _, _ in teacher]
    if abs(sum(weights) - 1) > 1e-9 or min(weights) <= 0:
        raise ValueError(f"teacher mixture weights must be > 0 and sum to 1, got {weights}")
    # in log space: the ratio of two far-tail densities would underflow to 0/0
    logp = log_gaussian(y, *learner)
    logq = np.logaddexp.reduce([math.log(w) + log_gaussian(y, mu, s) for w, mu, s in teacher], axis=0)
    return {"y": y, "p": np.exp(logp), "q": np.exp(logq), "g_forward": 1 - np.exp(logq - logp),
            "g_backward": logp - logq}


def plot_gradients(path, learner=DEFAULT_LEARNER, teacher=DEFAULT_TEACHER, lim: float = 6.0) -> Path:
    """Fig. 2: p and q (top), G_{q||p} = 1 - q/p and G_{p||q} = log(p/q) (bottom); p > q and p < q shaded."""
    y = np.linspace(-lim, lim, 1201)
    c = gradient_curves(y, learner, teacher)
    above = c["p"] > c["q"]
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [1, 1.3]})
    mix = " + ".join(f"{w:g}·N({mu:g}, {s:g}²)" for w, mu, s in teacher)
    for ax in (ax0, ax1):
        label = ax is ax1  # one legend entry per shade
        ax.fill_between(y, 0, 1, where=above, transform=ax.get_xaxis_transform(), color="tab:red", alpha=0.12,
                        lw=0, label="p > q (shaded red)" if label else None)
        ax.fill_between(y, 0, 1, where=~above, transform=ax.get_xaxis_transform(), color="tab:blue", alpha=0.12,
                        lw=0, label="p < q (shaded blue)" if label else None)
        ax.grid(alpha=0.3)
    ax0.plot(y, c["p"], color="tab:red", lw=2, label=f"learner p = N({learner[0]:g}, {learner[1]:g}²)")
    ax0.plot(y, c["q"], color="tab:blue", lw=2, label=f"teacher q = {mix}")
    ax0.set_ylabel("density")
    ax0.set_title("Learner p (one Gaussian) against teacher q (two-Gaussian mixture)", fontsize=11)
    ax0.legend(fontsize=8, loc="upper left")
    ax1.plot(y, c["g_forward"], color="tab:purple", lw=2, label=r"forward (KD): $G_{q\|p} = 1 - q/p$")
    ax1.plot(y, c["g_backward"], color="tab:green", lw=2, label=r"backward (KA): $G_{p\|q} = \log(p/q)$")
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set_ylim(-5, 5)
    ax1.set_xlim(-lim, lim)
    ax1.set_xlabel("y")
    ax1.set_ylabel(r"$G(y) = \partial D / \partial p(y)$ + const" + "\n(> 0: pushes p(y) down)")
    ax1.set_title("Derivatives w.r.t. p(y): forward is unbounded below where p < q, backward above where p > q",
                  fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    fig.suptitle("Gradient picture (Fig. 2)", fontsize=12)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
