"""Where each parameter sits in the distributed optimizer's flat buffers, and which part of
every bucket each data-parallel rank owns: megatron-core's rule
(`DistributedOptimizer._compute_per_buffer_param_layout`, `_build_model_gbuf_range`),
as a pure function of the parameters' sizes, so the runtime, checkpoints and `mega plan`
compute the same numbers.

* Parameters are laid out in reverse registration order (the order backward finishes
  their gradients). Each one starts at a multiple of 64 elements.
* A bucket closes once it holds at least `bucket_size` elements (a parameter is never
  split) or after a tied word embedding shared across pipeline stages (`shared`), which
  also closes the bucket before it: it gets a bucket of its own, so the embedding group's
  all-reduce lines up on the first and last stage. `bucket_size` None or 0: one bucket.
* A bucket's end is padded to a multiple of lcm(d, 128) (lcm(d, 128, 2^16) with
  `pad_high`), so it splits into d equal shards: rank r owns
  [start + r*B/d, start + (r+1)*B/d) of a bucket of padded size B, whatever parameters
  that cuts through. `per_bucket_numel_unpadded` excludes the end padding, and the
  alignment gaps count in it: only the end padding depends on d, so a checkpoint's
  bucket tensors (unpadded) read back at any d (and for every d dividing 128 the layout
  is the same).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import attrs

PARAM_ALIGN = 64  # elements; megatron-core's pad_param_start


def _pad(value: int, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor)


def bucket_end_divisor(dp_size: int, pad_high: bool = False) -> int:
    return math.lcm(dp_size, 128, 2 ** 16) if pad_high else math.lcm(dp_size, 128)


@attrs.frozen
class Owned:
    """One parameter's part in one rank's shard of its bucket."""

    index: int  # the parameter's position in registration order
    bucket: int
    buffer_start: int  # in buffer coordinates (Megatron's gbuf_world)
    buffer_end: int
    param_start: int  # within the flattened parameter (Megatron's param range)
    param_end: int

    @property
    def numel(self) -> int:
        return self.buffer_end - self.buffer_start

    def local(self, layout: "ParamLayout") -> Tuple[int, int]:
        """The same range relative to the rank's shard of the bucket (Megatron's gbuf_local)."""
        shard_start = layout.shard_start(self.bucket, layout.rank_of(self))
        return self.buffer_start - shard_start, self.buffer_end - shard_start


@attrs.frozen
class ParamLayout:
    """The buffer layout of one model-parallel rank's parameters for `dp_size` shards."""

    numels: Tuple[int, ...]  # per parameter, registration order
    param_index_map: Tuple[Tuple[int, int, int], ...]  # per parameter: (start, end, bucket) in the buffer
    bucket_indices: Tuple[Tuple[int, int], ...]  # per bucket: (start, padded end)
    per_bucket_numel_unpadded: Tuple[int, ...]
    dp_size: int

    @property
    def numel(self) -> int:
        """Elements of the padded buffer (N_buf)."""
        return self.bucket_indices[-1][1] if self.bucket_indices else 0

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_indices)

    def shard_size(self, bucket: int) -> int:
        start, end = self.bucket_indices[bucket]
        return (end - start) // self.dp_size

    def shard_start(self, bucket: int, rank: int) -> int:
        return self.bucket_indices[bucket][0] + rank * self.shard_size(bucket)

    def rank_of(self, owned: Owned) -> int:
        return (owned.buffer_start - self.bucket_indices[owned.bucket][0]) // self.shard_size(owned.bucket)

    def owned(self, rank: int) -> List[Owned]:
        """What `rank` owns of every parameter, in buffer order (bucket by bucket)."""
        out = []
        by_bucket: Dict[int, List[int]] = {}
        for i, (_, _, b) in enumerate(self.param_index_map):
            by_bucket.setdefault(b, []).append(i)
        for b in range(self.num_buckets):
            lo = self.shard_start(b, rank)
            hi = lo + self.shard_size(b)
            for i in sorted(by_bucket.get(b, []), key=lambda i: self.param_index_map[i][0]):
                start, end, _ = self.param_index_map[i]
                s, e = max(start, lo), min(end, hi)
                if e > s:
                    out.append(Owned(i, b, s, e, s - start, e - start))
        return out

    def owned_numel(self, rank: int) -> int:
        """Parameter elements `rank` owns (its main weights and optimizer state)."""
        return sum(o.numel for o in self.owned(rank))

    def max_owned_numel(self) -> int:
        """N_own: the most parameter elements any rank owns (what `mega plan` counts)."""
        return max((self.owned_numel(r) for r in range(self.dp_size)), default=0)

    def record(self, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> dict:
        """What a checkpoint keeps to unflatten its bucket tensors without the model that
        saved them (plain lists, loadable with weights_only)."""
        return {"names": list(names), "shapes": [list(s) for s in shapes],
                "param_index_map": [list(x) for x in self.param_index_map],
                "bucket_indices": [list(x) for x in self.bucket_indices],
                "per_bucket_numel_unpadded": list(self.per_bucket_numel_unpadded), "dp_size": self.dp_size}

    @classmethod
    def from_record(cls, record: dict) -> "ParamLayout":
        shapes = record["shapes"]
        return cls(numels=tuple(math.prod(s) for s in shapes),
                   param_index_map=tuple(tuple(x) for x in record["param_index_map"]),
                   bucket_indices=tuple(tuple(x) for x in record["bucket_indices"]),
                   per_bucket_numel_unpadded=tuple(record["per_bucket_numel_unpadded"]), dp_size=int(record["dp_size"]))

    def same_buckets(self, other: "ParamLayout") -> bool:
        """Whether the two layouts differ at most in end padding (i.e. in d): then one's
        bucket tensors are the other's, and each rank can read just its own slice."""
        return (self.param_index_map == other.param_index_map
                and self.per_bucket_numel_unpadded == other.per_bucket_numel_unpadded
                and [s for s, _ in self.bucket_indices] == [s for s, _ in other.bucket_indices])


def compute_layout(numels: Sequence[int], bucket_size: Optional[int], dp_size: int, shared: Iterable[int] = (),
                   pad_high: bool = False) -> ParamLayout:
    """The layout of parameters of sizes `numels` (registration order); `shared`: indices
    of tied word embeddings shared across pipeline stages (Megatron's `shared_embedding`)."""
    if dp_size < 1:
        raise ValueError(f"dp_size must be at least 1, got {dp_size}")
    shared = set(shared)
    bucket_size = bucket_size or None
    index_map: Dict[int, Tuple[int, int, int]] = {}
    buckets: List[Tuple[int, int]] = []
    unpadded: List[int] = []
    param_start = bucket_start = bucket = 0
    members = 0
    param_end = 0
    divisor = bucket_end_divisor(dp_size, pad_high)

    def finalize(end: int, start: int, b: int) -> Tuple[int, int]:
        unpadded.append(end - start)
        padded = _pad(end, divisor)
        buckets.append((start, padded))
        return padded, b + 1

    for i in reversed(range(len(numels))):
        param_start = _pad(param_start, PARAM_ALIGN)
        if i in shared and members:
            bucket_start, bucket = finalize(param_start, bucket_start, bucket)
            members = 0
            param_start = bucket_start
        param_end = param_start + int(numels[i])
        index_map[i] = (param_start, param_end, bucket)
        members += 1
        if (bucket_size is not None and param_end - bucket_start >= bucket_size) or i in shared:
            bucket_start, bucket = finalize(param_end, bucket_start, bucket)
            members = 0
            param_start = bucket_start
        else:
            param_start = param_end
    if members:
        finalize(param_end, bucket_start, bucket)
    return ParamLayout(numels=tuple(int(n) for n in numels),
                       param_index_map=tuple(index_map[i] for i in range(len(numels))),
                       bucket_indices=tuple(buckets), per_bucket_numel_unpadded=tuple(unpadded), dp_size=dp_size)
