"""Downloading public corpora (Multi30k, sacrebleu's test sets) into ``SPLIT.LANG`` folders.

Downloads are written into a temporary folder beside the destination and renamed into place only once every
checksum and every file has been verified.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ktransfer.data.corpora import DATA_ENV, CorpusError, data_dir, describe_layout, read_split, resolve_corpus


class DownloadError(RuntimeError):
    """A download failed (network, checksum, archive); nothing was left behind."""


# --------------------------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------------------------
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test2016": "test_2016_flickr"}  # our split -> remote stem
MULTI30K_LANGS = ("de", "en", "fr", "cs")
# MD5 of the gzipped files of multi30k/dataset task 1, as published with torchtext's Multi30k loader.
MULTI30K_MD5 = {
    "train.de.gz": "81ff90b99829c0cd4b1b587d394afd39",
    "train.en.gz": "0065d13af80720a55ca8153d126e6627",
    "train.fr.gz": "6cb767741dcad3931f966fefbc05203f",
    "train.cs.gz": "d9a5fc268917725a2b0efce3a0cc8607",
    "val.de.gz": "6e0e229eb049e3fc99a1ef02fb2d5f91",
    "val.en.gz": "2b69aa9253948ac9f67e94917272dd40",
    "val.fr.gz": "93fc564584b7e5ba410c761ea5a1c682",
    "val.cs.gz": "83cdc082f646b769095615384cf5c0ca",
    "test_2016_flickr.de.gz": "efd67d314d98489b716b145475101932",
    "test_2016_flickr.en.gz": "ff2c0fcb4893a13bd73414306bc250ae",
    "test_2016_flickr.fr.gz": "08dc7cd4a662f31718412de95ca9bfe3",
    "test_2016_flickr.cs.gz": "3104872229daa1bef3b401d44dd2220b",
}


def download_corpus(
    name: str, dest: str | os.PathLike | None = None, *, base_url: str | None = None,
    checksums: Mapping[str, str] | None = None, corpus: str | None = None, split: str | None = None,
    force: bool = False, log: Callable[[str], object] = print, progress: bool = False,
) -> Path:
    """Download a public corpus into ``dest`` (default ``data_dir()``) as ``SPLIT.LANG`` files; returns its folder.

    Names:
        ``multi30k`` or ``multi30k-SRC-TGT`` (SRC, TGT in de, en, fr, cs; default de-en): Multi30k task 1 from the
        multi30k/dataset repository, as ``train``, ``valid`` and ``test2016``, into ``multi30k-SRC-TGT/``.
        ``TESTSET:SRC-TGT`` (e.g. ``wmt16:de-en``, ``iwslt17:de-en``): a dev/test set that sacrebleu knows, via its
        registry (URLs, MD5 sums, format parsers); source and first reference, as split ``split`` (default
        ``test``) of folder ``corpus`` (default ``TESTSET-SRC-TGT``). Add it to an existing corpus with ``corpus``
        and ``split`` (e.g. ``corpus="wmt-news-de-en", split="valid"``).

    Args:
        base_url: fetch every file from ``BASE_URL/FILE_NAME`` instead of its canonical URL (a mirror).
        checksums: ``{file name: md5 or sha256 hex}`` replacing the built-in table (32 hex digits: MD5, 64: SHA-256).
        force: replace ``SPLIT.LANG`` files that already exist (otherwise an error).
        progress: a progress bar (tqdm, on stderr) per downloaded file.

    Everything is fetched, verified and unpacked in a temporary folder inside ``dest``; only whole, checked files
    are moved into place (a new corpus folder by one rename), and the temporary folder is always removed.

    Raises:
        DownloadError: unknown name, network failure, checksum mismatch, bad archive, files already present.
        CorpusError: the downloaded files are not a valid corpus (line counts, UTF-8).
    """
    dest = Path(dest).expanduser() if dest is not None else data_dir()
    if name == "multi30k" or name.startswith("multi30k-"):
        langs = name.split("-")[1:] or ["de", "en"]
        if len(langs) != 2 or not set(langs) <= set(MULTI30K_LANGS) or langs[0] == langs[1]:
            raise DownloadError(f"unknown Multi30k pair {name!r}: use multi30k-SRC-TGT with SRC, TGT in "
                                f"{', '.join(MULTI30K_LANGS)}")
        if split is not None:
            raise DownloadError("split cannot be set for Multi30k: it has train, valid and test2016")
        return _download_multi30k(langs[0], langs[1], dest, corpus or f"multi30k-{langs[0]}-{langs[1]}",
                                  base_url=base_url, checksums=checksums, force=force, log=log, progress=progress)
    if ":" in name:
        test_set, pair = name.rsplit(":", 1)
        return _download_sacrebleu(test_set, pair, dest, corpus=corpus, split=split or "test", base_url=base_url,
                                   checksums=checksums, force=force, log=log, progress=progress)
    raise DownloadError(f"unknown corpus {name!r}: known are multi30k[-SRC-TGT] and TESTSET:SRC-TGT for the test sets "
                        f"sacrebleu knows (e.g. wmt16:de-en, wmt14:de-en, iwslt17:de-en; `sacrebleu --list`)")


def downloadable(name: str) -> bool:
    """Whether ``download_corpus`` fetches the corpus folder ``name`` by that name: ``multi30k-SRC-TGT``."""
    langs = name.split("-")[1:] if name.startswith("multi30k-") else []
    return len(langs) == 2 and set(langs) <= set(MULTI30K_LANGS) and langs[0] != langs[1]


def ensure_corpus(corpus: str | os.PathLike, *, base_url: str | None = None,
                  checksums: Mapping[str, str] | None = None, log: Callable[[str], object] | None = None) -> Path:
    """The folder of ``corpus`` (``resolve_corpus``); a corpus name missing from ``data_dir()`` that
    ``download_corpus`` knows (``downloadable``) is downloaded there first, as ``ktransfer data download NAME``
    does (checksums verified, a progress bar per file), and one line (``log``, default stderr) says where it went.

    Raises:
        CorpusError: not found and not downloadable (``resolve_corpus``'s message), or the download failed: one line
            naming the folder to fill and the command that fills it from a mirror; nothing is left behind (not even
            the data folder, when the download created it).
    """
    try:
        return resolve_corpus(corpus)
    except CorpusError:
        name = str(corpus)
        if Path(name).expanduser().exists() or not downloadable(name):
            raise
    root = data_dir()
    created = [p for p in (root, *root.parents) if not p.exists()]
    try:
        folder = download_corpus(name, root, base_url=base_url, checksums=checksums, log=lambda _: None,
                                 progress=True)
    except (DownloadError, CorpusError) as e:
        for p in created:  # innermost first: only the folders this call made, and only if empty
            try:
                p.rmdir()
            except OSError:
                break
        files = ", ".join(f"{stem}.{lang}.gz" for stem in MULTI30K_SPLITS.values() for lang in name.split("-")[1:])
        where = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else f"the default data folder; ${DATA_ENV} sets another"
        raise CorpusError(
            f"corpus {name!r} is not in {root} ({where}) and could not be downloaded ({e}); fill that folder "
            f"with `ktransfer data download {name} --base-url MIRROR` (MIRROR: a URL or file:// folder holding "
            f"{files}), or set ${DATA_ENV} to a folder that holds {name}/") from None
    (log or _stderr)(f"downloaded corpus {name} (checksums verified) into {folder}")
    return folder


def _stderr(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _download_multi30k(src: str, tgt: str, dest: Path, folder_name: str, *, base_url, checksums, force, log,
                       progress) -> Path:
    base = (base_url or MULTI30K_URL).rstrip("/")
    table = MULTI30K_MD5 if checksums is None else checksums
    with _staging(dest, folder_name) as (work, out):
        for split, stem in MULTI30K_SPLITS.items():
            for lang in (src, tgt):
                file_name = f"{stem}.{lang}.gz"
                archive = work / file_name
                _fetch(f"{base}/{file_name}", archive, table.get(file_name), log, progress)
                _gunzip(archive, out / f"{split}.{lang}", f"{base}/{file_name}")
        for split in MULTI30K_SPLITS:
            read_split(out, split, src, tgt)
        return _install(out, dest / folder_name, force, log)


def _download_sacrebleu(test_set: str, pair: str, dest: Path, *, corpus, split, base_url, checksums, force,
                        log, progress) -> Path:
    from sacrebleu.dataset import DATASETS

    if test_set not in DATASETS:
        near = [n for n in DATASETS if n.split("/")[0][:4] == test_set[:4]] or sorted(DATASETS)[:20]
        raise DownloadError(f"sacrebleu has no test set {test_set!r}; some it has: {', '.join(sorted(near))}")
    dataset = DATASETS[test_set]
    if pair not in dataset.langpairs:
        raise DownloadError(f"sacrebleu test set {test_set!r} has no pair {pair!r}; it has: "
                            f"{', '.join(sorted(dataset.langpairs))}")
    if pair.count("-") != 1:
        raise DownloadError(f"language pair must be SRC-TGT, got {pair!r}")
    src, tgt = pair.split("-")
    folder_name = corpus or f"{test_set.replace('/', '_')}-{pair}"
    md5s = list(dataset.md5 or [])[: len(dataset.data)]
    md5s += [None] * (len(dataset.data) - len(md5s))
    with _staging(dest, folder_name) as (work, out):
        # A private copy of sacrebleu's dataset that keeps its files in our temporary folder.
        local = copy.copy(dataset)
        local._outdir, local._rawdir = str(work / "sacrebleu"), str(work / "sacrebleu" / "raw")
        raw = Path(local._rawdir)
        raw.mkdir(parents=True)
        for url, md5 in zip(dataset.data, md5s, strict=True):
            file_name = _url_file_name(url)
            source = f"{base_url.rstrip('/')}/{file_name}" if base_url else url
            archive = raw / local._get_tarball_filename(url)
            _fetch(source, archive, md5 if checksums is None else checksums.get(file_name), log, progress)
            _unpack(archive, raw, source)
        try:  # sacrebleu finds the archives in place, skips its own download and converts them to text
            src_file = local.get_source_file(pair)
            ref_file = local.get_reference_files(pair)[0]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise DownloadError(f"could not extract {test_set} {pair} from the downloaded files: {e}") from e
        shutil.copyfile(src_file, out / f"{split}.{src}")
        shutil.copyfile(ref_file, out / f"{split}.{tgt}")
        read_split(out, split, src, tgt)
        return _install(out, dest / folder_name, force, log)


@contextmanager
def _staging(dest: Path, folder_name: str) -> Iterator[tuple[Path, Path]]:
    """A temporary folder inside ``dest``: ``(work, out)``; removed on exit whatever happens."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{folder_name}.part-"))
    try:
        (tmp / "work").mkdir()
        (tmp / "out").mkdir()
        yield tmp / "work", tmp / "out"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(out: Path, folder: Path, force: bool, log) -> Path:
    """Move the verified files of ``out`` into ``folder``: one rename if it is new, else file by file."""
    if not folder.exists():
        os.rename(out, folder)
    else:
        targets = [(f, folder / f.name) for f in sorted(out.iterdir())]
        present = [str(t) for _, t in targets if t.exists()]
        if present and not force:
            raise DownloadError(f"{', '.join(present)} already exist; remove them or pass --force to replace them")
        for f, t in targets:
            os.replace(f, t)
    log(f"wrote {folder}: {describe_layout(folder)}")
    return folder


