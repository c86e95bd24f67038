"""Losses on vocab-sharded logits (N, V_padded / tp): each TP rank holds the logits of its vocab
range [vocab_start, vocab_start + V_padded / tp); the full logits are never gathered. Padded
vocab columns (>= vocab_size, there for TP and kernels) count as -inf: never predicted.

    vocab_parallel_cross_entropy   the LM loss (megatron-core's steps over our group)
    vocab_parallel_kl              distillation's KL(teacher || student) at a temperature
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaxatl.parallel.comm import mcore


def _mask_padded(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    cols = torch.arange(vocab_start, vocab_start + logits.shape[-1], device=logits.device)
    return logits.masked_fill(cols >= vocab_size, float("-inf"))


class _VocabParallelCE(torch.autograd.Function):
    """megatron-core's vocab-parallel cross entropy (its VocabParallelCrossEntropy steps, the ones
    its fused and unfused versions share) over OUR group: megatron's own
    vocab_parallel_cross_entropy reads the group, rank and vocab range from parallel_state's
    globals (megatron-core 0.16.1: AssertionError 'tensor model parallel group is not
    initialized' without initialize_model_parallel), and knows nothing of padded vocab rows."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group):
        steps = mcore().cross_entropy.VocabParallelCrossEntropy
        vl = logits.shape[-1]
        logits = _mask_padded(logits, vocab_start, vocab_size)  # padded rows never predicted
        logits, mx = steps.calculate_logits_max(logits)  # a fresh tensor: the steps work in place
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
        target_mask, masked_target, picked, sum_exp, exp = steps.calculate_predicted_logits(
            logits, target, mx, vocab_start, vocab_start + vl)
        sums = torch.stack((picked, sum_exp))  # one all-reduce for both sums
        dist.all_reduce(sums, group=group)
        softmax, loss = steps.calculate_cross_entropy_loss(exp, sums[0], sums[1])
        ctx.save_for_backward(softmax, target_mask, masked_target)
        ctx.spent = False
        return loss

    @staticmethod
    def backward(ctx, g):
        if ctx.spent:  # the steps turn the saved softmax into the gradient in place
            raise RuntimeError("vocab-parallel cross entropy: a second backward through the same graph is not "
                               "supported (retain_graph); recompute the loss")
        ctx.spent = True
        softmax, target_mask, masked_target = ctx.saved_tensors
        steps = mcore().cross_entropy.VocabParallelCrossEntropy
        grad_2d, rows, update, grad = steps.prepare_gradient_calculation_operands(softmax, target_mask)
        return steps.calculate_gradients(grad_2d, rows, masked_target, update, grad, g), None, None, None, None


def vocab_parallel_cross_entropy(local_logits, target, vocab_start: int, vocab_size: int, group,
                                 ignore_index: int = -100):
    """Mean cross entropy from vocab-sharded logits (N, V_padded / tp), target (N,) global ids;
    equals F.cross_entropy on the gathered, unpadded logits."""
    valid = target != ignore_index
    losses = _VocabParallelCE.apply(local_logits, target.masked_fill(~valid, -1), vocab_start, vocab_size, group)
    return (losses * valid).sum() / valid.sum()


class _VocabParallelKL(torch.autograd.Function):
    """Per-row KL(p_t || p_s) of softmax(t) and softmax(s) (already divided by the temperature)
    from this rank's columns. With m the global row max and S = sum exp(x - m) over every rank,

        KL = sum_v p_t (t - s) - log Z_t + log Z_s,   log Z = m + log S,

    and sum_v p_t (t - s) = (sum_v e^(t - m_t) (t - s)) / S_t: one MAX all-reduce (both maxima)
    and one SUM all-reduce (S_s, S_t and that cross term) per call. d KL / d s = p_s - p_t."""

    @staticmethod
    def forward(ctx, s, t, vocab_start, vocab_size, group):
        padded = torch.arange(vocab_start, vocab_start + s.shape[-1], device=s.device) >= vocab_size
        s, t = s.masked_fill(padded, float("-inf")), t.masked_fill(padded, float("-inf"))
        mx = torch.stack((s.max(-1).values, t.max(-1).values))
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
        es, et = (s - mx[0, :, None]).exp(), (t - mx[1, :, None]).exp()
        cross = (et * torch.where(padded, 0.0, t - s)).sum(-1)  # padded columns: e^t = 0 there
        sums = torch.stack((es.sum(-1), et.sum(-1), cross))
        dist.all_reduce(sums, group=group)
        ss, st, cross = sums
        ctx.save_for_backward(es / ss[:, None], et / st[:, None])
        return cross / st - (mx[1] + st.log()) + (mx[0] + ss.log())

    @staticmethod
    def backward(ctx, g):
        ps, pt = ctx.saved_tensors
        return g[:, None] * (ps - pt), None, None, None, None


def vocab_parallel_kl(student_local, teacher_local, temperature: float, mask, vocab_start: int, vocab_size: int,
                      group) -> torch.Tensor:
    """T^2 x mean over the rows where `mask` (N,) is True of KL(softmax(t / T) || softmax(s / T)),
    in fp32, from vocab-sharded (N, V_padded / tp) logits; equals distill.kl_loss on the gathered,
    unpadded logits. The teacher's logits get no gradient."""
    T = temperature
    per_row = _VocabParallelKL.apply(student_local.float() / T, teacher_local.detach().float() / T,
                                     vocab_start, vocab_size, group)
    return (per_row * mask).sum() / mask.sum() * T * T
