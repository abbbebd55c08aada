"""Shared fixtures: the real corpora under ``../shared/data`` (relative to the repo root) and a small tokenizer.

The tests come in tiers, one folder each, and every test is marked with its folder's name:

- ``unit``: losses, objectives, fused head, config, model families, tokenizers, data, toy, kernel, layout (the fast
  tier: ``pytest tests/unit``, about a minute on 2 cores);
- ``training``: training runs, checkpoints, resume, caches, on-policy prefixes, Hugging Face models, integrations;
- ``cli``: the commands end to end (evaluate, translate, generate, distill-data, reproduce);
- ``distributed``: torchrun process groups (DDP, FSDP, sharded evaluation);
- ``faults``: kills, full disks, hostile inputs.

``pytest`` runs them all; ``pytest -m "not distributed"`` and the like pick some.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TIERS = ("unit", "training", "cli", "distributed", "faults")

# Test helpers (``hf_tiny``, builders in ``test_hf_models``, references in ``test_divergences``) are imported by
# module name from any tier.
sys.path[:0] = [str(TESTS), *(str(TESTS / tier) for tier in TIERS)]


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier, the name of the folder it sits in."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real corpora (``multi30k-de-en``, ``th-en-lowres``, ...); skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _ktransfer_data_env(monkeypatch):
    """Corpus names resolve under ``../shared/data`` in every test (``$KTRANSFER_DATA``)."""
    if SHARED_DATA.is_dir():
        monkeypatch.setenv("KTRANSFER_DATA", str(SHARED_DATA))


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models are faster so, and far faster when other jobs share the cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_tokenizer(shared_data):
    """A 2,000-token joint BPE trained on the first 3,000 lines of multi30k-de-en train (both sides): ~0.2 s."""
    from ktransfer.models.tokenizer import train_tokenizer

    folder = shared_data / "multi30k-de-en"
    lines = []
    for lang in ("de", "en"):
        lines += (folder / f"train.{lang}").read_text(encoding="utf-8").split("\n")[:3000]
    return train_tokenizer(lines, vocab_size=2000)


@pytest.fixture(scope="session")
def multi30k_lines(shared_data) -> dict[str, list[str]]:
    """The first 2,000 training lines of multi30k-de-en, by language (``"de"``, ``"en"``)."""
    folder = shared_data / "multi30k-de-en"
    return {lang: (folder / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:2000] for lang in ("de", "en")}


@pytest.fixture(scope="session")
def llama_folder(multi30k_lines, tmp_path_factory) -> Path:
    """A tiny Llama teacher with a Llama-style fast tokenizer and a chat template (``test_hf_models.llama_teacher``)."""
    from test_hf_models import llama_teacher

    return llama_teacher(tmp_path_factory.mktemp("llama") / "teacher", multi30k_lines)
