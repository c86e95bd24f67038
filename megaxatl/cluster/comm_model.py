"""Communication time of one optimizer step, from stated link bandwidths (assumed, not measured).

Ring collectives (NCCL's algorithm for large messages): an all-reduce of B bytes over n ranks moves
2 (n - 1) / n x B per rank; a reduce-scatter or an all-gather moves (n - 1) / n x B. Times are
bytes / bandwidth, with no overlap with compute and no latency term: an upper bound for large
messages, which is the regime of these layouts.

    TP   Megatron-style blocks all-reduce the (s, b, h) stream after every row-parallel output: the
         mixer and the MLP, forward and backward (4 per block with an MLP, 2 without), plus the
         vocab-parallel embedding (forward) and LM head input (backward); per micro-batch, for
         the layers of the most loaded stage. TP stays inside a node: the intra-node link.
    PP   each micro-batch sends its (s, b, h) activation forward and its gradient back across a
         stage boundary (1F1B: the sends of different stages run in parallel). The bubble itself
         is in the compute term. Across nodes when tp x pp exceeds a node.
    DP   the gradients of the Ψ parameters a rank holds, in the compute dtype, once per step:
         ZeRO 0 / 1 all-reduce them, ZeRO 2 reduce-scatters them and all-gathers the updated
         weights (the same bytes), ZeRO 3 all-gathers the weights in forward and again in
         backward and reduce-scatters the gradients (1.5x). Across nodes when the world exceeds
         a node.
"""

from __future__ import annotations

from dataclasses import dataclass

NVLINK_GBS = 450.0  # GB/s per GPU per direction: NVLink 4 (H100 / H200 SXM)
IB_GBS = 50.0       # GB/s per GPU: one 400 Gb/s InfiniBand NDR port per GPU


@dataclass(frozen=True)
class Links:
    intra_gbs: float = NVLINK_GBS  # inside a node
    inter_gbs: float = IB_GBS      # between nodes
    gpus_per_node: int = 8

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a group whose ranks span `span` consecutive GPUs."""
        return (self.intra_gbs if span <= self.gpus_per_node else self.inter_gbs) * 1e9


def tp_seconds(model_cfg, tp: int, b: int, s: int, a: int, micro_batches: int, layers: int, links: Links) -> float:
    if tp == 1:
        return 0.0
    per_block = 4 if model_cfg.mlp != "none" else 2
    count = layers * per_block + 2  # + embedding forward, LM head input backward
    bytes_ = 2 * (tp - 1) / tp * s * b * model_cfg.d_model * a
    return micro_batches * count * bytes_ / links.bandwidth(tp)


def pp_seconds(model_cfg, tp: int, pp: int, b: int, s: int, a: int, micro_batches: int, links: Links) -> float:
    if pp == 1:
        return 0.0
    return micro_batches * 2 * s * b * model_cfg.d_model * a / links.bandwidth(tp * pp)


def dp_seconds(psi: int, dp: int, zero: int, a: int, world: int, links: Links) -> float:
    if dp == 1:
        return 0.0
    volume = (3 if zero >= 3 else 2) * (dp - 1) / dp * psi * a
    return volume / links.bandwidth(world)
