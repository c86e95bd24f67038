"""Helpers of the tests/test_reliability_*.py files (no tests here): a real small filesystem to
fill, the pid of a process that is gone, and a pickle payload that leaves a trace if it runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


class SmallDisks:
    """tmpfs mounts of a given size under a test's tmp_path (mounting needs root, as in CI)."""

    def __init__(self, root: Path):
        self.root, self.mounted = root, []

    def __call__(self, size: int) -> Path:
        where = self.root / f"disk{len(self.mounted)}"
        where.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or shutil.disk_usage(where).total > 4 * size:
            where.rmdir()
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'not mounted'}); the "
                        "write-failure tests that patch the writer cover the same path")
        self.mounted.append(where)
        return where

    @staticmethod
    def resize(where: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    def close(self) -> None:
        for where in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    disks = SmallDisks(tmp_path / "disks")
    try:
        yield disks
    finally:
        disks.close()


def dead_pid() -> int:
    """The pid of a process that has exited (what a killed writer leaves in its temp names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class Payload:
    """Pickled, it asks the unpickler to call exec, which would create the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))
