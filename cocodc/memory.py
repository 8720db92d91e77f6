"""The training state's bytes on this rank, measured from the tensors' storage (not from a formula).

Each storage is counted once however many views share it (the outer sync's buffers are views of
one flat buffer per fragment), and a DTensor counts its local shard's storage only (FSDP2 keeps
each parameter's shard, padded, in a storage of its own).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def tensors_in(tree: Any) -> Iterable[torch.Tensor]:
    """Every tensor in a state tree (dicts, lists, tuples)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensors_in(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensors_in(value)


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    storages: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
