"""DeepSpeed's own checkpoint files: read without running code, written with errors that name the
file and leave no rank waiting.

Reading. DeepSpeed loads its files with `torch.load(weights_only=False)` (its checkpoint engine,
the ZeRO optimizers, zero_to_fp32): a pickle planted in `mp_rank_00_model_states.pt` would run on
resume. Inside `weights_only_loads()` every torch.load loads weights-only, allowing besides
tensors and plain data exactly the classes DeepSpeed stores in the files it writes for us
(what DeepSpeed's checkpoints at ZeRO 0-3, fp32 / bf16, TP 2 and PP 2 hold; the same-layout
resumes of tests/test_train_restart.py, test_train_parallel.py and test_train_distributed.py read
them through this list):

    deepspeed.runtime.fp16.loss_scaler.LossScaler       ZeRO-1/2/3 optimizer states
    deepspeed.runtime.zero.config.ZeroStageEnum         ZeRO-1/2/3 optimizer states
    deepspeed.utils.tensor_fragment.fragment_address    ZeRO-1/2 and the bf16 pipeline optimizer

(a dataclass, an Enum and a plain class: unpickling them sets attributes, runs nothing else).
Which classes DeepSpeed stores is private to its release: the version gate of
train/deepspeed_internals.py covers this list too.

Writing. Inside `recorded_saves()` each torch.save DeepSpeed makes goes through torchfile.save (an
OSError naming the file instead of "unexpected pos ..."), and the first failure is recorded, not
raised: a rank raising inside engine.save_checkpoint would leave the others in its collectives.
The caller agrees on the recorded error over the ranks afterwards (checkpoint/agree.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from megaxatl import torchfile


def safe_globals() -> list[type]:
    """The non-tensor classes DeepSpeed stores in its checkpoint files (see the module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside the block is weights-only with safe_globals() allowed, whatever
    its caller asked for."""
    allow = safe_globals()

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **_):
        return torchfile.load(f, allow=allow, map_location=map_location, mmap=bool(mmap))

    real, torch.load = torch.load, load
    try:
        yield
    finally:
        torch.load = real


@contextmanager
def recorded_saves() -> Iterator[list[OSError]]:
    """Every torch.save to a path inside the block writes through torchfile.save; -> a list that
    holds the first OSError (later saves are skipped: the checkpoint is lost anyway)."""
    errors: list[OSError] = []
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if errors:
            return
        if not isinstance(f, (str, os.PathLike)):
            return real(obj, f, *args, **kwargs)
        try:
            torchfile.save(obj, f, **kwargs)
        except OSError as e:
            errors.append(e)

    torch.save = save
    try:
        yield errors
    finally:
        torch.save = real
