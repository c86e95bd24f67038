"""The exit codes of every megaxatl command and of launchers/pretrain.py, and the one place that
turns an exception into a one-line message and its code.

    code  name          meaning
    0     OK            done (pretrain: also stopped early with a checkpoint, e.g. preempted: rerun
                        to resume)
    1     NO_RESULT     ran to the end without the result asked for: training diverged (the
                        checkpoints are kept), `plan` found no layout that fits
    2     BAD_INPUT     bad input, config or environment: a missing or malformed file, a corrupt
                        or unsealed checkpoint, an output that may not be replaced, an unsupported
                        DeepSpeed (one line naming the file / key at fault; nothing written)
    3     IO_ERROR      reading or writing failed (no space left, I/O error, read-only or
                        permission denied): one line naming the path and the reason; the
                        temporary output is removed, earlier outputs and checkpoints are intact
    4     INTERNAL      an unexpected error (a bug): one line, and the full traceback in a file
                        whose path the line gives
    130   INTERRUPTED   Ctrl-C

MEGAXATL_DEBUG=1 prints the traceback as well (the code stays the same). Under torchrun a failed
rank makes torchrun itself exit 1 whatever the rank's code; the rank's own line says which error.

An error class of ours says its code with a class attribute `exit_code` (and may name its kind in
the line with `exit_label`, e.g. "diverged: "); without one, ValueError
(and FileNotFoundError / FileExistsError / NotADirectoryError / IsADirectoryError: a wrong path
given) is bad input, any other OSError an I/O error, anything else internal.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

OK = 0
NO_RESULT = 1
BAD_INPUT = 2
IO_ERROR = 3
INTERNAL = 4
INTERRUPTED = 130

DEBUG_ENV = "MEGAXATL_DEBUG"
TRACEBACK_DIR_ENV = "MEGAXATL_TRACEBACK_DIR"  # where tracebacks of internal errors go (default: the temp dir)

# errnos of an OSError that say "the path given is wrong" rather than "the I/O failed"
_PATH_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def code_of(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED
    own = getattr(type(e), "exit_code", None)
    if isinstance(own, int):
        return own
    if isinstance(e, _PATH_ERRORS) or isinstance(e, OSError) and e.errno in _PATH_ERRNOS:
        return BAD_INPUT
    if isinstance(e, OSError):
        return IO_ERROR
    if isinstance(e, ValueError):
        return BAD_INPUT
    return INTERNAL


def one_line(e: BaseException) -> str:
    """The operator's line for `e`: an OSError as 'path: reason', ours as their message's first
    line, anything else with its type."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        also = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
        return f"{where}{also}: {e.strerror}" if where else e.strerror
    text = (str(e).strip().splitlines() or [""])[0]
    if code_of(e) == INTERNAL or not text:
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text


_LABELS = {NO_RESULT: "error: ", BAD_INPUT: "error: ", IO_ERROR: "I/O error: ", INTERNAL: "internal error: "}


def write_traceback(prog: str, e: BaseException, folder: str | Path | None = None) -> Path | None:
    """The full traceback of `e` in a new file (in `folder`, else $MEGAXATL_TRACEBACK_DIR, else the
    temp dir); -> its path, or None when no file could be written."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    stem = f"megaxatl-{prog.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-"
    for where in (folder, os.environ.get(TRACEBACK_DIR_ENV), tempfile.gettempdir()):
        if not where:
            continue
        try:
            fd, path = tempfile.mkstemp(prefix=stem, suffix=".traceback.txt", dir=where)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return Path(path)
        except OSError:
            continue
    return None


def report(prog: str, e: BaseException, traceback_dir: str | Path | None = None, label: str | None = None) -> int:
    """Print `e` as one line on stderr (`prog: <label><message>`); -> its exit code. The label is
    `label`, else the class's `exit_label`, else the code's ("error: ", "I/O error: ", ...)."""
    code = code_of(e)
    if code == INTERRUPTED:
        print(f"{prog}: interrupted", file=sys.stderr)
        return code
    debug = bool(os.environ.get(DEBUG_ENV))
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    if label is None:
        label = getattr(type(e), "exit_label", None) or _LABELS.get(code, "error: ")
    line = f"{prog}: {label}{one_line(e)}"
    if code == INTERNAL and not debug:
        where = write_traceback(prog, e, traceback_dir)
        line += f" (traceback in {where}; {DEBUG_ENV}=1 prints it)" if where else f" ({DEBUG_ENV}=1 for the traceback)"
    print(line, file=sys.stderr)
    return code
