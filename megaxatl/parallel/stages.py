"""Pipeline stages: which global layers each pipeline stage holds.

One home for the split, read by the pipeline model, the checkpoint format and the resharder:

    stage 0          embedding + its layers
    stage 1 .. pp-2  their layers
    stage pp-1       its layers + final norm + LM head (the tied head reads stage 0's embedding
                     weight: the checkpoint stores it once, as `embed.weight`, from stage 0)

The split comes from the pattern's `|` boundaries when it has them (their count must then be
pp - 1; with pp 1 they are ignored, so one config runs at any layout), else it balances the blocks' parameter counts (the embedding counts towards the first
stage and the head towards the last, so a large vocabulary does not make stage 0 the slowest).
"""

from __future__ import annotations

from megaxatl.config.pattern import parse_pattern


def stage_bounds(model_cfg, pp: int) -> list[tuple[int, int]]:
    """[(first layer, end layer)] for each of `pp` stages; ValueError when it cannot be split."""
    n = model_cfg.n_layers
    if pp < 1:
        raise ValueError(f"pipeline parallel size must be >= 1, got {pp}")
    if pp > n:
        raise ValueError(f"pipeline parallel {pp} is more stages than the model's {n} layers")
    starts = parse_pattern(model_cfg.pattern).stage_starts
    if pp == 1:  # one stage: the same model, its '|' marks only matter to a pipeline
        return [(0, n)]
    if starts:
        if len(starts) != pp - 1:
            raise ValueError(f"the pattern '{model_cfg.pattern}' marks {len(starts) + 1} pipeline stages with '|' "
                             f"but parallel.pp is {pp}")
        edges = [0, *starts, n]
        return [(edges[i], edges[i + 1]) for i in range(pp)]
    return _balanced(_layer_costs(model_cfg), pp, _edge_costs(model_cfg))


def stage_of_layer(bounds: list[tuple[int, int]], layer: int) -> int:
    for s, (a, b) in enumerate(bounds):
        if a <= layer < b:
            return s
    raise IndexError(f"layer {layer} is in no pipeline stage {bounds}")


def stage_of_key(key: str, bounds: list[tuple[int, int]]) -> int:
    """The stage holding global parameter `key` (tied head: stage 0's embedding)."""
    if key.startswith("layers."):
        return stage_of_layer(bounds, int(key.split(".")[1]))
    if key.startswith(("embed.", "pos_embed.")):  # both are read before the first layer
        return 0
    return len(bounds) - 1  # norm_f, lm_head


def _layer_costs(model_cfg) -> list[int]:
    import torch

    from megaxatl.models import build

    with torch.device("meta"):
        model = build(model_cfg)
    return [sum(p.numel() for p in layer.parameters()) for layer in model.layers]


def _edge_costs(model_cfg) -> tuple[int, int]:
    emb = model_cfg.padded_vocab_size * model_cfg.d_model
    return emb, (0 if model_cfg.tie_embeddings else emb)


def _balanced(costs: list[int], pp: int, edges: tuple[int, int]) -> list[tuple[int, int]]:
    """Contiguous split of `costs` into pp non-empty parts minimising the largest part (the first
    part also pays edges[0], the last edges[1]); exact dynamic programme (layers and stages are few).
    Ties go to the earliest cut, so the split is deterministic."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def part(a: int, b: int, s: int) -> int:
        return prefix[b] - prefix[a] + (edges[0] if s == 0 else 0) + (edges[1] if s == pp - 1 else 0)

    inf = float("inf")
    # best[s][i]: the smallest largest-part over splits of layers [0, i) into s + 1 stages
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut = [[0] * (n + 1) for _ in range(pp)]
    for i in range(1, n + 1):
        best[0][i] = part(0, i, 0)
    for s in range(1, pp):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                v = max(best[s - 1][j], part(j, i, s))
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    ends, i = [n], n
    for s in range(pp - 1, 0, -1):
        i = cut[s][i]
        ends.append(i)
    edges_ = [0, *reversed(ends[1:]), n]
    return [(edges_[k], edges_[k + 1]) for k in range(pp)]
