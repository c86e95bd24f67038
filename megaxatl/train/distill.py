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
folder, with the student's vocabulary (and tokenizer, when both name one). It runs on each rank
in process; that covers tp = 1, pp = 1, any DP, ZeRO 0-3 for stage 2 and 0-2 for stage 1 (which
calls the student's mixers directly, outside the engine's ZeRO-3 parameter gathers). Other
layouts are refused by the config check.
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
               ignore_index: int = -100) -> torch.Tensor:
    """(1 - weight) * cross entropy + weight * kl_loss, over the tokens whose label counts."""
    mask = labels != ignore_index
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)
    if weight == 0:
        return ce
    kl = kl_loss(student_logits, teacher_logits, temperature, mask)
    return (1 - weight) * ce + weight * kl


def align_loss(student_outs: list[torch.Tensor], teacher_outs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ||s - t||^2 / ||t||^2 (fp32)."""
    terms = [((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(1e-12)
             for s, t in zip(student_outs, teacher_outs)]
    return torch.stack(terms).mean()


def load_teacher(spec: str, dtype: torch.dtype):
    """A model folder (meta.json + model.safetensors) or a donor / named asset -> (LM, tokenizer dir)."""
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

    model, tok, _ = donor_model(spec, dtype)
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

    @classmethod
    def from_config(cls, cfg, device, student_tokenizer: str | None) -> "Distiller":
        d = cfg.train.distill
        spec = cfg.transfer.donor if d.teacher == "donor" else d.teacher
        if not spec:
            raise ValueError("train.distill.teacher: 'donor' needs transfer.donor set")
        teacher, tok = load_teacher(spec, DTYPES[d.teacher_dtype or cfg.train.dtype])
        m = cfg.model
        if teacher.cfg.vocab_size != m.vocab_size:
            raise ValueError(f"train.distill.teacher {spec}: vocabulary {teacher.cfg.vocab_size} differs from the "
                             f"model's {m.vocab_size} (the teacher must share the tokenizer)")
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
        return cls(teacher.to(device), aligned, d.weight, we, d.temperature, d.align_steps, cfg.train.steps)

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
            with torch.no_grad():
                logits = self.teacher(ids)
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
        logits = engine(ids)  # through the engine: ZeRO-3 gathers, as the plain LM loss does
        return mixed_loss(logits, labels, teacher_logits, self.weight_at(step), self.temperature)
