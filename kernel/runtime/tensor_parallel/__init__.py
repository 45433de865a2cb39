"""Tensor parallelism: layers, mappings, vocab-parallel cross entropy, RNG tracker."""
from mega.runtime.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mega.runtime.tensor_parallel.linear_cross_entropy import chunked_linear_cross_entropy
from mega.runtime.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_replicated,
    shard,
)
from mega.runtime.tensor_parallel.mappings import (
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
    scatter_to_tp,
)
from mega.runtime.tensor_parallel.sequence_parallel import (
    sequence_parallel_active,
    sequence_parallel_linear,
    sequence_parallel_region,
    sum_sequence_parallel_grads,
    tag_sequence_parallel,
)
from mega.runtime.rng import get_rng_tracker  # the RNG tracker lives with the other generators

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "mark_replicated", "shard", "vocab_parallel_cross_entropy",
    "chunked_linear_cross_entropy",
    "copy_to_tp", "gather_from_tp", "reduce_from_tp", "scatter_to_tp", "get_rng_tracker",
    "scatter_to_sp", "gather_from_sp", "reduce_scatter_to_sp", "sequence_parallel_active", "sequence_parallel_linear",
    "sequence_parallel_region", "sum_sequence_parallel_grads", "tag_sequence_parallel",
]
