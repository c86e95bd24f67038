"""Text -> tokens -> packed samples -> webdataset tar shards + manifest.json (see format.py).

Inputs (files, or folders searched recursively in sorted order; hidden names skipped):

* ``.txt`` / ``.text`` / ``.md`` / ``.rst`` (optionally ``.gz``): by default ONE DOCUMENT PER FILE
  (books, articles, a Brown text: long-range context stays whole). ``txt_docs="paragraph"`` makes
  every blank-line-separated block its own document instead. Line endings are normalized to "\\n";
  otherwise text is kept exactly (whitespace-only documents are skipped).
* ``.jsonl`` (optionally ``.gz``): one JSON object per line, the document in ``text_field``; empty
  strings are skipped, a missing field is an error naming file and line.

Streaming, so memory stays flat for any corpus size: files are read line by line; a document
longer than `max_piece_chars` (default 256K chars: a Shakespeare play stays whole, a long book
does not) is tokenized in pieces cut just before a newline (preferring blank lines), because HF
`tokenizers` holds ~600 bytes per token while encoding (a 4M-char piece peaks at ~0.8 GB). A cut
can change tokenization only at the cut; a dummy-prefix space marker ("▁", SentencePiece /
Metaspace) that a tokenizer adds at the start of a continuation piece is dropped, so decoding
stays exact. The reader feeds batches of pieces (~256K chars) to a `multiprocessing` pool with at
most 2 x num_proc batches in flight (Pool.imap has no back-pressure and would queue the whole
corpus), results are consumed in order, and each split's packer keeps only the tail shorter than
one sample.

Validation split, by documents, deterministic in `seed`: with `val_fraction`, a document goes to
val when blake2b(seed, source name, document index in that source) / 2**64 < val_fraction (one
pass; independent of the order inputs are listed in); with `val_docs=K`, exactly the K documents
with the smallest such hash (an extra reading pass, O(K) memory).

Output is written to a temporary folder beside `out_dir` and renamed into place at the end; an
existing `out_dir` is refused unless `overwrite=True` (and even then only if it is a previous
dataset or empty, and never when it is an input or holds one), and is swapped out only after the
new one is complete; on any error the temporary folder is removed, so a half-written dataset is
never left at `out_dir` (an I/O failure, such as a full disk, is an OSError naming the file), and
the temporary folder of a killed run is removed by the next one (fsutil.remove_stale).
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tarfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from megaxatl.data import tokenizer as tk
from megaxatl.fsutil import check_output, named, naming, publish, remove_stale, sha256_file, temp_sibling
from megaxatl.data.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META_EXT,
    TOKENS_EXT,
    DataError,
    meta_bytes,
    npy_bytes,
    sample_key,
    sample_stride,
    shard_name,
    token_dtype,
)

log = logging.getLogger("megaxatl.data")

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
TASK_CHARS = 1 << 18  # characters per tokenization task (HF tokenizers: ~600 B/token)
TASK_PIECES = 1024


# ------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Source:
    path: Path
    name: str  # stable name (relative to the input argument) used for the val split hash
    kind: str  # "text" | "jsonl"
    origin: int = 0  # index of the input argument it came from


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def discover(inputs: Sequence[str | Path]) -> list[Source]:
    """Expand files and folders into the ordered list of input files; errors name the path."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no input files given")
    sources: list[Source] = []
    for origin, item in enumerate(inputs):
        p = Path(item)
        if p.is_dir():
            found = []
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if any(part.startswith(".") for part in rel.parts) or not f.is_file():
                    continue
                if (kind := _kind(f)) is not None:
                    found.append(Source(f, f"{p.name}/{rel.as_posix()}", kind, origin))
            if not found:
                raise DataError(f"{p}: folder holds no .txt/.jsonl (or .gz) files")
            sources += found
        elif p.is_file():
            kind = _kind(p)
            if kind is None:
                raise DataError(f"{p}: unsupported input type (want .txt, .text, .md, .rst, "
                                ".jsonl, optionally .gz)")
            sources.append(Source(p, p.name, kind, origin))
        else:
            raise DataError(f"{p}: no such file or folder")
    empty = [str(s.path) for s in sources if s.path.stat().st_size == 0]
    if empty:
        raise DataError(f"empty input file{'s' if len(empty) > 1 else ''}: {', '.join(empty)}")
    return sources


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict")


