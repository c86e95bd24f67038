"""The training loop: `run(cfg)` trains, evaluates, checkpoints, resumes and exports.

Any TP x PP x DP layout (parallel.*; world size = tp x pp x dp, checked first). The model is
built whole, then made parallel (train/parallelize.py); data is sharded over DP only, so the TP
ranks of a replica and the stages of a pipeline read the same batches.

One optimizer step = `train.grad_accum x parallel.micro_batches` micro-batches per DP rank.
Without pipeline parallelism, per micro-batch: forward through the DeepSpeed engine (the model
returns the loss: vocab-parallel under TP), the loss is all-reduced (its mean is what we log and
what the freeze policy sees, so every rank decides the same), then engine.backward / engine.step
(DeepSpeed only steps the optimizer at the accumulation boundary). With pp > 1 DeepSpeed's
pipeline engine runs the whole step (1F1B over the micro-batches) in `train_batch`.

Non-finite values, two guards:
- a non-finite loss (plain loop): the micro-batch is dropped before its backward, so it never
  touches gradients, optimizer moments or weights (all ranks agree, the check is on the
  all-reduced loss), and the next batch takes its place;
- a non-finite gradient (under a finite loss, or any bad micro-batch of a pipeline step): the
  StepGuard (train/guard.py) skips the optimizer update on every rank.
Each is counted (`skipped`), and `train.max_bad_steps` in a row stop the run with
TrainingDiverged, leaving the checkpoints as they were (nothing is saved after the last good step).

Stopping early: SIGTERM/SIGINT (a preempted job) or `stop_after` finish the current step, save a
checkpoint and return; the next start with the same out_dir resumes from it exactly (weights,
optimizer, scheduler, freeze policy, data position, RNG). At another layout (TP, PP, ZeRO stage,
dtype, or DP under ZeRO) the start reads the checkpoint's layout-free weights and AdamW moments
instead (train/portable.py), and the `resume` event says whether the optimizer was restored.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megaxatl import exitcodes
from megaxatl.config import Config, ConfigError, config_to_dict
from megaxatl.config.pattern import STAGE_BREAK
from megaxatl.fsutil import remove_stale, write_atomic
from megaxatl.train import checkpoint as ckpt
from megaxatl.train import portable, preflight
from megaxatl.checkpoint.agree import agreed
from megaxatl.train.data import build_loaders, bytes_per_token
from megaxatl.train.deepspeed_internals import OptimizerView, set_step_counters
from megaxatl.train.engine import collective_device, create_engine, init_distributed
from megaxatl.train.evaluate import evaluate, evaluate_pipeline
from megaxatl.train.fp32_params import Fp32Masters, initial_values
from megaxatl.train.freeze import FreezePolicy, GradGate
from megaxatl.train.gradnorm import plan_norm
from megaxatl.train.guard import StepGuard
from megaxatl.models import build
from megaxatl.train.init import plan_initial, select_layers_agreed
from megaxatl.train.metrics import Metrics
from megaxatl.train.optim import build_optimizer, param_groups
from megaxatl.train.parallelize import parallel_state, parallelize
from megaxatl.train.schedule import GroupLRScheduler, base_lr
from megaxatl.train.stop import StopSignal, agree_stop

log = logging.getLogger(__name__)

class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""

    exit_code = exitcodes.NO_RESULT
    exit_label = "diverged: "


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


def _loss(engine, batch, device) -> torch.Tensor:
    # LM.forward(ids, labels=) returns LM.loss; the call goes through engine(...) so DeepSpeed's
    # forward machinery runs (ZeRO-3 parameter gathers, grad-accumulation scaling of the output).
    return engine(batch["input_ids"].to(device), labels=batch["labels"].to(device))


class _PoisonGrad(torch.autograd.Function):
    """Test hook: a finite loss whose gradient is infinite (what the StepGuard must catch)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _pipe_batches(data, device, distilling: bool = False):
    """The loader's dicts as the (inputs, labels) pairs DeepSpeed's pipeline engine reads (only
    the first and last stage read; both see the same batches: data is sharded by DP rank).
    distilling: the labels are (labels, inputs), for the teacher on the last stage."""
    for batch in data:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        yield ids, ((labels, ids) if distilling else labels)


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
    that micro-batch's loss NaN, "grad" its gradient infinite under a finite loss.
    """
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
        # the kernel backends first: a strict request that cannot run must stop the run before anything
        self.kernels = preflight.check_kernels(cfg, self.device, source)
        from megaxatl.checkpoint.sharded import check_layout

        try:  # the layout is checked before anything else: TP splits, pipeline stages
            self.layout = check_layout(cfg.model, cfg.parallel.tp, cfg.parallel.pp)
        except ValueError as e:
            raise ConfigError(source, "parallel", str(e)) from None
        self.par = parallel_state(cfg, self.world, source)  # world = tp x pp x dp
        self.pipeline = self.par.pp > 1
        t = cfg.train
        self.out = Path(t.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        preflight.check_output(cfg, source)
        # nothing is written into out_dir until every check has passed (its config.json is the
        # config of the run in it, not of a start that was refused)
        latest = ckpt.resume_point(self.ckpt_root) if t.resume else None  # every file verified
        saved = ckpt.read_meta(latest) if latest else None
        if saved and cfg.transfer.keep_attention:  # chosen when the run started: the checkpoint has it
            cfg.model.pattern, cfg.transfer.keep_attention = saved["config"]["model"]["pattern"], None
            self.layout = check_layout(cfg.model, cfg.parallel.tp, cfg.parallel.pp)
        if saved and _model_key(saved["config"]["model"]) != _model_key(config_to_dict(cfg)["model"]):
            raise ConfigError(source, "model", f"differs from the model of the checkpoint being resumed ({latest}); "
                                               "use another train.out_dir or train.resume false")
        self.layout_now = {"tp": self.par.tp, "pp": self.par.pp, "dp": self.par.dp,
                           "zero_stage": cfg.parallel.zero_stage, "dtype": t.dtype,
                           "bounds": [list(b) for b in self.layout.bounds]}
        self.layout_change = ckpt.layout_change(ckpt.layout_of(saved), self.layout_now) if saved else None
        if self.layout_change and not (latest / ckpt.WEIGHTS_DIR).is_dir():
            raise ConfigError(source, "parallel", f"the checkpoint being resumed ({latest}) has no layout-free "
                                                  f"{ckpt.WEIGHTS_DIR}/, so it resumes only at the layout that wrote it "
                                                  f"({self.layout_change.split(' -> ')[0]})")

        # every input (data, tokenizer, init folder, donor) is checked and the loaders are built
        # before the model: a wrong path must not cost the build of billions of parameters
        self.tokenizer_dir = preflight.check_inputs(cfg, source, saved)
        self.train_loader, self.val_loader, manifest = build_loaders(cfg, self.par.dp_rank, self.par.dp,
                                                                     self.tokenizer_dir, source)
        self.bytes_per_token = bytes_per_token(manifest)
        selection = None
        if cfg.transfer.keep_attention:  # a fresh start: the kept layers are chosen now, once
            selection = select_layers_agreed(cfg)
            self.layout = check_layout(cfg.model, cfg.parallel.tp, cfg.parallel.pp)  # of the chosen pattern
            self.layout_now["bounds"] = [list(b) for b in self.layout.bounds]

        # built on the meta device; only this rank's TP part of its stage ever gets storage
        init = plan_initial(cfg, resuming=latest is not None, selection=selection)
        with torch.device("meta"):
            model = build(cfg)
        model.gradient_checkpointing = cfg.parallel.activation_checkpointing
        all_names = {n for n, _ in model.named_parameters()}
        zero3_relayout = self.layout_change and cfg.parallel.zero_stage == 3
        if zero3_relayout:  # ZeRO-3 partitions each unit as it is built: read the saved weights then
            init.fill = portable.weights_fill(latest / ckpt.WEIGHTS_DIR)
        self.distill = None  # built after the data check (below); the pipeline's loss looks it up per call
        self.built = parallelize(model, cfg, self.par, loss_wrapper=self._pipe_loss, fill=init.fill,
                                 layout=self.layout)
        self.source_kind = init.source
        self.transferred = saved["transferred"] if saved else init.transferred
        self.report = saved.get("report") if saved else init.report
        if zero3_relayout:
            self._resume_weights = portable.ShardedCheckpoint(latest / ckpt.WEIGHTS_DIR)
        elif self.layout_change:  # before DeepSpeed copies them into its partitions / master weights
            with agreed():  # a bad file stops every rank
                self._resume_weights = portable.load_weights(latest / ckpt.WEIGHTS_DIR, self.built.named,
                                                             self.layout, self.par)

        self.freeze = FreezePolicy(cfg.transfer.freeze)
        groups = param_groups(self.built.module, self.transferred, t, named=self.built.named, all_names=all_names)
        optimizer = build_optimizer(groups, t)
        self.guard = StepGuard(optimizer, clip=t.grad_clip,
                               tp_rank=self.par.tp_rank, dp=self.par.dp)
        self.scheduler = GroupLRScheduler(optimizer, t, self.freeze)
        self.gate = GradGate(p for g in groups if g["role"].startswith("transferred") for p in g["params"])
        last_stage = self.par.is_last_stage  # where the loss is (pp 1: every rank)
        if t.distill.teacher is not None and last_stage:  # after the data check, before the engine's set-up
            from megaxatl.train.distill import Distiller

            self.distill = Distiller.from_config(cfg, self.device, self.tokenizer_dir, student=self.built.lm)
        fp32_initial = None
        if latest is None:  # before the bf16 cast (ZeRO-3: taken unit by unit, before partitioning)
            fp32_initial = self.built.initial if self.built.initial is not None else initial_values(self.built.named)
        self.engine = create_engine(self.built.module, optimizer, self.scheduler, cfg, self.world, mpu=self.built.mpu)
        self.opt_view = OptimizerView(self.engine.optimizer, optimizer)
        self.guard.attach(plan_norm(self.built.named, self.opt_view, self.layout, self.par.tp_rank, self.par.tp,
                                    self.par.dp), self.engine.optimizer)
        if self.guard.plan is None and self.rank == 0:
            log.warning("gradient clipping by a per-call norm: no exact norm plan for DeepSpeed's %s",
                        type(self.engine.optimizer).__name__)

        self.step, self.skipped, self.resumed_from, self.last_ckpt = 0, 0, None, latest
        resumed: dict = {}
        if latest is not None:
            meta = saved
            if self.layout_change is None:
                rank_state = ckpt.load(self.engine, latest)
                resumed = {"optimizer": "restored"}
            else:
                rank_state = ckpt.read_rank_state(latest, self.rank)
                resumed = self._resume_layout_free(latest, meta)
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
        # bf16: A_log / D / dt bias forwards read their fp32 masters, as set-up or resume left them
        self.fp32 = Fp32Masters(self.built.named, self.opt_view, fp32_initial)

        with agreed():  # every check passed: the run's folder, cleared of what a killed run left
            if self.rank == 0:
                self.out.mkdir(parents=True, exist_ok=True)
                ckpt.clean_partial(self.ckpt_root)
                remove_stale(self.out / "final")
                write_atomic(self.out / "config.json", json.dumps(config_to_dict(cfg), indent=2) + "\n")
        self.metrics = Metrics(cfg, self.out, self.rank, self.world, resume_step=self.step, dp=self.par.dp)
        self.metrics.event(self.step, "resume" if latest else "start", world_size=self.world, source=init.source,
                           layout=self.par.describe(), zero_stage=cfg.parallel.zero_stage, dtype=t.dtype,
                           transferred=len(self.transferred), flops_per_token=self.metrics.flops_per_token,
                           **self.kernels, **resumed)
        self.bad_streak = 0
        self._micro = 0
        self.losses: dict[int, float] = {}
        self.last_val = None

    def _resume_layout_free(self, latest: Path, meta: dict) -> dict:
        """The rest of a resume at another layout (the weights were read before DeepSpeed's set-up):
        bf16 master weights, AdamW moments, step counters. -> the resume event's fields."""
        step = int(meta["step"])
        with agreed():
            portable.restore_master_weights(self._resume_weights, self.built.named, self.opt_view, self.layout,
                                            self.par)
        del self._resume_weights
        why = portable.restore_optimizer(latest / ckpt.OPTIMIZER_DIR, self.built.named, self.opt_view, self.layout,
                                         self.par, why_absent=meta.get("optimizer_state"))
        self.scheduler.last_step = step
        set_step_counters(self.engine, step)
        if why is not None and self.rank == 0:
            log.warning("resuming %s at another layout (%s): the optimizer restarts (fresh AdamW moments) because %s",
                        latest, self.layout_change, why)
        return {"from_layout": self.layout_change,
                "optimizer": "restored (layout-free)" if why is None else f"restarted: {why}"}

    # ---------------------------------------------------------------------------- the loop
    def fit(self, stop_after: int | None = None) -> TrainResult:
        t = self.cfg.train
        tokens_per_step = self.cfg.tokens_per_step(self.par.dp)
        window, window_time, steps_in_window = [], 0.0, 0
        if self.resumed_from is None:
            self.evaluate()  # the starting point: where XATL and scratch differ most
        data = iter(self.train_loader)
        if self.pipeline:
            data = _pipe_batches(data, self.device, distilling=t.distill.teacher is not None)
        with StopSignal() as stop_signal:
            while self.step < t.steps:
                t0 = time.perf_counter()
                loss = self.train_step(data)  # None: the update was skipped
                if loss is not None:
                    window.append(loss)
                steps_in_window += 1
                window_time += time.perf_counter() - t0
                step = self.step
                lr = base_lr(step, t)
                lr_transferred = lr * self.freeze.lr_multiplier(step)  # what this step used
                if loss is not None and self.freeze.observe(step, loss):
                    self.gate.open()
                    self.scheduler.apply()
                    if self.gate.params:
                        self.metrics.event(step, "unfreeze", policy=self.freeze.policy,
                                           warmup_steps=self.cfg.transfer.freeze.warmup_steps)
                if step % self.cfg.logging.log_interval == 0 or step == t.steps:
                    norm = self.guard.last_norm  # the exact norm it clipped by (train/gradnorm.py)
                    self.metrics.train(step, t.steps, tokens=tokens_per_step * steps_in_window, seconds=window_time,
                                       loss=sum(window) / len(window) if window else float("nan"), lr=lr,
                                       lr_transferred=lr_transferred,
                                       grad_norm=float(norm) if norm is not None else None, frozen=self.freeze.frozen,
                                       skipped=self.skipped, tokens_seen=step * tokens_per_step)
                    window, window_time, steps_in_window = [], 0.0, 0
                if step % t.eval_interval == 0 or step == t.steps:
                    self.evaluate()
                reason = agree_stop(stop_signal.flag, stop_after is not None and step >= stop_after)
                stopping = reason is not None and step < t.steps
                if step % t.save_interval == 0 or step == t.steps or stopping:
                    self.save()
                if stopping:
                    self.metrics.event(step, "stop", reason=reason)
                    break
        final_dir = None
        if self.step >= t.steps:
            final_dir = _export(self.engine, self.cfg, self.out, self.last_ckpt, self.step, self.transferred,
                                self.report, self.tokenizer_dir, self.source_kind)
            self.metrics.event(self.step, "done", final=str(final_dir), skipped=self.skipped)
        return TrainResult(self.out, self.step, self.step >= t.steps, self.losses.get(self.step), self.last_val,
                           self.skipped, self.resumed_from, self.freeze.unfrozen_at, final_dir, self.last_ckpt,
                           dict(self.losses))

    def train_step(self, data) -> float | None:
        """One optimizer step; -> its DP-mean loss, or None when the update was skipped."""
        skipped_before = self.engine.skipped_steps
        self.guard.last_skipped = False
        self.guard.begin_step()
        self._micro = 0
        loss = self._pipeline_step(data) if self.pipeline else self._plain_step(data)
        self.fp32.refresh()  # the optimizer stepped the masters
        self.step += 1
        # the LR schedule follows the step count, skipped updates included
        self.scheduler.last_step = self.step
        self.scheduler.apply()
        if self.guard.last_skipped or self.engine.skipped_steps > skipped_before:
            self._bad("gradients", f"non-finite gradient (loss {loss:.4g})", self.step)
            return None
        self.bad_streak = 0
        self.losses[self.step] = loss
        return loss

    def _plain_step(self, data) -> float:
        """`micro_batches_per_step` good micro-batches (a non-finite loss is replaced by the next)."""
        gas = self.cfg.micro_batches_per_step
        micro_losses: list[float] = []
        while len(micro_losses) < gas:
            batch = next(data)
            loss = (_loss(self.engine, batch, self.device) if self.distill is None
                    else self.distill.loss(self.engine, batch, self.step, self.device))
            hit = self.fault(self.step + 1, len(micro_losses)) if self.fault is not None else False
            if hit == "grad":
                loss = _PoisonGrad.apply(loss)
            elif hit:
                loss = loss * float("nan")
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)  # every rank sees the same value, so every rank skips alike
            mean = mean.item() / self.world
            if not math.isfinite(mean):
                del loss  # dropped before backward: no gradient, moment or weight is touched
                self._bad("losses", "non-finite loss", self.step + 1)
                continue
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer (and the scheduler) at the boundary
            micro_losses.append(mean)
        return sum(micro_losses) / gas

    def _pipeline_step(self, data) -> float:
        return float(self.engine.train_batch(data_iter=data))

    def _pipe_loss(self, loss_fn):
        """The pipeline's last-stage loss: the LM loss, or distillation's when the labels carry the
        inputs (training while distilling; validation's labels never do). The test hook
        fault(step, micro) -> True makes that micro-batch's loss NaN."""
        def wrapped(logits, labels):
            if isinstance(labels, (tuple, list)):
                labels, ids = labels
                loss = self.distill.pipe_loss(logits, labels, ids, self.step)
            else:
                loss = loss_fn(logits, labels)
            if self.fault is not None:
                hit = self.fault(self.step + 1, self._micro)
                self._micro += 1
                loss = loss * float("nan") if hit else loss
            return loss
        return wrapped

    def _bad(self, kind: str, reason: str, at_step: int) -> None:
        """Count a dropped micro-batch (kind 'losses') or a skipped update ('gradients') at
        optimizer step `at_step`; stop after train.max_bad_steps in a row."""
        self.skipped += 1
        self.bad_streak += 1
        self.metrics.event(self.step, "skip", reason=reason, streak=self.bad_streak)
        t = self.cfg.train
        if self.bad_streak >= t.max_bad_steps:
            good = ckpt.newest_verified(self.ckpt_root)  # collective: every rank is here
            msg = (f"{self.bad_streak} non-finite {kind} in a row at step {at_step} "
                   f"(train.max_bad_steps = {t.max_bad_steps}); stopping. The last good checkpoint is "
                   f"{good or 'none (no checkpoint that verifies was saved yet)'}")
            self.metrics.event(self.step, "diverged", message=msg)
            raise TrainingDiverged(msg)

    # ----------------------------------------------------------------------- bookkeeping
    def evaluate(self) -> None:
        if self.val_loader is None:
            return
        if self.pipeline:
            val = evaluate_pipeline(self.engine, self.val_loader, self.cfg.train.eval_steps, self.bytes_per_token,
                                    self.device)
        else:
            val = evaluate(self.engine, self.val_loader, self.cfg.train.eval_steps, self.bytes_per_token, self.device)
        if val is not None:
            self.last_val = val
            self.metrics.eval(self.step, **val)

    def save(self) -> None:
        meta = {"config": config_to_dict(self.cfg), "freeze": self.freeze.state_dict(),
                "transferred": self.transferred, "report": self.report, "tokenizer_dir": self.tokenizer_dir,
                "skipped": self.skipped, "world_size": self.world, "source": self.source_kind,
                "layout": self.layout_now}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": ckpt.rng_state()}
        self.last_ckpt = ckpt.save(self.engine, self.ckpt_root, self.step, meta, rank_state, self.cfg.train.keep_last,
                                   write_portable=self._write_portable,
                                   engine_state=self.cfg.train.save_deepspeed_state)
        self.metrics.event(self.step, "checkpoint", path=str(self.last_ckpt))

    def _write_portable(self, folder: Path) -> dict:
        """Collective: the layout-free weights and moments (train/portable.py); -> meta fields."""
        named, config = self.built.named, config_to_dict(self.cfg)
        portable.save_weights(folder / ckpt.WEIGHTS_DIR, named, self.opt_view, self.layout, self.par, config)
        if not self.cfg.train.portable_optimizer:
            return {"optimizer_state": "train.portable_optimizer was false"}
        if self.opt_view.problem is not None:
            return {"optimizer_state": f"not portable: {self.opt_view.problem}"}
        wrote = portable.save_optimizer(folder / ckpt.OPTIMIZER_DIR, named, self.opt_view, self.layout, self.par,
                                        config)
        return {"optimizer_state": "layout-free" if wrote else "no optimizer update had run yet"}

    def close(self) -> None:
        self.metrics.close()
        self.fp32.release()
        self.gate.open()
        self.engine.destroy()


def _model_key(model: dict) -> dict:
    """A model config as far as the weights are concerned: '|' stage marks are layout, not model."""
    return {**model, "pattern": str(model.get("pattern", "")).replace(STAGE_BREAK, "")}


def _export(engine, cfg: Config, out: Path, last_ckpt: Path, step: int, transferred, report, tokenizer_dir,
            source: str) -> Path:
    """Write the trained weights as a model folder (`<out_dir>/final`), fp32, global names, from
    the last checkpoint's layout-free weights (rank 0, one tensor in memory at a time)."""
    from megaxatl.checkpoint.reshard import save_model_dir_streaming
    from megaxatl.checkpoint.sharded import ShardedCheckpoint

    final = out / "final"
    with agreed():  # a failure on rank 0 (a full disk) stops every rank, none waits in a barrier
        if dist.get_rank() == 0:
            meta = {"step": step, "transferred": transferred, "report": report, "trained_from": source}
            tok = tokenizer_dir if tokenizer_dir and Path(tokenizer_dir).is_dir() else None
            save_model_dir_streaming(final, ShardedCheckpoint(last_ckpt / ckpt.WEIGHTS_DIR), config_to_dict(cfg),
                                     meta, tokenizer_dir=tok, overwrite=True)
    return final
