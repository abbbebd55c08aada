"""Shared fixtures: the real corpora under ``../shared/data`` (relative to the repo root) and a small tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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