def _url_file_name(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path)


def _fetch(url: str, path: Path, expected: str | None, log, progress: bool = False) -> None:
    """Stream ``url`` to ``path`` and verify its checksum (MD5 if 32 hex digits, SHA-256 if 64); ``progress``: a
    tqdm bar on stderr."""
    from tqdm import tqdm

    algo = {32: "md5", 64: "sha256"}.get(len(expected or ""), "sha256")
    if expected is not None and len(expected) not in (32, 64):
        raise DownloadError(f"checksum for {url} must be 32 (MD5) or 64 (SHA-256) hex digits, got {expected!r}")
    log(f"downloading {url}")
    digest = hashlib.new(algo)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
            size = response.headers.get("Content-Length")
            with tqdm(total=int(size) if size and size.isdigit() else None, unit="B", unit_scale=True,
                      desc=_url_file_name(url), disable=not progress, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DownloadError(f"could not download {url}: {e}") from e
    got = digest.hexdigest()
    if expected is None:
        log(f"warning: no checksum known for {url}; not verified ({algo} {got})")
    elif got != expected.lower():
        raise DownloadError(f"checksum mismatch for {url}: {algo} is {got}, expected {expected}; nothing was kept")


def _gunzip(archive: Path, target: Path, url: str) -> None:
    try:
        with gzip.open(archive, "rb") as f_in, open(target, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    except (OSError, EOFError) as e:
        raise DownloadError(f"{url}: not a valid gzip file: {e}") from e


def _unpack(archive: Path, into: Path, url: str) -> None:
    """Unpack a .tar.gz/.tgz/.zip archive in place (other files are left as they are)."""
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(into, filter="data")
                else:  # Python < 3.11.4: refuse members that would land outside ``into``
                    for m in tar.getmembers():
                        if not (into / m.name).resolve().is_relative_to(into.resolve()) or m.issym() or m.islnk():
                            raise DownloadError(f"{url}: unsafe archive member {m.name!r}")
                    tar.extractall(into)
        elif archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise DownloadError(f"{url}: cannot unpack: {e}") from e
