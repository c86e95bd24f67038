"""torch's pickle files (`.pt`, `.bin`), read without running code and written so that a failed
write names the file and the reason.

Reading: `torch.load(weights_only=True)` only, with an explicit allow-list of the few non-tensor
classes a caller expects (DeepSpeed's, see train/deepspeed_files.py); a file that asks for
anything else is refused in one line that names the file and what it asked for (torch's own
message spans several lines and suggests retrying with weights_only=False, which would run it).

Writing: torch.save given a path writes through its C++ stream, whose failure on a full disk reads
"unexpected pos 576 vs 534"; given a Python file it reports the OSError underneath. `save` opens
the file itself and re-raises that OSError with the file's name.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from megaxatl.fsutil import named, os_error


class UnsafeFile(ValueError):
    """A pickle file that would run code, or build an object we do not allow, if unpickled."""


def refusal(path: str | Path, e: BaseException) -> str | None:
    """One line for a weights-only refusal `e` of file `path` (None when `e` is not one)."""
    text = str(e)
    if not isinstance(e, pickle.UnpicklingError) and "Weights only load failed" not in text:
        return None
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        what = f"it asks to import and call {m.group(1)}"
    else:
        m = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        what = (m.group(1).split(". ")[0].strip() if m else text.strip().splitlines()[-1]).rstrip(".")
    return (f"{path}: refused: not a weights-only file ({what}); only tensors and plain data are "
            "unpickled, nothing in it was run")


def load(path: str | Path, *, allow: Iterable[type] = (), map_location="cpu", mmap: bool = False) -> Any:
    """torch.load(path, weights_only=True) with `allow` as the only extra classes; UnsafeFile (one
    line) when the file needs anything else. Other errors (a truncated file) pass through."""
    allow = list(allow)
    try:
        with torch.serialization.safe_globals(allow):
            return _real_load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        line = refusal(path, e)
        if line is None:
            raise
        raise UnsafeFile(line) from None


# torch's own functions, taken before any patch: train/deepspeed_files.py routes DeepSpeed's
# torch.load / torch.save calls here while it loads or saves
_real_load, _real_save = torch.load, torch.save


def save(obj: Any, path: str | Path, **kwargs) -> None:
    """torch.save(obj) into a new file `path`; an I/O failure is an OSError naming `path`."""
    try:
        with open(path, "wb") as f:
            _real_save(obj, f, **kwargs)
    except (OSError, RuntimeError) as e:  # an OSError is its own cause (fsutil.os_error)
        cause = os_error(e, path)
        if cause is None:
            raise
        raise named(cause, path) from None
