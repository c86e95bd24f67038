"""Pipeline parallelism on DeepSpeed's pipeline engine: a built LM cut into this rank's stage.

The plain LM (every rank builds the same one, then tensor parallelism is applied to it when
tp > 1) is laid out as DeepSpeed layer specs,

    [embedding] [block 0] ... [block n-1] [final norm] [head]

and `StagedPipeline` keeps only this rank's stage: the split is stages.stage_bounds (the
pattern's `|` or a parameter-balanced split), not DeepSpeed's own partitioner. A tied head is a
TiedLayerSpec sharing the embedding module between the first and last stage: DeepSpeed
broadcasts it at start and all-reduces its gradient across the two stages after every backward
(and counts it once in the gradient norm). The last stage's output is this rank's (vocab-shard
of the) logits; `pipeline_loss` turns them into the mean cross entropy (vocab-parallel with TP).

Schedule: DeepSpeed's 1F1B `TrainSchedule` over `gradient_accumulation_steps` micro-batches;
activations and their gradients move between stages with point-to-point sends (gloo on CPU).
ZeRO-1 composes with it (DeepSpeed refuses ZeRO-2/3 with pipelines).
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaxatl.parallel.stages import stage_bounds


class PipeEmbedding(nn.Module):
    """input_ids (B, L) -> hidden (B, L, D) (vocab-parallel under TP; the module applies the
    embedding scale)."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class PipeBlock(nn.Module):
    """One XATL block; the stream between stages is the bare hidden tensor."""

    def __init__(self, block: nn.Module, owner):
        super().__init__()
        self.block = block
        self._owner = [owner]  # the LM (not registered: its parameters are not this stage's)

    def forward(self, x):
        lm = self._owner[0]
        if lm.gradient_checkpointing and self.training:
            return checkpoint(lambda t: self.block(t)[0], x, use_reentrant=False)
        return self.block(x)[0]


class PipeHead(nn.Module):
    """Final norm and LM head: hidden -> this rank's logits (B, L, V_padded / tp)."""

    def __init__(self, lm):
        super().__init__()
        self.norm_f = lm.norm_f
        self.lm_head = lm.lm_head  # None when tied: the tied spec after this one applies the head
        self._owner = [lm]

    def forward(self, x):
        x = self.norm_f(x)
        return x if self.lm_head is None else _head(self._owner[0], x, self.lm_head.weight)


def _head(lm, hidden, weight):
    # the one LM head of tensor_parallel.py: enters the vocab-parallel region, gathering the
    # sequence back under sequence parallelism (a plain LM: a plain matmul)
    from megaxatl.parallel.tensor_parallel import head_logits

    return head_logits(lm, hidden, weight)


def _tied_embed_forward(module: PipeEmbedding, input_ids):
    return module(input_ids)


def _tied_head_forward(lm, module: PipeEmbedding, hidden):
    return _head(lm, hidden, module.embed.weight)


def pipeline_loss(lm) -> Callable:
    """loss_fn(local logits, labels) for the last stage: mean next-token cross entropy in fp32,
    vocab-parallel when tp > 1, padded vocab rows never predicted."""
    vocab = lm.cfg.vocab_size

    def loss_fn(logits, labels):
        logits = logits.float().flatten(0, 1)
        labels = labels.flatten()
        if getattr(lm, "tp_size", 1) > 1:
            from megaxatl.parallel.vocab_loss import vocab_parallel_cross_entropy

            return vocab_parallel_cross_entropy(logits, labels, lm.tp_vocab_start, vocab, lm.tp_group)
        return F.cross_entropy(logits[:, :vocab], labels, ignore_index=-100)

    return loss_fn


def build_pipeline(lm, topology, loss_fn: Callable | None = None):
    """The DeepSpeed PipelineModule holding this rank's stage of `lm` (a built, possibly TP-sharded
    LM, the same on every pipeline rank). -> (module, {id(param): global name} for its params)."""
    from functools import partial

    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    pp = topology.get_dim("pipe")
    if lm.pos_embed is not None:  # the stage-0 spec is the token embedding alone
        raise ValueError("pipeline parallelism: the learned position embedding (model.pos_embed) is not staged; "
                         "use pp=1")
    bounds = stage_bounds(lm.cfg, pp)
    tied = lm.lm_head is None
    specs: list = []
    if tied:
        specs.append(TiedLayerSpec("embed", PipeEmbedding, lm.embed, forward_fn=_tied_embed_forward,
                                   tied_weight_attr=["embed.weight"]))
    else:
        specs.append(PipeEmbedding(lm.embed))
    specs += [PipeBlock(layer, lm) for layer in lm.layers]
    specs.append(PipeHead(lm))
    if tied:
        specs.append(TiedLayerSpec("embed", PipeEmbedding, lm.embed, forward_fn=partial(_tied_head_forward, lm),
                                   tied_weight_attr=["embed.weight"]))
    # spec index boundaries: the embedding joins stage 0, the final norm and head the last stage
    parts = [0] + [1 + a for a, _ in bounds[1:]] + [len(specs)]
    names = {id(p): name for name, p in lm.named_parameters()}

    class StagedPipeline(PipelineModule):
        def _partition_layers(self, method="uniform"):
            self.parts = parts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    module = StagedPipeline(specs, topology=topology, loss_fn=loss_fn or pipeline_loss(lm),
                            partition_method="uniform")
    local = {id(p): names[id(p)] for p in module.parameters()}
    return module, local


def stage_named_parameters(module, names: dict[int, str]):
    """(global name, parameter) for this stage's parameters, tied ones once."""
    seen = set()
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield names[id(p)], p