def _split_long(text: str, max_chars: int) -> Iterator[str]:
    """Cut `text` into pieces of about `max_chars`, each cut just before a newline (the second
    newline of a blank line if one is near), so every continuation piece starts with "\n"."""
    start, n = 0, len(text)
    while n - start > max_chars:
        lo = start + max_chars
        cut = text.find("\n\n", lo, lo + max_chars)
        cut = cut + 1 if cut >= 0 else text.find("\n", lo)
        if cut < 0 or cut >= n:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def iter_documents(src: Source, *, txt_docs: str = "file", text_field: str = "text",
                   max_piece_chars: int = 1 << 18) -> Iterator[tuple[int, Iterator[str]]]:
    """Yield (document index in file, iterator over the document's text pieces).

    Each piece iterator must be consumed before the next document is requested. Raises DataError
    naming the file (and line for jsonl) on undecodable or malformed input, and when the file
    yields no document at all.
    """
    n_docs = 0
    try:
        with _open_text(src.path) as f:
            if src.kind == "jsonl":
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{src.path}:{lineno}: invalid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        raise DataError(f"{src.path}:{lineno}: no {text_field!r} field "
                                        "(set --text-field)")
                    text = obj[text_field]
                    if not isinstance(text, str):
                        raise DataError(f"{src.path}:{lineno}: {text_field!r} is "
                                        f"{type(text).__name__}, not a string")
                    if text.strip():
                        yield n_docs, _split_long(text, max_piece_chars)
                        n_docs += 1
            elif txt_docs == "paragraph":
                block: list[str] = []
                for line in f:
                    if line.strip():
                        block.append(line)
                        continue
                    if block:
                        yield n_docs, _split_long("".join(block).rstrip("\n"), max_piece_chars)
                        n_docs += 1
                        block = []
                if block:
                    yield n_docs, _split_long("".join(block).rstrip("\n"), max_piece_chars)
                    n_docs += 1
            elif txt_docs == "file":
                pieces = _file_pieces(f, max_piece_chars)
                first = next(pieces, None)  # whitespace-only files hold no document
                if first is not None:
                    yield 0, _guarded(src, _chain_first(first, pieces))
                    n_docs = 1
            else:
                raise DataError(f"txt_docs must be 'file' or 'paragraph', not {txt_docs!r}")
    except UnicodeDecodeError as e:
        raise DataError(f"{src.path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{src.path}: cannot read ({e})") from None
    if n_docs == 0:
        what = f"no non-empty {text_field!r} values" if src.kind == "jsonl" else "only whitespace"
        raise DataError(f"{src.path}: no text ({what})")


