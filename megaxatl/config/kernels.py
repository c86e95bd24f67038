"""The `kernels` section: which backend runs each scan / conv op, and whether a request that
cannot run stops the run (megaxatl/kernels/policy.py applies it, dispatch.py picks per call).

    "kernels": {"backend": "auto"}                                   the automatic choice
    "kernels": {"backend": "torch"}                                  every op that has `torch`
    "kernels": {"backend": {"selective_scan": "cuda", "causal_conv1d": "triton"}, "strict": true}

Names: auto, cuda (mamba-ssm / causal-conv1d / flash-linear-attention), triton (ours), torch,
cpu, naive. The environment overrides the config (MEGAXATL_KERNEL_<OP>, MEGAXATL_KERNELS,
MEGAXATL_KERNELS_STRICT). Strict: the trainer checks every op at start-up and stops with one
line naming the op and why its backend cannot run here; otherwise a backend that cannot run
falls back to the automatic choice with one warning, and the start event records what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Problems = list[tuple[str, str]]


@dataclass
class KernelsConfig:
    backend: Union[str, dict[str, str]] = "auto"
    strict: bool = False

    def check(self) -> Problems:
        from megaxatl.kernels.policy import problems  # imports torch: only when a config is checked

        return problems(self.backend)

    def apply(self) -> None:
        """Make this the process's kernel request (megaxatl.kernels.policy.configure)."""
        from megaxatl.kernels.policy import configure

        configure(self.backend, self.strict)
