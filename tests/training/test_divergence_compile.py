"""Opt-in ``use_compile``: the Inductor-compiled chunk gives the eager path's values and gradients.

Compiling costs seconds of CPU (mostly gcc) per configuration, so this file checks a representative subset: on the full
vocabulary forward_kl, half (both KL fast paths), jsd, skew_reverse_kl, tvd in float32 and jsd in float64; top-k with
each support (learner / teacher / union), with and without renormalisation; temperature + mask + bf16; the fallback.
"""

from __future__ import annotations

import logging

import pytest
import torch

import ktransfer.losses.divergences as D
from ktransfer.losses import native
from ktransfer.losses.divergences import divergence


@pytest.fixture(autouse=True, scope="module")
def python_path_only():
    """The compiled graph replaces the Python chunk math; the C++ kernel (ktransfer.losses.native) would bypass both."""
    saved = native._STATE["enabled"]
    native.use_native(False)
    yield
    native._STATE["enabled"] = saved


@pytest.fixture(scope="module")
def compiled():
    saved = dict(D._COMPILE)
    D.use_compile(True)
    if D._COMPILE["failed"]:  # pragma: no cover - torch.compile missing from this build
        pytest.fail("torch.compile is unavailable in this environment")
    yield
    D._COMPILE.update(saved)


def _logits(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    u = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    return z, u


def _value_grad(z, u, kind, on, **kw):
    D._COMPILE["enabled"] = on
    try:
        x = z.detach().clone().requires_grad_(True)
        v = divergence(x, u, kind, chunk_size=4, **kw)  # 10 rows: chunks of 4, 4, 2 (no 1-row chunk to specialise)
        v.backward()
    finally:
        D._COMPILE["enabled"] = True
    return v.detach(), x.grad


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check(kind, dtype=torch.float32, shape=(2, 5, 40), seed=0, **kw):
    z, u = _logits(shape, dtype, seed)
    vc, gc = _value_grad(z, u, kind, True, **kw)
    assert not D._COMPILE["failed"], "the compiled chunk failed and fell back to eager: nothing was compared"
    ve, ge = _value_grad(z, u, kind, False, **kw)
    v64, g64 = _value_grad(z.double(), u.double(), kind, False, **kw)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert _rel(vc, ve) < tol and _rel(gc, ge) < tol * 5
    assert _rel(vc, v64) < tol and _rel(gc, g64) < tol * 5
    assert gc.dtype == ge.dtype and vc.dtype == ve.dtype


@pytest.mark.parametrize("kind", ["forward_kl", "half", "jsd", "skew_reverse_kl", "tvd"])
def test_full_vocab_float32(compiled, kind):
    _check(kind)


@pytest.mark.parametrize("kind", ["jsd"])
def test_full_vocab_float64(compiled, kind):
    _check(kind, torch.float64)


@pytest.mark.parametrize(
    "kind,support,renormalize",
    [
        ("forward_kl", "teacher", False),
        ("reverse_kl", "learner", True),
        ("jsd", "union", True),
        ("skew_forward_kl", "learner", False),
    ],
)
def test_top_k_supports(compiled, kind, support, renormalize):
    _check(kind, top_k=6, support=support, renormalize=renormalize)


def test_temperature_mask_and_bf16(compiled):
    z, u = _logits((2, 5, 40), torch.bfloat16, 1)
    mask = torch.tensor([[True, False, True, True, False], [True, True, False, True, True]])
    kw = dict(temperature=2.0, mask=mask, reduction="sum")
    vc, gc = _value_grad(z, u, "jsd", True, **kw)
    assert not D._COMPILE["failed"]
    ve, ge = _value_grad(z, u, "jsd", False, **kw)
    assert gc.dtype == torch.bfloat16 and bool((gc[~mask] == 0).all())
    assert _rel(vc, ve) < 2e-5 and _rel(gc, ge) < 1e-2  # bf16 gradient: one bf16 rounding step apart at most


def _broken(*args):
    raise RuntimeError("no C++ compiler")


def test_failure_falls_back_to_eager_once(caplog):
    saved = dict(D._COMPILE)
    z, u = _logits((4, 30), torch.float32, 2)
    try:
        D._COMPILE.update(enabled=False, fn=None, failed=False)
        ve, ge = _value_grad(z, u, "skew_forward_kl", False)
        D._COMPILE.update(enabled=True, fn=_broken, failed=False)
        with caplog.at_level(logging.WARNING, logger="ktransfer.losses.divergences"):
            vf, gf = _value_grad(z, u, "skew_forward_kl", True)
            _value_grad(z, u, "skew_forward_kl", True)
        assert D._COMPILE["failed"]
    finally:
        D._COMPILE.update(saved)
    assert sum("no C++ compiler" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(vf, ve) and torch.equal(gf, ge)


def test_switched_off_never_calls_the_compiled_graph(caplog):
    saved = dict(D._COMPILE)
    z, u = _logits((4, 30), torch.float32, 3)
    try:
        D._COMPILE.update(enabled=True, fn=_broken, failed=False)
        D.use_compile(False)
        with caplog.at_level(logging.WARNING, logger="ktransfer.losses.divergences"):
            divergence(z.requires_grad_(True), u, "tvd").backward()
        assert not D._COMPILE["failed"] and not caplog.records
    finally:
        D._COMPILE.update(saved)
    with pytest.raises(ValueError, match="True or False"):
        D.use_compile("yes")
