"""The 4-action toy and the gradient picture: what the mathematics predicts for each formulation (docs/toy.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ktransfer import cli
from ktransfer.experiments import toy

Q = [0.4, 0.3, 0.2, 0.1]
INIT = [math.log(x) for x in (0.1, 0.2, 0.3, 0.4)]  # the default: q reversed, top-2 = {2, 3}


def softmax(z):
    e = np.exp(np.asarray(z, dtype=np.float64) - max(z))
    return e / e.sum()


def test_default_init_is_q_reversed_and_top2_differs():
    assert toy.default_init_logits(Q) == pytest.approx(INIT)
    r = toy.run_toy(epochs=0)
    assert r["forward"]["p"][0] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert r["forward"]["support"][0] == [0, 1]  # teacher's top-2
    assert r["backward"]["support"][0] == [2, 3]  # learner's own top-2 at epoch 0, disjoint from the teacher's


def test_initial_losses_match_closed_form():
    # forward: sum_{0,1} q log(q/p) = .4 log 4 + .3 log 1.5; backward: sum_{2,3} p log(p/q) = .3 log 1.5 + .4 log 4
    r = toy.run_toy(epochs=0)
    expected = 0.4 * math.log(4) + 0.3 * math.log(1.5)
    assert r["forward"]["loss"][0] == pytest.approx(expected, abs=1e-12)
    assert r["backward"]["loss"][0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_first_sgd_step_matches_hand_gradient(order):
    # dD/dz = w 1_S - p sum_S w with w = p dD/dp: w = -q (forward), w = p (log(p/q) + 1) (backward)
    lr = 0.5
    r = toy.train_order(order, Q, INIT, k=2, epochs=1, optimizer="sgd", lr=lr, renormalize=False)
    p, q = softmax(INIT), np.array(Q)
    S = [0, 1] if order == "forward" else [2, 3]
    w = np.zeros(4)
    w[S] = -q[S] if order == "forward" else p[S] * (np.log(p[S] / q[S]) + 1)
    grad = w - p * w.sum()
    assert r["p"][1] == pytest.approx(softmax(np.array(INIT) - lr * grad).tolist(), abs=1e-12)


def test_forward_unrenormalized_converges_to_q_over_support_mass():
    # min_p sum_{y in S} q_y log(q_y / p_y) over the simplex: p_S = q_S / q(S), p = 0 off S (off-S mass only costs)
    r = toy.train_order("forward", Q, INIT, k=2, epochs=200, optimizer="adam", lr=0.5, renormalize=False)
    p = np.array(r["p"])
    assert p[-1, :2] == pytest.approx([0.4 / 0.7, 0.3 / 0.7], abs=1e-3)
    assert p[-1, 2:].max() < 1e-3
    off = p[:, 2:].sum(1)
    assert np.all(np.diff(off) < 0)  # the mass off S only ever shrinks
    assert all(s == [0, 1] for s in r["support"])
    assert r["loss"][-1] == pytest.approx(0.7 * math.log(0.7), abs=1e-3)  # infimum q(S) log q(S)


def test_forward_renormalized_fits_ratio_and_leaves_off_support_logits_alone():
    # KL(q_S/q(S) || p_S/p(S)) only sees z0 - z1: z0 - z1 -> log(4/3), z0 + z1 is conserved by SGD,
    # and z2, z3 get no gradient
    r = toy.run_toy(epochs=150, optimizer="sgd", lr=0.5, renormalize=True)
    z0_plus_z1 = INIT[0] + INIT[1]
    d = math.log(0.4 / 0.3)
    expected = softmax([(z0_plus_z1 + d) / 2, (z0_plus_z1 - d) / 2, INIT[2], INIT[3]])
    assert r["forward"]["p"][-1] == pytest.approx(expected.tolist(), abs=1e-6)
    p = np.array(r["forward"]["p"])
    assert p[:, 2] / p[:, 3] == pytest.approx(0.75, abs=1e-12)  # z2 - z3 never moves


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 0.05)])
def test_backward_renormalized_keeps_its_own_support_and_fits_the_ratio_there(optimizer, lr):
    # S = {2, 3}: z2 - z3 -> log(q2/q3) = log 2 with z2 + z3 conserved, so z3 ends at (z2 + z3 - log 2) / 2 = log .245,
    # above z1 = log .2: S never switches and p ends far from q (only the ratio p2/p3 = 2 is learnt)
    r = toy.run_toy(epochs=200, optimizer=optimizer, lr=lr, renormalize=True)
    assert all(s == [2, 3] for s in r["backward"]["support"])
    expected = softmax([INIT[0], INIT[1], math.log(0.49), math.log(0.245)])
    assert r["backward"]["p"][-1] == pytest.approx(expected.tolist(), abs=1e-4)
    assert r["summary"]["backward"]["tv"] > 0.4  # farther from q than at the start (TV 0.4)


@pytest.mark.parametrize("init,switches", [([0.0, 1.0, 1.3, 1.2], True), ([0.0, 0.5, 1.3, 1.2], False)])
def test_backward_renormalized_switches_iff_the_falling_logit_crosses_an_outside_one(init, switches):
    # gradient flow on S = {2, 3} moves z3 monotonically to (z2 + z3 - log 2) / 2;
    # S switches iff that is below max(z0, z1)
    assert ((init[2] + init[3] - math.log(2)) / 2 < max(init[:2])) == switches
    r = toy.train_order("backward", Q, init, k=2, epochs=150, optimizer="sgd", lr=0.5, renormalize=True)
    s = toy.summarize(r["p"], Q, r["support"])
    assert (s["first_switch_epoch"] is not None) == switches
    a, b = s["support_final"]
    p = s["p_final"]
    assert p[a] / p[b] == pytest.approx(Q[a] / Q[b], abs=1e-5)  # p_S proportional to q_S on the final S
    assert sorted(np.argsort(p)[-2:].tolist()) == [a, b]  # and S is the learner's top-2


def test_backward_unrenormalized_leaves_its_support_and_chatters_to_uniform():
    # each y in S is pulled towards q_y / e < 1/4 while the free mass off S grows, so the learner's top-2 keeps
    # changing; no stationary point exists for V = 4, k = 2 and p -> uniform (docs/toy.md)
    r = toy.train_order("backward", Q, INIT, k=2, epochs=600, optimizer="sgd", lr=0.1, renormalize=False)
    s = toy.summarize(r["p"], Q, r["support"])
    assert r["support"][0] == [2, 3]
    assert s["first_switch_epoch"] is not None and s["first_switch_epoch"] < 20
    assert s["support_switches"] > 400
    assert s["p_tail_mean"] == pytest.approx([0.25] * 4, abs=0.01)
    assert s["tv"] == pytest.approx(0.2, abs=0.02)  # TV(uniform, q) = 0.2 < 0.3 = TV(forward's limit, q)
    seen = {tuple(x) for x in r["support"][-300:]}
    assert (0, 1) in seen and len(seen) >= 4  # visits the teacher's top-2 but does not settle on it


def test_backward_unrenormalized_stationary_point_is_q_over_e_when_v_is_large():
    # a true stationary point: p_S = q_S / e (d/dp p log(p/q) = 0), S = learner's top-k, mass off S free; it exists when
    # the 1 - q(S)/e left over fits under min_S q/e on V - k actions: V = 12, q = (.45, .45, .01 ...) does
    V = 12
    q = [0.45, 0.45] + [0.1 / (V - 2)] * (V - 2)
    init = [0.0] * V
    init[5], init[6] = 1.0, 0.9
    r = toy.train_order("backward", q, init, k=2, epochs=400, optimizer="sgd", lr=1.0, renormalize=False)
    assert r["support"][-1] == [0, 1]
    assert r["p"][-1][:2] == pytest.approx([0.45 / math.e] * 2, abs=1e-6)
    assert r["loss"][-1] == pytest.approx(-0.9 / math.e, abs=1e-8)


def test_json_schema(tmp_path):
    r = toy.run_toy(epochs=5)
    path = toy.save_json(r, tmp_path / "toy.json")
    d = json.loads(path.read_text())
    assert d["q"] == Q and d["k"] == 2
    for order in ("forward", "backward"):
        assert set(d[order]) == {"p", "loss", "support"}
        assert len(d[order]["p"]) == len(d[order]["loss"]) == len(d[order]["support"]) == 6
        assert all(len(p) == 4 and abs(sum(p) - 1) < 1e-12 for p in d[order]["p"])
        assert all(len(s) == 2 and s == sorted(s) for s in d[order]["support"])
    assert d["settings"]["optimizer"] == "sgd" and d["settings"]["renormalize"] is False


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="sum"):
        toy.run_toy([0.5, 0.3, 0.1, 0.05])
    with pytest.raises(ValueError, match="k must be"):
        toy.run_toy(k=5)
    with pytest.raises(ValueError, match="3 values"):
        toy.run_toy(init_logits=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="optimizer"):
        toy.run_toy(optimizer="rmsprop")


def test_gradient_curves_match_independent_formulas():
    y = np.linspace(-6, 6, 241)
    c = toy.gradient_curves(y, learner=(0.5, 1.6), teacher=((0.6, -2.0, 0.8), (0.4, 2.5, 0.7)))

    def normal(x, mu, s):
        return np.exp(-((x - mu) ** 2) / (2 * s * s)) / math.sqrt(2 * math.pi * s * s)

    p = normal(y, 0.5, 1.6)
    q = 0.6 * normal(y, -2.0, 0.8) + 0.4 * normal(y, 2.5, 0.7)
    assert np.allclose(c["p"], p) and np.allclose(c["q"], q)
    assert np.allclose(c["g_forward"], 1 - q / p, rtol=1e-9, atol=1e-12)
    assert np.allclose(c["g_backward"], np.log(p / q), rtol=1e-9, atol=1e-12)
    assert np.all((c["g_backward"] > 0) == (p > q)) and np.all((c["g_forward"] > 0) == (p > q))  # same sign regions


def test_cli_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / "toy"
    assert cli.main(["toy", "--epochs", "20", "--gradients", "-o", str(out)]) == 0
    for name in ("toy.json", "toy.png", "toy_gradients.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "toy.json").read_text())
    assert len(d["backward"]["p"]) == 21 and d["k"] == 2
    assert "backward" in capsys.readouterr().out


def test_cli_options_reach_the_run(tmp_path):
    out = tmp_path / "toy"
    argv = ["toy", "--q", "0.5", "0.25", "0.25", "--k", "1", "--epochs", "3", "--optimizer", "adam", "--lr", "0.1",
            "--init-logits", "0", "1", "2", "--renormalize", "-o", str(out)]
    assert cli.main(argv) == 0
    d = json.loads((out / "toy.json").read_text())
    assert d["q"] == [0.5, 0.25, 0.25] and d["k"] == 1
    expected = {"optimizer": "adam", "lr": 0.1, "renormalize": True, "init_logits": [0, 1, 2]}
    assert {key: d["settings"][key] for key in expected} == expected


def test_cli_bad_q_is_an_error_naming_it(tmp_path, capsys):
    assert cli.main(["toy", "--q", "0.5", "0.6", "-o", str(tmp_path)]) == 2
    assert "sum(q) = 1.1" in capsys.readouterr().err


def test_cli_help_is_helpful(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["toy", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--q", "--k", "--epochs", "--optimizer", "--lr", "--init-logits", "--renormalize", "--output",
                 "--gradients", "--sweep", "teacher's top-k", "toy.json", "examples"):
        assert word in text


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.5), ("adam", 0.05)])
def test_with_the_tail_both_orders_reach_q_on_the_support_and_the_rest_mass(optimizer, lr):
    """tail=True: the coarsened divergence is proper, so Forward and Backward both end at p_S = q_S and
    p(rest) = q(rest) (the split inside the rest is a flat direction: the optimiser decides it), where the paper's
    formula leaves Forward at q_S / q(S) and Backward chattering (see the other tests)."""
    from ktransfer.experiments.toy import DEFAULT_Q, run_toy

    q = np.asarray(DEFAULT_Q)
    result = run_toy(k=2, epochs=2000, optimizer=optimizer, lr=lr, tail=True)
    for order in ("forward", "backward"):
        s = result["summary"][order]
        p = np.asarray(s["p_final"])
        S = s["support_final"]
        assert S == [0, 1]  # q's top-2, and p's own at the end
        rest = [y for y in range(len(q)) if y not in S]
        np.testing.assert_allclose(p[S], q[S], atol=1e-3)
        assert abs(p[rest].sum() - q[rest].sum()) < 1e-3
    with pytest.raises(ValueError, match="tail and renormalize exclude each other"):
        run_toy(tail=True, renormalize=True)
