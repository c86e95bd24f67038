"""Parallelism applied to a plain built model (torchtitan style): build, then shard.

    tp_rules.py         one table per module type of each parameter's TP rule, and the pure
                        shard_tensor / unshard functions the model, resharder and tests share
    comm.py             autograd-aware collectives over a TP process group (CPU gloo or NCCL)
    tensor_parallel.py  apply_tensor_parallel(model, tp_group): the model's TP shard on this rank
    vocab_loss.py       losses on vocab-sharded logits: cross entropy and the distillation KL
"""

from megaxatl.parallel.tensor_parallel import apply_tensor_parallel
from megaxatl.parallel.vocab_loss import vocab_parallel_cross_entropy, vocab_parallel_kl
from megaxatl.parallel.tp_rules import Replicate, Shard, model_rules, shard_state_dict, shard_tensor, unshard, unshard_state_dicts

__all__ = ["Replicate", "Shard", "apply_tensor_parallel", "model_rules", "shard_state_dict", "shard_tensor",
           "unshard", "unshard_state_dicts", "vocab_parallel_cross_entropy", "vocab_parallel_kl"]
