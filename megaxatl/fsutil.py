"""File-system helpers shared by every writer: checksums, fsync, folders that appear atomically,
which outputs a command may replace, and I/O errors that name their file.

An output folder is written as a temporary sibling `.<name>.tmp-<pid>@<host>-<random>` and renamed
into place; a replaced folder is first moved aside to `.<name>.old-<pid>@<host>-<random>`. A
killed writer leaves them behind: `remove_stale` (called by every writer before it starts) removes
those whose process is gone, and puts back an `.old-` folder whose replacement never arrived.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file below `root`, then the directories themselves."""
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted({p.parent for p in root.rglob("*")} | {root}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def named(e: OSError, path: str | Path) -> OSError:
    """`e` as an OSError of the same class that names `path` (a write to an open file names none)."""
    if e.filename is not None:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))


def write_atomic(path: str | Path, text: str, tmp: str | Path | None = None) -> None:
    """Replace the file `path` by one holding `text` (written beside it as `tmp`, fsynced, renamed):
    a reader sees the old file or the new one, never a part. An OSError names the file."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.parent / f".{path.name}.tmp-{os.getpid()}@{_HOST}"
    try:
        with naming(path), open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def os_error(e: BaseException, path: str | Path | None = None) -> OSError | None:
    """The OSError `e` stands for: itself, one it was raised from or during, a Rust library's
    error (safetensors, tokenizers) whose message ends "(os error 28)" as an OSError of that errno,
    or, with the `path` being written, torch's short-write RuntimeError ("unexpected pos 704 vs
    598": the file took fewer bytes than written, the errno lost on the way) as ENOSPC when that
    filesystem is (nearly) full, else EIO. None for any other error."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    if not isinstance(e, Exception):
        return None
    m = re.search(r"\(os error (\d+)\)", str(e))
    if m is not None:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    if path is not None and isinstance(e, RuntimeError) and "unexpected pos" in str(e):
        code = errno.ENOSPC if _nearly_full(Path(path)) else errno.EIO
        return OSError(code, os.strerror(code) + ("" if code == errno.ENOSPC else " (a short write)"))
    return None


def _nearly_full(path: Path) -> bool:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < min(64 << 20, usage.total // 100 + (1 << 20))


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError raised in the block that names no file names `path`."""
    try:
        yield
    except OSError as e:
        raise named(e, path) from None


# ---- which outputs a command may write or replace ---------------------------------------------

def has_format(folder: str | Path, json_name: str, fmt: str) -> bool:
    """Whether `folder`'s JSON file `json_name` says `"format": fmt` (the kind of output it is)."""
    try:
        return json.loads((Path(folder) / json_name).read_text()).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                 replaceable: Callable[[Path], bool] | None = None, kind: str = "",
                 error: type[Exception] = ValueError, exists_error: type[Exception] = FileExistsError) -> None:
    """Before a command writes the folder `out`: refuse, in one line, an `out` that is one of
    `inputs`, lies inside one or contains one (replacing it would delete the input), and an
    existing `out` unless overwrite is set and it is empty or `replaceable(out)`: the kind of
    output the command writes (`kind` describes it), never a folder it did not write."""
    out = Path(out)
    here = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        there = Path(inp).resolve()
        if _inside(here, there):
            raise error(f"{out}: the output must not be the input {inp} or lie inside it")
        if _inside(there, here):
            raise error(f"{out}: the output folder holds the input {inp}; replacing it would delete the input")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise exists_error(f"{out} already exists (pass --overwrite to replace it)")
    if out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or (replaceable and replaceable(out))):
        return
    raise error(f"{out}: exists and is not {kind or 'an output of this command'}; --overwrite replaces only "
                "that, never another folder")


# ---- temporary siblings -----------------------------------------------------------------------

_HOST = socket.gethostname()


def _sibling_prefix(out: Path, what: str) -> str:
    return f".{out.name}.{what}-{os.getpid()}@{_HOST}-"


def _owner_alive(name: str, out: Path) -> bool:
    """Whether the process that made sibling `name` of `out` may still be writing it."""
    m = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)@(.*)-[^-]*", name)
    if m is None:  # no owner recorded (an older name): nothing can be known, it is stale
        return False
    pid, host = int(m.group(1)), m.group(2)
    if host != _HOST:  # another machine's writer: leave it alone
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale(out: str | Path) -> list[Path]:
    """Remove what a killed writer of `out` left beside it (`.<name>.tmp-*`, `.<name>.old-*` of
    processes that are gone); an `.old-` folder is put back when `out` is missing (the writer died
    between moving it aside and renaming the new one in). -> the paths removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    for p in sorted(out.parent.iterdir()):
        for what in ("tmp", "old"):
            if p.name.startswith(f".{out.name}.{what}-") and not _owner_alive(p.name, out):
                if what == "old" and not out.exists():
                    os.rename(p, out)
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def temp_sibling(out: str | Path) -> Path:
    """A new empty folder beside `out` that remove_stale recognises as this process's."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "tmp"), dir=out.parent))


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`; an existing `out` is moved aside first and
    removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.parent / (_sibling_prefix(out, "old") + tmp.name.rsplit("-", 1)[-1])
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, replaceable: Callable[[Path], bool] | None = None,
               kind: str = "") -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes `out`, on any error it is removed.

    An existing `out` is replaced only with overwrite=True, when it is empty or `replaceable`
    (check_output), and only after the new folder is complete: the old one is moved aside, the
    new one renamed in, and only then the old removed. An OSError names its file or the folder.
    """
    out = Path(out)
    check_output(out, overwrite=overwrite, replaceable=replaceable, kind=kind)
    remove_stale(out)
    tmp = temp_sibling(out)
    try:
        yield tmp
        fsync_tree(tmp)
        publish(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = os_error(e, tmp)
        if failed is None:
            raise
        raise named(failed, tmp) from None
