"""The training loop: `run(cfg)` trains, evaluates, checkpoints, resumes and exports.

One optimizer step = `train.grad_accum` micro-batches per rank. Per micro-batch: forward through
the DeepSpeed engine, the loss is all-reduced (its DP mean is what we log and what the freeze
policy sees, so every rank decides the same), then engine.backward / engine.step (DeepSpeed only
steps the optimizer at the accumulation boundary).

Non-finite loss: the micro-batch is dropped before its backward, so it never touches gradients,
optimizer moments or weights (all ranks agree, the check is on the all-reduced loss), and the
next batch takes its place; it is counted (`skipped`), and `train.max_bad_steps` bad micro-batches
in a row stop the run with TrainingDiverged, leaving the checkpoints as they were (nothing is saved
after the last good step). Only the loss is checked: with bf16 or fp32 DeepSpeed has no overflow
check on gradients, so a non-finite gradient under a finite loss is not caught.

Stopping early: SIGTERM/SIGINT (a preempted job) or `stop_after` finish the current step, save a
checkpoint and return; the next start with the same out_dir resumes from it exactly (weights,
optimizer, scheduler, freeze policy, data position, RNG).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaxatl.config import Config, ConfigError, config_to_dict
from megaxatl.train import checkpoint as ckpt
from megaxatl.train.data import build_loaders, bytes_per_token
from megaxatl.train.engine import create_engine, init_distributed
from megaxatl.train.evaluate import evaluate
from megaxatl.train.freeze import FreezePolicy, GradGate
from megaxatl.train.init import build_initial
from megaxatl.train.metrics import Metrics
from megaxatl.train.optim import build_optimizer, param_groups
from megaxatl.train.schedule import GroupLRScheduler, base_lr

class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    completed: bool  # reached train.steps (else stopped early, resumable)
    train_loss: float | None
    val: dict | None
    skipped: int
    resumed_from: int | None
    unfrozen_at: int | None
    final_dir: Path | None
    checkpoint: Path | None
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss, this process's run


class _StopSignal:
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


def _loss(engine, batch, device) -> torch.Tensor:
    # LM.loss's cross entropy, but the forward goes through engine(...) so DeepSpeed's forward
    # machinery runs (ZeRO-3 parameter gathers, grad-accumulation scaling of the output).
    logits = engine(batch["input_ids"].to(device))
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(device).flatten(), ignore_index=-100)


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _check_parallel(cfg: Config, source: str) -> None:
    if cfg.parallel.tp > 1:
        raise ConfigError(source, "parallel.tp", "tensor parallelism is not wired into the trainer yet (use tp 1)")
    if cfg.parallel.pp > 1:
        raise ConfigError(source, "parallel.pp", "pipeline parallelism is not wired into the trainer yet (use pp 1)")


def _quiet_deepspeed() -> None:
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed calls torch's renamed collectives; torch warns on every call (every step).
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def run(cfg: Config, *, source: str = "", stop_after: int | None = None,
        fault: Callable[[int, int], bool] | None = None) -> TrainResult:
    """Train `cfg` (see the module docstring). Works under deepspeed / torchrun or in-process.

    source: the config file, named in config errors. stop_after: stop (with a checkpoint) once
    this many optimizer steps are done in total. fault: test hook, (step, micro) -> True makes
    that micro-batch's loss NaN.
    """
    _check_parallel(cfg, source)
    trainer = Trainer(cfg, source, fault)
    try:
        return trainer.fit(stop_after)
    finally:
        trainer.close()


class Trainer:
    """The state of one training process; `fit` runs the loop."""

    def __init__(self, cfg: Config, source: str = "", fault=None):
        self.cfg, self.source, self.fault = cfg, source, fault
        self.rank, self.world, local_rank = init_distributed()
        _quiet_deepspeed()
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        t = cfg.train
        self.out = Path(t.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.ckpt_root)
            (self.out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        dist.barrier()
        latest = ckpt.find_latest(self.ckpt_root) if t.resume else None
        saved = ckpt.read_meta(latest) if latest else None
        if saved and saved["config"]["model"] != config_to_dict(cfg)["model"]:
            raise ConfigError(source, "model", f"differs from the model of the checkpoint being resumed ({latest}); "
                                               "use another train.out_dir or train.resume false")

        init = build_initial(cfg, resuming=latest is not None)
        self.source_kind = init.source
        self.transferred = saved["transferred"] if saved else init.transferred
        self.report = saved.get("report") if saved else init.report
        self.tokenizer_dir = saved.get("tokenizer_dir") if saved else init.tokenizer_dir
        model = init.model
        model.gradient_checkpointing = cfg.parallel.activation_checkpointing

        self.freeze = FreezePolicy(cfg.transfer.freeze)
        groups = param_groups(model, self.transferred, t)
        optimizer = build_optimizer(groups, t)
        self.scheduler = GroupLRScheduler(optimizer, t, self.freeze)
        self.gate = GradGate(p for g in groups if g["role"].startswith("transferred") for p in g["params"])
        # data first: a bad shard folder fails here, before the engine's set-up
        self.train_loader, self.val_loader, manifest = build_loaders(cfg, self.rank, self.world,
                                                                     self.tokenizer_dir, source)
        self.bytes_per_token = bytes_per_token(manifest)
        self.engine = create_engine(model, optimizer, self.scheduler, cfg, self.world)

        self.step, self.skipped, self.resumed_from, self.last_ckpt = 0, 0, None, latest
        if latest is not None:
            meta, rank_state = ckpt.load(self.engine, latest, self.world, cfg.parallel.zero_stage)
            self.step = self.resumed_from = int(meta["step"])
            self.skipped = int(meta.get("skipped", 0))
            self.freeze.load_state_dict(meta["freeze"])
            self.train_loader.load_state_dict(rank_state["loader"])
            ckpt.set_rng_state(rank_state["rng"])
        else:
            seed = t.seed + self.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        if self.freeze.frozen and self.gate.params:
            self.gate.close()
        self.scheduler.apply()  # the freeze state is known now

        self.metrics = Metrics(cfg, self.out, self.rank, self.world, resume_step=self.step)
        self.metrics.event(self.step, "resume" if latest else "start", world_size=self.world, source=init.source,
                           zero_stage=cfg.parallel.zero_stage, dtype=t.dtype, transferred=len(self.transferred),
                           flops_per_token=self.metrics.flops_per_token)
        # DeepSpeed reports the gradient norm from its ZeRO / bf16 optimizers, not in plain fp32
        # DP: there we take it ourselves from the reduced gradients before the optimizer step.
        self.own_grad_norm = cfg.parallel.zero_stage == 0 and t.dtype == "fp32"
        self.grad_norm = None
        self.bad_streak = 0
        self.losses: dict[int, float] = {}
        self.last_val = None

    # ---------------------------------------------------------------------------- the loop
    def fit(self, stop_after: int | None = None) -> TrainResult:
        t = self.cfg.train
        tokens_per_step = self.cfg.data.micro_batch_size * self.cfg.data.seq_len * t.grad_accum * self.world
        window, window_time = [], 0.0
        if self.resumed_from is None:
            self.evaluate()  # the starting point: where XATL and scratch differ most
        data = iter(self.train_loader)
        with _StopSignal() as stop_signal:
            while self.step < t.steps:
                t0 = time.perf_counter()
                loss = self.train_step(data)
                window.append(loss)
                window_time += time.perf_counter() - t0
                step = self.step
                lr = base_lr(step, t)
                lr_transferred = lr * self.freeze.lr_multiplier(step)  # what this step used
                if self.freeze.observe(step, loss):
                    self.gate.open()
                    self.scheduler.apply()
                    if self.gate.params:
                        self.metrics.event(step, "unfreeze", policy=self.freeze.policy,
                                           warmup_steps=self.cfg.transfer.freeze.warmup_steps)
                if step % self.cfg.logging.log_interval == 0 or step == t.steps:
                    norm = self.grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
                    self.metrics.train(step, t.steps, tokens=tokens_per_step * len(window), seconds=window_time,
                                       loss=sum(window) / len(window), lr=lr, lr_transferred=lr_transferred,
                                       grad_norm=float(norm) if norm is not None else None, frozen=self.freeze.frozen,
                                       skipped=self.skipped, tokens_seen=step * tokens_per_step)
                    window, window_time = [], 0.0
                if step % t.eval_interval == 0 or step == t.steps:
                    self.evaluate()
                stopping = self._agree(stop_signal.flag or (stop_after is not None and step >= stop_after))
                stopping = stopping and step < t.steps
                if step % t.save_interval == 0 or step == t.steps or stopping:
                    self.save()
                if stopping:
                    self.metrics.event(step, "stop", reason="signal" if stop_signal.flag else "stop_after")
                    break
        final_dir = None
        if self.step >= t.steps:
            final_dir = _export(self.engine, self.cfg, self.out, self.last_ckpt, self.step, self.transferred,
                                self.report, self.tokenizer_dir, self.source_kind)
            self.metrics.event(self.step, "done", final=str(final_dir), skipped=self.skipped)
        return TrainResult(self.out, self.step, self.step >= t.steps, self.losses.get(self.step), self.last_val,
                           self.skipped, self.resumed_from, self.freeze.unfrozen_at, final_dir, self.last_ckpt,
                           dict(self.losses))

    def train_step(self, data) -> float:
        """One optimizer step over `grad_accum` good micro-batches; -> its DP-mean loss."""
        t, gas = self.cfg.train, self.cfg.train.grad_accum
        micro_losses: list[float] = []
        while len(micro_losses) < gas:
            loss = _loss(self.engine, next(data), self.device)
            if self.fault is not None and self.fault(self.step + 1, len(micro_losses)):
                loss = loss * float("nan")
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)  # every rank sees the same value, so every rank skips alike
            mean = mean.item() / self.world
            if not math.isfinite(mean):
                del loss  # dropped before backward: no gradient, moment or weight is touched
                self.skipped += 1
                self.bad_streak += 1
                self.metrics.event(self.step, "skip", reason="non-finite loss", streak=self.bad_streak)
                if self.bad_streak >= t.max_bad_steps:
                    msg = (f"{self.bad_streak} non-finite losses in a row at step {self.step + 1} "
                           f"(train.max_bad_steps = {t.max_bad_steps}); stopping. The last good checkpoint is "
                           f"{self.last_ckpt or 'none (no checkpoint was saved yet)'}")
                    self.metrics.event(self.step, "diverged", message=msg)
                    raise TrainingDiverged(msg)
                continue
            self.bad_streak = 0
            self.engine.backward(loss)
            if self.own_grad_norm and len(micro_losses) == gas - 1:
                self.grad_norm = _grad_norm(self.engine.module)
            self.engine.step()  # DeepSpeed steps the optimizer (and the scheduler) at the boundary
            micro_losses.append(mean)
        self.step += 1
        self.losses[self.step] = sum(micro_losses) / gas
        return self.losses[self.step]

    # ----------------------------------------------------------------------- bookkeeping
    def evaluate(self) -> None:
        if self.val_loader is None:
            return
        val = evaluate(self.engine, self.val_loader, self.cfg.train.eval_steps, self.bytes_per_token, self.device)
        if val is not None:
            self.last_val = val
            self.metrics.eval(self.step, **val)

    def save(self) -> None:
        meta = {"config": config_to_dict(self.cfg), "freeze": self.freeze.state_dict(),
                "transferred": self.transferred, "report": self.report, "tokenizer_dir": self.tokenizer_dir,
                "skipped": self.skipped, "world_size": self.world, "source": self.source_kind}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": ckpt.rng_state()}
        self.last_ckpt = ckpt.save(self.engine, self.ckpt_root, self.step, meta, rank_state, self.cfg.train.keep_last)
        self.metrics.event(self.step, "checkpoint", path=str(self.last_ckpt))

    @staticmethod
    def _agree(flag: bool) -> bool:
        """True on every rank if it is true on any (a signal may reach one rank only)."""
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        self.metrics.close()
        self.gate.open()
        self.engine.destroy()


def _export(engine, cfg: Config, out: Path, last_ckpt: Path, step: int, transferred, report, tokenizer_dir,
            source: str) -> Path:
    """Write the trained weights as a model folder (`<out_dir>/final`), fp32, global names."""
    from megaxatl.checkpoint import save_model_dir

    state = ckpt.consolidated_state_dict(engine, last_ckpt, cfg.parallel.zero_stage)
    final = out / "final"
    if dist.get_rank() == 0:
        meta = {"config": config_to_dict(cfg), "step": step, "transferred": transferred, "report": report,
                "trained_from": source}
        tok = tokenizer_dir if tokenizer_dir and Path(tokenizer_dir).is_dir() else None
        save_model_dir(final, state, meta, tokenizer_dir=tok, overwrite=True)
    dist.barrier()
    return final
