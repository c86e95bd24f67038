"""The on-disk shard format, shared by the writer (prepare.py) and the reader (loader.py).

A prepared dataset is a folder::

    manifest.json                 what is in it (see `read_manifest`)
    train-000000.tar ...          webdataset tar shards of the training split
    val-000000.tar ...            ... and of the held-out validation split
    tokenizer.model               only when the SentencePiece model was trained by prepare_data

Each split is ONE token stream: ``EOS doc0 EOS doc1 EOS ... docN EOS`` (documents in input order,
EOS from the tokenizer), cut into samples of ``seq_len + 1`` tokens that overlap by one token:
sample k holds stream tokens ``[k*seq_len, k*seq_len + seq_len + 1)``. So inputs are
``sample[:-1]`` and labels ``sample[1:]`` with no read of a neighbouring sample, and every stream
token after the leading EOS is a label exactly once (the leading EOS makes the first document's
first token a label too). The last sample of a split is padded with EOS up to ``seq_len + 1``; its
``num_tokens`` says how many are real, and the loader masks the padded labels with -100.

A sample is two tar members with the same key (``%010d`` = the sample's index in its split):

* ``<key>.input_ids.npy``: a 1-D ``uint16`` (vocab <= 65536) or ``uint32`` array of ``seq_len+1``
  token ids in .npy format (``np.load``-able, and webdataset's default decoder reads it);
* ``<key>.meta.json``: ``{"num_bytes": B, "num_tokens": T}``; B is the UTF-8 byte count of the
  source text that the sample's labels cover (per-token byte attribution from the tokenizer's
  offsets; EOS and padding count 0), so bits per byte = sum(label loss in nats) / ln 2 / sum(B).

Both members are written with fixed-size USTAR headers (mtime 0, uid/gid 0), so every sample of a
split occupies exactly ``sample_stride`` bytes of its shard and sample j of a shard starts at byte
``j * sample_stride``. That is what gives the loader O(1)-memory random access; each read also
checks the two member names and the header checksum, so a misaligned or damaged shard is an error
naming the file, never garbage tokens. Shards are byte-for-byte reproducible for the same input,
tokenizer and arguments.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

FORMAT = "megaxatl-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
IGNORE_INDEX = -100  # label value of padded positions (torch cross_entropy's default ignore_index)
TOKENS_EXT = "input_ids.npy"
META_EXT = "meta.json"
BLOCK = 512  # tar block size


class DataError(ValueError):
    """Bad input or a damaged dataset. The message names the file at fault."""


def vocab_limit(manifest: dict, vocab_size: int | None = None) -> int | None:
    """The bound every token id of a dataset must stay below: the smallest of the manifest's
    vocabulary, its tokenizer's, and `vocab_size` (the model's) where given."""
    limits = [v for v in (vocab_size, manifest.get("vocab_size"), manifest.get("tokenizer", {}).get("vocab_size")) if v]
    return int(min(limits)) if limits else None


def check_token_ids(tokens: np.ndarray, limit: int | None, where: str, key: str) -> None:
    """DataError naming shard `where` and sample `key` when a token id is `limit` or above (checked
    per sample as it is read: a shard too large to hash at start-up may still be corrupt, and an
    id past the embedding would be an IndexError mid-step)."""
    if limit is None or not len(tokens):
        return
    top = int(tokens.max())
    if top >= limit:
        raise DataError(f"{where}: sample {key} holds token id {top}, outside the vocabulary (size {limit}): "
                        "a corrupt shard, or one written for another tokenizer")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:010d}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _pad(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def npy_header(sample_tokens: int, dtype: np.dtype) -> bytes:
    """The exact .npy header (format 1.0) that `np.save` writes for a (sample_tokens,) array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": (sample_tokens,)})
    return buf.getvalue()


def npy_bytes(tokens: np.ndarray) -> bytes:
    return npy_header(tokens.shape[0], tokens.dtype) + tokens.tobytes()


def sample_stride(sample_tokens: int, dtype: np.dtype) -> int:
    """Bytes one sample occupies in a shard: two tar headers, the .npy and the json (< 1 block)."""
    npy_len = len(npy_header(sample_tokens, dtype)) + sample_tokens * np.dtype(dtype).itemsize
    return BLOCK + _pad(npy_len) + BLOCK + BLOCK


def meta_bytes(num_bytes: int, num_tokens: int) -> bytes:
    data = json.dumps({"num_bytes": int(num_bytes), "num_tokens": int(num_tokens)},
                      separators=(",", ":")).encode()
    assert len(data) <= BLOCK
    return data


def tar_header_ok(header: bytes, name: bytes) -> bool:
    """Is `header` a USTAR header with a valid checksum for member `name`?"""
    if len(header) != BLOCK or header[:100].rstrip(b"\0") != name:
        return False
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def tar_member_size(header: bytes) -> int:
    return int(header[124:136].strip(b"\0 ") or b"0", 8)


def read_manifest(shard_dir: str | Path) -> dict:
    """Load and sanity-check `<shard_dir>/manifest.json`; errors name the file.

    Keys: format, version, created_by, created_with, created_at, seq_len, sample_tokens,
    token_dtype, sample_stride, eos_id, vocab_size, tokenizer {id, name, kind, source, file?,
    vocab_size, eos_id}, fingerprint (sha256 over the shard hashes), args, inputs, splits:
    {train|val: {num_samples, num_docs, num_tokens, num_label_tokens, num_padded_tokens,
    num_bytes, bytes_per_token, shards: [{name, first_sample, num_samples, size_bytes, sha256}]}}.
    """
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        where = Path(shard_dir)
        what = "does not exist" if not where.exists() else "has no manifest.json"
        raise DataError(f"{where}: {what}; not a dataset written by `megaxatl prepare-data`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {manifest.get('version')}, this code reads "
                        f"{FORMAT_VERSION}")
    for key in ("seq_len", "sample_tokens", "token_dtype", "sample_stride", "eos_id", "tokenizer",
                "splits"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks {key!r}")
    dtype = np.dtype(manifest["token_dtype"])
    if manifest["sample_tokens"] != manifest["seq_len"] + 1 or manifest["sample_stride"] != \
            sample_stride(manifest["sample_tokens"], dtype):
        raise DataError(f"{path}: inconsistent seq_len / sample_tokens / sample_stride")
    return manifest
