"""DeepSpeed: process group set-up, the DeepSpeed config dict from ours, and the engine.

Launch-agnostic: `deepspeed`, `torchrun` and a plain `python` (one process) all work, because
the rank / world size / master address come from the environment when a launcher set them and
default to a single local process otherwise. The backend is nccl with CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import socket

import torch

from megaxatl.config.schema import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed once; -> (rank, world_size, local_rank)."""
    from megaxatl.train import deepspeed_internals

    deepspeed_internals.check_version()  # before anything reads DeepSpeed's private state
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # before NCCL starts: one device per rank
    if not dist.is_initialized():
        if not os.environ.get("MEGAXATL_DS_SHM_COMM"):
            deepspeed_internals.skip_shm_comm_build()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        launched = "RANK" in os.environ or any(k in os.environ for k in _MPI_ENV)
        if launched:  # deepspeed / torchrun set RANK etc.; under mpirun DeepSpeed discovers them
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        else:
            # A plain `python` run: a world of one on a private port, without writing RANK /
            # MASTER_PORT into os.environ (child processes must not inherit a rendezvous).
            # DeepSpeed's engine insists on LOCAL_RANK, which alone rendezvouses nothing.
            os.environ.setdefault("LOCAL_RANK", "0")
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                       init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), local_rank


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live: NCCL reduces CUDA tensors only (a CPU
    tensor fails with "No backend type associated with device type cpu"); gloo takes CPU ones."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ds_config(cfg: Config, world_size: int) -> dict:
    """Our config -> DeepSpeed's. Batch sizes: micro batch per rank x grad accumulation x DP."""
    p, t = cfg.parallel, cfg.train
    dp = world_size // (p.tp * p.pp)
    zero: dict = {"stage": p.zero_stage}
    if p.zero_stage >= 1:
        # ZeRO-2's contiguous_gradients / overlap_comm defaults are fine on GPU; on CPU overlap
        # only adds threads fighting for the cores.
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True,
                    reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if p.zero_stage == 3:
        # Gather the full weights on save so engine.save_16bit_model / export can consolidate.
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if p.cpu_offload and p.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.micro_batches_per_step,
        "train_batch_size": cfg.data.micro_batch_size * cfg.micro_batches_per_step * dp,
        # the trainer's StepGuard clips, by the exact norm (train/gradnorm.py): DeepSpeed's counts
        # a copied KV head / Mamba-2 group once per TP rank holding it, and in fp32 without ZeRO a
        # replicated parameter only on the first pipeline stage's first TP rank
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": False},
        # A torch optimizer with ZeRO-Offload is slower than DeepSpeedCPUAdam but needs no
        # compiler; the operator picks (train.optimizer).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    return out


def create_engine(model: torch.nn.Module, optimizer, scheduler, cfg: Config, world_size: int, mpu=None):
    """A DeepSpeedEngine, or a PipelineEngine when `model` is a PipelineModule (which brings its
    own grid); `mpu` (the TP x DP grid) with tensor parallelism alone."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(cfg, world_size), mpu=mpu)
    return engine
