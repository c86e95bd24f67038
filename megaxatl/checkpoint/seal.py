"""A folder sealed by one JSON file: every other file's sha256, and the JSON's own digest.

A training checkpoint's megaxatl.json is such a seal (train/checkpoint.py): DeepSpeed's files,
each rank's megaxatl_rank{r}.pt, and the shards.json of weights/ and optimizer/ (which in turn list
the sha256 of every DCP file there, checked when each is read: sharded.ShardedCheckpoint). The
JSON's own digest ("seal": the sha256 of its canonical form without that key) catches a changed
step, freeze state or checksum in it.

A seal says the files are the ones written, not who wrote them: it catches corruption and
modification by accident, not by an attacker who rewrites the seal too (no file we read can run
code whatever it holds: see torchfile.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megaxatl.checkpoint.model_dir import CheckpointError
from megaxatl.checkpoint.sharded import SHARDS_JSON
from megaxatl.fsutil import sha256_file

FILES = "sha256"  # {relative path: digest}
SEAL = "seal"     # the digest of the JSON itself without this key


def files_to_seal(folder: Path, exclude: tuple[str, ...] = (), nested: bool = False) -> list[str]:
    """The relative paths (posix, sorted) a seal of `folder` lists: every file but `exclude`
    (top-level names), and of a sub-folder with its own shards.json only that file (nested=True:
    every file there too, what `expand` lists)."""
    folder = Path(folder)
    out = []

    def walk(d: Path) -> None:
        for p in sorted(d.iterdir()):
            if p.is_dir():
                if (p / SHARDS_JSON).is_file() and not nested:
                    out.append((p / SHARDS_JSON).relative_to(folder).as_posix())
                else:
                    walk(p)
            elif p.is_file() and not (d == folder and p.name in exclude):
                out.append(p.relative_to(folder).as_posix())

    walk(folder)
    return out


def _digest_of(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(meta: dict, digests: dict[str, str]) -> dict:
    """`meta` with the files' digests and its own seal added."""
    out = {**meta, FILES: dict(sorted(digests.items()))}
    out[SEAL] = _digest_of(out)
    return out


def seal_folder(folder: Path, name: str, meta: dict) -> dict:
    """One process: write `meta` sealed over every other file of `folder` as its JSON file `name`
    (the trainer shares the hashing over its ranks instead); -> what was written."""
    folder = Path(folder)
    digests = {rel: sha256_file(folder / rel) for rel in files_to_seal(folder, exclude=(name,))}
    out = sealed(meta, digests)
    (folder / name).write_text(json.dumps(out, indent=1) + "\n")
    return out


def check_seal(meta: dict, f: Path) -> None:
    """CheckpointError naming `f` when `meta` (read from `f`) is unsealed or its seal is wrong."""
    if SEAL not in meta or not isinstance(meta.get(FILES), dict):
        raise CheckpointError(f"{f}: has no checksums (written by an older megaxatl, or not by it), so its "
                              "files cannot be verified")
    if meta[SEAL] != _digest_of(meta):
        raise CheckpointError(f"{f}: checksum mismatch (corrupt or modified file)")


def expand(folder: Path, digests: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """The seal's `digests` plus those of the files each sealed sub-folder's shards.json lists
    (that shards.json verified first), so that one pass over the result checks every file of the
    folder, DCP's `.metadata` and `.distcp` files included. -> (digests, 'path: why' or None)."""
    out = dict(digests)
    for rel in sorted(digests):
        if Path(rel).name != SHARDS_JSON:
            continue
        bad = first_mismatch(folder, digests, [rel])
        if bad is not None:
            return out, bad
        f = Path(folder) / rel
        inner = json.loads(f.read_text()).get(FILES)
        if not isinstance(inner, dict):
            return out, f"{f}: has no checksums, so the files of {f.parent} cannot be verified"
        sub = Path(rel).parent.as_posix()
        out.update({f"{sub}/{name}": digest for name, digest in inner.items()})
    return out, None


def unlisted(folder: Path, digests: dict[str, str], exclude: tuple[str, ...] = (), nested: bool = False) -> str | None:
    """'path: why' for the first file of `folder` its seal does not list (a file added after the
    save: nothing may be read that was not written with the checkpoint); None when there is none.
    nested=True: `digests` is what `expand` returns, and the sealed sub-folders are checked too."""
    for rel in files_to_seal(folder, exclude, nested):
        if rel not in digests:
            return f"{Path(folder) / rel}: not part of the checkpoint as written (not in its checksums)"
    return None


def first_mismatch(folder: Path, digests: dict[str, str], names: list[str] | None = None) -> str | None:
    """The first of `names` (default: all of `digests`) that is missing or whose sha256 differs,
    as 'path: why'; None when all verify."""
    folder = Path(folder)
    for rel in sorted(digests) if names is None else names:
        f = folder / rel
        if not f.is_file():
            return f"{f}: missing (listed in the checkpoint's checksums)"
        if sha256_file(f) != digests[rel]:
            return f"{f}: checksum mismatch (corrupt or modified file)"
    return None


def verify_folder(folder: Path, meta: dict, exclude: tuple[str, ...] = (), names: list[str] | None = None) -> str | None:
    """'path: why' for the first file of sealed `folder` (its seal `meta`, already checked) that is
    unlisted, missing or changed (only `names` are hashed when given); None when all verify."""
    return unlisted(folder, meta[FILES], exclude) or first_mismatch(folder, meta[FILES], names)
