"""Distillation from the donor (train.distill): a teacher forward per micro-batch, no gradients.

Two stages, after MOHAWK (Bick et al. 2024) and MambaInLlama:
1. hidden-state alignment, the first `align_steps` optimizer steps: each replaced layer's new
   mixer reads the teacher's own input to that layer (its norm1 output) and is trained to give
   the teacher attention's output there. Layers are teacher-forced, so each mixer learns in
   isolation what the attention it replaces computed. Only those mixers get gradients (weight
   decay still shrinks every decayed weight a little each step, as in any step). Loss: per layer, the squared error divided
   by the mean square of the teacher output (scale-free across layers), averaged over layers.
2. logit distillation for the remaining steps:
       (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(t / T) || softmax(s / T))
   (forward KL, Hinton's T^2 keeps the gradient scale independent of T), the weight w moving
   linearly from `weight` to `weight_end` across the stage.

The teacher is our own all-attention model of a donor (transfer/donor_model.py) or any model
folder, with the student's vocabulary (and tokenizer, when both name one), in process, bf16 or
fp32, without gradients. Layouts:

    tp > 1   the teacher is cut by the same TP rules as the student (apply_tensor_parallel over
             the student's TP group, vocab padded alike), so each rank holds 1 / tp of it and
             both give this rank's vocab shard of the logits; CE and KL are vocab-parallel
             (parallel/vocab_loss.py): no rank gathers the full logits
    pp > 1   the teacher runs on the last stage, where the loss is: the pipeline's labels are
             (labels, input ids) while distilling, and `pipe_loss` is the pipeline's loss
    DP, ZeRO 0-3 for stage 2 (through the engine, as the LM loss)

Stage 1 (alignment) calls the student's mixers directly, outside the engine: it needs tp = 1,
pp = 1 and ZeRO 0-2, and the config check refuses it elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over (unmasked) tokens of KL(p_teacher || p_student) at temperature T, in fp32.
    logits: (..., V); mask: (...) bool, True where the token counts."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is not None:
        per_token = per_token[mask]
    return per_token.mean() * t * t


def mixed_loss(student_logits, labels, teacher_logits, weight: float, temperature: float,
               ignore_index: int = -100, shard: tuple | None = None) -> torch.Tensor:
    """(1 - weight) * cross entropy + weight * kl_loss, over the tokens whose label counts.
    shard: (vocab_start, vocab_size, TP group) when both logits are this rank's vocab shard
    (B, L, V_padded / tp); the result is the same as on the gathered logits."""
    mask = labels != ignore_index
    if shard is None:
        ce = F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)
        if weight == 0:
            return ce
        return (1 - weight) * ce + weight * kl_loss(student_logits, teacher_logits, temperature, mask)
    from megaxatl.parallel.vocab_loss import vocab_parallel_cross_entropy, vocab_parallel_kl

    s = student_logits.float().flatten(0, 1)
    ce = vocab_parallel_cross_entropy(s, labels.flatten(), *shard, ignore_index)
    if weight == 0:
        return ce
    kl = vocab_parallel_kl(s, teacher_logits.flatten(0, 1), temperature, mask.flatten(), *shard)
    return (1 - weight) * ce + weight * kl


def align_loss(student_outs: list[torch.Tensor], teacher_outs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ||s - t||^2 / ||t||^2 (fp32)."""
    terms = [((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(1e-12)
             for s, t in zip(student_outs, teacher_outs)]
    return torch.stack(terms).mean()


def load_teacher(spec: str, dtype: torch.dtype, pad_vocab_multiple: int | None = None):
    """A model folder (meta.json + model.safetensors) or a donor / named asset -> (LM, tokenizer dir).
    pad_vocab_multiple: a donor's vocabulary padded so (a folder keeps its own padding)."""
    from megaxatl.checkpoint.model_dir import META

    path = Path(spec)
    if (path / META).is_file():
        from megaxatl.checkpoint import load_model_dir
        from megaxatl.config import config_from_dict
        from megaxatl.models import build

        state, meta = load_model_dir(path)
        model = build(config_from_dict({"model": meta["config"]["model"]}))
        model.load_state_dict(state, strict=True)
        tok = path / "tokenizer"
        model = model.to(dtype).eval().requires_grad_(False)
        return model, (str(tok) if tok.is_dir() else None)
    from megaxatl.transfer.donor_model import donor_model

    model, tok, _ = donor_model(spec, dtype, pad_vocab_multiple)
    return model, tok


@dataclass
class Distiller:
    teacher: torch.nn.Module
    aligned: list[int]  # student layer indices aligned in stage 1 (their mixer is not attention)
    weight: float
    weight_end: float
    temperature: float
    align_steps: int
    total_steps: int
    shard: tuple | None = None  # (vocab_start, vocab_size, TP group) under tensor parallelism

    @classmethod
    def from_config(cls, cfg, device, student_tokenizer: str | None, student=None) -> "Distiller":
        """student: the (TP-sharded) LM being trained, whose TP group and vocab range the teacher takes."""
        d = cfg.train.distill
        spec = cfg.transfer.donor if d.teacher == "donor" else d.teacher
        if not spec:
            raise ValueError("train.distill.teacher: 'donor' needs transfer.donor set")
        m = cfg.model
        teacher, tok = load_teacher(spec, DTYPES[d.teacher_dtype or cfg.train.dtype], m.pad_vocab_multiple)
        if teacher.cfg.vocab_size != m.vocab_size:
            raise ValueError(f"train.distill.teacher {spec}: vocabulary {teacher.cfg.vocab_size} differs from the "
                             f"model's {m.vocab_size} (the teacher must share the tokenizer)")
        shard = None
        if getattr(student, "tp_size", 1) > 1:
            if teacher.cfg.padded_vocab_size != m.padded_vocab_size:
                raise ValueError(f"train.distill.teacher {spec}: its vocabulary is padded to "
                                 f"{teacher.cfg.padded_vocab_size} rows, the model's to {m.padded_vocab_size}; under "
                                 "tensor parallelism their vocab shards must match (model.pad_vocab_multiple)")
            from megaxatl.parallel import apply_tensor_parallel

            apply_tensor_parallel(teacher, student.tp_group)  # the same rules as the student's; no SP
            if teacher.tp_vocab_start != student.tp_vocab_start:
                raise ValueError(f"train.distill.teacher {spec}: its vocab shard starts at {teacher.tp_vocab_start}, "
                                 f"the model's at {student.tp_vocab_start}")
            shard = (student.tp_vocab_start, m.vocab_size, student.tp_group)
        if tok and student_tokenizer and Path(student_tokenizer).is_dir():
            from megaxatl.data.tokenizer import tokenizer_id

            if tokenizer_id(tok) != tokenizer_id(student_tokenizer):
                raise ValueError(f"train.distill.teacher {spec}: its tokenizer differs from the model's "
                                 f"({student_tokenizer})")
        aligned = [i for i, s in enumerate(m.layer_symbols) if s != "*"]
        if d.align_steps:
            if teacher.cfg.n_layers != m.n_layers or any(s != "*" for s in teacher.cfg.layer_symbols):
                raise ValueError("train.distill.align_steps: hidden-state alignment needs an all-attention teacher "
                                 f"of the model's depth ({m.n_layers} layers)")
            if m.d_model != teacher.cfg.d_model:
                raise ValueError("train.distill.align_steps: the teacher's d_model differs from the model's")
        we = d.weight if d.weight_end is None else d.weight_end
        return cls(teacher.to(device), aligned, d.weight, we, d.temperature, d.align_steps, cfg.train.steps, shard)

    def stage(self, step: int) -> str:
        """'align' or 'logits' for the optimizer step after `step` completed ones."""
        return "align" if step < self.align_steps else "logits"

    def weight_at(self, step: int) -> float:
        span = self.total_steps - self.align_steps
        frac = 0.0 if span <= 1 else min(1.0, max(0.0, (step - self.align_steps) / (span - 1)))
        return self.weight + (self.weight_end - self.weight) * frac

    def _teacher_pass(self, ids: torch.Tensor, capture: bool):
        """-> teacher logits, and with `capture` the (input, output) of each aligned layer's mixer."""
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = []
        if capture:
            for i in self.aligned:
                hooks.append(self.teacher.layers[i].mixer.register_forward_hook(
                    lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out[0]))))
        try:
            with torch.no_grad():  # this rank's part of the logits, as the student gives them
                logits = self.teacher(ids, local=True)
        finally:
            for h in hooks:
                h.remove()
        return logits, seen

    def loss(self, engine, batch, step: int, device) -> torch.Tensor:
        """The objective of one micro-batch of optimizer step `step` + 1."""
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        if self.stage(step) == "align":
            _, seen = self._teacher_pass(ids, capture=True)
            student = engine.module
            dtype = next(student.parameters()).dtype
            outs = [student.layers[i].mixer(seen[i][0].to(dtype))[0] for i in self.aligned]
            return align_loss(outs, [seen[i][1] for i in self.aligned])
        teacher_logits, _ = self._teacher_pass(ids, capture=False)
        logits = engine(ids, local=True)  # through the engine: ZeRO-3 gathers, as the plain LM loss does
        return mixed_loss(logits, labels, teacher_logits, self.weight_at(step), self.temperature, shard=self.shard)

    def pipe_loss(self, local_logits, labels, ids, step: int) -> torch.Tensor:
        """The last pipeline stage's objective of a micro-batch of optimizer step `step` + 1:
        local_logits are the stage's output (this rank's vocab shard with tp > 1, the padded
        vocab at tp = 1), ids the micro-batch's input (the pipeline's second label)."""
        teacher_logits, _ = self._teacher_pass(ids, capture=False)
        vocab = self.teacher.cfg.vocab_size
        if self.shard is None and local_logits.shape[-1] != vocab:  # a plain stage's head keeps the padding
            local_logits = local_logits[..., :vocab]
        return mixed_loss(local_logits, labels, teacher_logits, self.weight_at(step), self.temperature,
                          shard=self.shard)