def _chain_first(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _guarded(src: Source, pieces: Iterator[str]) -> Iterator[str]:
    """Pieces read lazily from an open file: turn read errors into DataError naming the file."""
    try:
        yield from pieces
    except UnicodeDecodeError as e:
        raise DataError(f"{src.path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{src.path}: cannot read ({e})") from None


def _file_pieces(f, max_chars: int) -> Iterator[str]:
    """The whole file as pieces of ~max_chars, cut before a blank line (or, past 2 x max_chars,
    before any line), so continuation pieces start with "\n"; leading whitespace-only text is
    merged forward so that a whitespace-only file yields nothing."""
    buf: list[str] = []
    size = 0
    seen_text = False
    for line in f:
        blank = not line.strip()
        if seen_text and size >= max_chars and (blank or size >= 2 * max_chars) and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
        seen_text = seen_text or not blank
    if buf and seen_text:
        yield "".join(buf)


def _doc_hash(seed: int, name: str, index: int) -> int:
    h = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


# ------------------------------------------------------------------------------------ packing
class _ShardWriter:
    """Writes fixed-stride samples into `<split>-NNNNNN.tar` files of `samples_per_shard` each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, sample_tokens: int,
                 samples_per_shard: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.sample_tokens, self.samples_per_shard = sample_tokens, samples_per_shard
        self.stride = sample_stride(sample_tokens, dtype)
        self.shards: list[dict] = []
        self.num_samples = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def _path(self) -> Path:
        return self.directory / shard_name(self.split, len(self.shards) - (self._tar is not None))

    def write(self, tokens: np.ndarray, num_bytes: int, num_tokens: int) -> None:
        with naming(self._path()):
            self._write(tokens, num_bytes, num_tokens)

    def _write(self, tokens: np.ndarray, num_bytes: int, num_tokens: int) -> None:
        if self._tar is None:
            path = self.directory / shard_name(self.split, len(self.shards))
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": path.name, "first_sample": self.num_samples,
                                "num_samples": 0})
            self._in_shard = 0
        key = sample_key(self.num_samples)
        self._member(f"{key}.{TOKENS_EXT}", npy_bytes(tokens.astype(self.dtype, copy=False)))
        self._member(f"{key}.{META_EXT}", meta_bytes(num_bytes, num_tokens))
        self._in_shard += 1
        self.num_samples += 1
        # The loader seeks to sample j at j * stride: the layout must be exactly regular.
        assert self._tar.offset == self._in_shard * self.stride, "irregular tar layout"
        if self._in_shard == self.samples_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        tar, self._tar = self._tar, None
        tar.close()  # writes the end-of-archive blocks and closes the file
        path = self.directory / self.shards[-1]["name"]
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        self.shards[-1].update(num_samples=self._in_shard, size_bytes=path.stat().st_size,
                               sha256=sha256_file(path))
        log.info("wrote %s (%d samples)", path.name, self._in_shard)

    def close(self) -> list[dict]:
        if self._tar is not None:
            with naming(self._path()):
                self._close_shard()
        return self.shards


class _Packer:
    """One split's token stream ``EOS doc EOS doc ... EOS`` cut into overlapping samples."""

    def __init__(self, writer: _ShardWriter, seq_len: int, eos_id: int, max_id: int):
        self.writer, self.seq_len, self.eos_id, self.max_id = writer, seq_len, eos_id, max_id
        self.ids = np.array([eos_id], dtype=np.uint32)  # the leading EOS (never a label)
        self.nbytes = np.zeros(1, dtype=np.int64)
        self.carry = 0  # text bytes of pieces that produced no token: credited to the next token
        self.num_docs = self.num_text_bytes = 0
        self.num_tokens = 1
        self.num_padded = 0

    def add(self, ids: np.ndarray, nbytes: np.ndarray, text_bytes: int, source: Source) -> None:
        self.num_text_bytes += text_bytes
        if ids.size == 0:
            self.carry += text_bytes
            return
        if int(ids.max()) > self.max_id:
            raise DataError(f"{source.path}: token id {int(ids.max())} >= vocab size "
                            f"{self.max_id + 1} of the tokenizer")
        nbytes = nbytes.astype(np.int64)
        nbytes[0] += self.carry
        self.carry = 0
        self._append(ids, nbytes)

    def end_doc(self) -> None:
        self.num_docs += 1
        self._append(np.array([self.eos_id], dtype=np.uint32), np.array([self.carry]))
        self.carry = 0

    def _append(self, ids: np.ndarray, nbytes: np.ndarray) -> None:
        self.num_tokens += ids.size
        self.ids = np.concatenate([self.ids, ids])
        self.nbytes = np.concatenate([self.nbytes, nbytes])
        L, S = self.seq_len + 1, self.seq_len
        n_full = (self.ids.size - 1) // S
        if n_full == 0:
            return
        label_bytes = np.cumsum(self.nbytes)
        for k in range(n_full):
            s = k * S
            self.writer.write(self.ids[s:s + L], int(label_bytes[s + S] - label_bytes[s]), L)
        self.ids = self.ids[n_full * S:].copy()
        self.nbytes = self.nbytes[n_full * S:].copy()

    def close(self) -> None:
        n = self.ids.size
        if n > 1:  # a last, partial sample: pad with EOS, num_tokens says how much is real
            self.num_padded = self.seq_len + 1 - n
            padded = np.full(self.seq_len + 1, self.eos_id, dtype=np.uint32)
            padded[:n] = self.ids
            self.writer.write(padded, int(self.nbytes[1:].sum()), n)
        self.writer.close()

    def stats(self) -> dict:
        num_samples = self.writer.num_samples
        label_tokens = self.num_tokens - 1
        return {
            "num_samples": num_samples, "num_docs": self.num_docs, "num_tokens": self.num_tokens,
            "num_label_tokens": label_tokens, "num_padded_tokens": self.num_padded,
            "num_bytes": self.num_text_bytes,
            "bytes_per_token": (self.num_text_bytes / label_tokens) if label_tokens else None,
            "shards": self.writer.shards,
        }


# ----------------------------------------------------------------------------- parallel map
def _ordered_map(fn, tasks: Iterable, num_proc: int, initializer, initargs) -> Iterator:
    """`map(fn, tasks)` in order, on `num_proc` processes, with at most 2*num_proc in flight."""
    if num_proc <= 1:
        initializer(*initargs, in_pool=False)
        for t in tasks:
            yield fn(t)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(num_proc, initializer=initializer, initargs=initargs)
    try:
        pending: deque = deque()
        for t in tasks:
            pending.append(pool.apply_async(fn, (t,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _encode_task(task: tuple[list[str], list[bool]]):
    return tk.encode_texts(*task)


# ------------------------------------------------------------------------------------ driver
def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def _check_out_dir(out_dir: Path, overwrite: bool, inputs: list) -> None:
    """--overwrite replaces only an earlier dataset (or an empty folder), never an input."""
    check_output(out_dir, inputs=inputs, overwrite=overwrite, replaceable=lambda p: (p / MANIFEST).is_file(),
                 kind=f"a dataset folder ({MANIFEST})", error=DataError, exists_error=DataError)


def prepare_data(
    inputs: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    seq_len: int = 2048,
    *,
    val_fraction: float = 0.01,
    val_docs: int | None = None,
    shard_tokens: int = 1 << 25,
    text_field: str = "text",
    txt_docs: str = "file",
    train_spm: int | None = None,
    num_proc: int = 2,
    seed: int = 1234,
    overwrite: bool = False,
    max_piece_chars: int = 1 << 18,
) -> dict:
    """Tokenize and pack text into webdataset shards under `out_dir`; return the manifest.

    tokenizer: a local HF tokenizer folder or a SentencePiece .model (exclusive with train_spm).
    train_spm: vocab size of a SentencePiece BPE model to train first, on the training documents
        only (saved as `out_dir/tokenizer.model`).
    seq_len: model context; samples hold seq_len + 1 tokens (see format.py).
    val_fraction / val_docs: the held-out split, by documents (val_docs wins when given).
    shard_tokens: about how many tokens per shard (rounded to whole samples).
    txt_docs: "file" (one document per text file) or "paragraph" (blank-line separated).
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    if (tokenizer is None) == (train_spm is None):
        raise DataError("give exactly one of tokenizer (HF folder or .model) and train_spm")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, not {seq_len!r}")
    if val_docs is None and not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if val_docs is not None and val_docs < 0:
        raise DataError(f"val_docs must be >= 0, not {val_docs}")
    if txt_docs not in ("file", "paragraph"):
        raise DataError(f"txt_docs must be 'file' or 'paragraph', not {txt_docs!r}")
    given = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    _check_out_dir(out_dir, overwrite, given + [tokenizer])
    sources = discover(inputs)
    spec_tok = tk.load_tokenizer(tokenizer) if tokenizer is not None else None

    def documents() -> Iterator[tuple[Source, int, Iterator[str]]]:
        for src in sources:
            for index, pieces in iter_documents(src, txt_docs=txt_docs, text_field=text_field,
                                                max_piece_chars=max_piece_chars):
                yield src, index, pieces

    remove_stale(out_dir)  # what a killed run left beside it
    tmp = temp_sibling(out_dir)
    try:
        # which documents are held out
        if val_docs is not None:
            heap: list[tuple[int, int]] = []  # max-heap (negated) of the val_docs smallest hashes
            for n, (src, index, pieces) in enumerate(documents()):
                for _ in pieces:
                    pass
                item = (-_doc_hash(seed, src.name, index), -n)
                if len(heap) < val_docs:
                    heapq.heappush(heap, item)
                elif val_docs and item > heap[0]:
                    heapq.heapreplace(heap, item)
            val_set = {-n for _, n in heap}

            def is_val(n: int, src: Source, index: int) -> bool:
                return n in val_set
        else:
            threshold = val_fraction * 2.0 ** 64

            def is_val(n: int, src: Source, index: int) -> bool:
                return _doc_hash(seed, src.name, index) < threshold

        if train_spm is not None:  # on the training documents only
            def lines() -> Iterator[str]:
                for n, (src, index, pieces) in enumerate(documents()):
                    held_out = is_val(n, src, index)
                    for piece in pieces:
                        if not held_out:
                            yield from (ln for ln in piece.split("\n") if ln.strip())
            spec = tk.train_spm(lines(), int(train_spm), tmp / "tokenizer.model",
                                num_threads=num_proc, seed=seed)
        else:
            spec = spec_tok

        dtype = token_dtype(spec.vocab_size)
        per_shard = max(1, shard_tokens // seq_len)
        packers = {split: _Packer(_ShardWriter(tmp, split, dtype, seq_len + 1, per_shard),
                                  seq_len, spec.eos_id, spec.vocab_size - 1)
                   for split in ("train", "val")}

        # (split, text, ends_doc, source) pieces, grouped into tasks of ~TASK_CHARS characters
        def tasks() -> Iterator[tuple[list[str], list[bool], list[tuple]]]:
            """Pieces grouped into tasks of ~TASK_CHARS: (texts, continuation flags, meta)."""
            texts, conts, meta = [], [], []
            chars = 0
            for n, (src, index, pieces) in enumerate(documents()):
                split = "val" if is_val(n, src, index) else "train"
                prev, cont = None, False
                for piece in itertools.chain(pieces, [None]):  # one-piece lookahead: last?
                    if prev is not None:
                        texts.append(prev)
                        conts.append(cont)
                        meta.append((split, piece is None, src))
                        chars += len(prev)
                        cont = True
                        if chars >= TASK_CHARS or len(texts) >= TASK_PIECES:
                            yield texts, conts, meta
                            texts, conts, meta = [], [], []
                            chars = 0
                    prev = piece
            if texts:
                yield texts, conts, meta

        metas: deque = deque()

        def work() -> Iterator[tuple[list[str], list[bool]]]:
            for texts, conts, meta in tasks():
                metas.append((meta, [len(t.encode()) for t in texts]))
                yield texts, conts

        for ids, nbytes, counts in _ordered_map(_encode_task, work(), num_proc,
                                                tk.init_encoder, (spec.kind, spec.payload)):
            meta, text_bytes = metas.popleft()
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for i, (split, ends_doc, src) in enumerate(meta):
                a, b = bounds[i], bounds[i + 1]
                packers[split].add(ids[a:b], nbytes[a:b], text_bytes[i], src)
                if ends_doc:
                    packers[split].end_doc()
        for packer in packers.values():
            packer.close()

        splits = {split: p.stats() for split, p in packers.items()}
        if splits["train"]["num_samples"] == 0:
            raise DataError(f"no training samples: every document went to validation "
                            f"({splits['val']['num_docs']} docs); lower val_fraction/val_docs")
        if (val_docs or val_fraction) and splits["val"]["num_docs"] == 0:
            log.warning("validation split is empty (%d documents, val_fraction %s); pass "
                        "val_docs=K for an exact count", splits["train"]["num_docs"],
                        val_fraction)
        fingerprint = hashlib.sha256("".join(
            s["sha256"] for sp in ("train", "val") for s in splits[sp]["shards"]).encode())
        info = spec.info()
        if train_spm is not None:
            info.update(file="tokenizer.model", source="trained by prepare_data")
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "created_by": f"megaxatl {_version('megaxatl') or ''} megaxatl.data.prepare".strip(),
            "created_with": {"python": platform.python_version(), "numpy": np.__version__,
                             "tokenizers": _version("tokenizers"),
                             "sentencepiece": _version("sentencepiece"),
                             "transformers": _version("transformers")},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seq_len": seq_len, "sample_tokens": seq_len + 1, "token_dtype": dtype.str,
            "sample_stride": sample_stride(seq_len + 1, dtype),
            "eos_id": spec.eos_id, "vocab_size": spec.vocab_size, "tokenizer": info,
            "fingerprint": "sha256:" + fingerprint.hexdigest()[:32],
            "args": {"val_fraction": val_fraction, "val_docs": val_docs, "seed": seed,
                     "shard_tokens": shard_tokens, "text_field": text_field,
                     "txt_docs": txt_docs, "train_spm": train_spm,
                     "max_piece_chars": max_piece_chars},
            "inputs": [{"path": str(p), "files": sum(1 for s in sources if s.origin == i)}
                       for i, p in enumerate([inputs] if isinstance(inputs, (str, Path))
                                             else inputs)],
            "splits": splits,
        }
        with naming(tmp / MANIFEST), open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _check_out_dir(out_dir, overwrite, given + [tokenizer])
        publish(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise named(e, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s in %.1fs: train %d samples, val %d samples", out_dir,
             time.time() - t0, splits["train"]["num_samples"], splits["val"]["num_samples"])
    return manifest

