"""The torch_dist format's two planners for torch.distributed.checkpoint (DCP): each rank
writes its tensor-parallel slices as chunks of the global tensors, and reads back whatever
chunks overlap the slices of its own layout (resharding). A module of their own because
importing DCP costs about a second, which every `mega` process (launcher and workers) paid
at plugin load although most runs never write this format."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


# A local tensor's place: (the global tensor's key, offsets, global size). A rank may hold
# several blocks of one global tensor (a gated fc1's [gate_r; up_r]): each is its own entry
# of the planner's state dict under a name of its own, all under the one checkpoint key.
Placement = Tuple[str, List[int], List[int]]


class ChunkSavePlanner(DefaultSavePlanner):
    """DCP's default planner, told where each local tensor sits in its global tensor."""

    def __init__(self, placement: Dict[str, Placement]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.placement = placement  # state-dict name -> (key, offsets, global size); objects have none
        self._by_index: Dict[Tuple[str, Tuple[int, ...]], str] = {}

    def create_local_plan(self) -> SavePlan:
        items = []
        for name, t in self.state_dict.items():
            if name not in self.placement:  # an object (megatron-core's _extra_state): torch.save'd under its name
                self._by_index[(name, ())] = name
                items.append(WriteItem(index=MetadataIndex(name), type=WriteItemType.BYTE_IO))
                continue
            key, offsets, size = self.placement[name]
            self._by_index[(key, tuple(offsets))] = name
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.size())
            items.append(WriteItem(index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(t),
                                                               size=torch.Size(size))))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        return self.state_dict[self._by_index[(index.fqn, tuple(index.offset or ()))]]


class ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads, for each destination tensor, the chunk at its offsets from whatever saved
    chunks overlap it (DCP's resharding)."""

    def __init__(self, placement: Dict[str, Tuple[str, List[int]]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.placement = placement  # state-dict name -> (key, offsets)
        self._by_index: Dict[Tuple[str, Tuple[int, ...]], str] = {}

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for name, t in self.state_dict.items():
            key, offsets = self.placement[name]
            self._by_index[(key, tuple(offsets))] = name
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.size())
            requests += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[self._by_index[(index.fqn, tuple(index.offset))]]
