"""Stopping early: SIGTERM / SIGINT (a preempted job) or `stop_after` end the run at a step
boundary with a checkpoint, on every rank alike."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megaxatl.train.engine import collective_device


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag checked at step boundaries (main thread only)."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            pass
        return self

    def _handle(self, signum, frame):
        # A second Ctrl-C gives up at once. A repeated SIGTERM does not: under SLURM every process
        # of a job step gets it and then the launcher (deepspeed's launch.py, torchrun) forwards
        # it to its ranks again, and the checkpoint must still be written.
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


REASONS = (None, "stop_after", "signal")  # by precedence: a signal outranks the step count


def agree_stop(signalled: bool, step_reached: bool) -> str | None:
    """Collective: why every rank stops now ('signal', 'stop_after') or None, the same answer on
    every rank whichever rank a signal reached (it may reach one only)."""
    mine = 2 if signalled else 1 if step_reached else 0
    t = torch.tensor([float(mine)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return REASONS[int(t.item())]
