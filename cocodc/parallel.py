"""How a region holds its model: a whole replica per rank (DDP) or sharded over its ranks (FSDP2).

`shard_region` runs before the outer sync is built (FSDP2 replaces the parameters with DTensors
whose local shards the sync then keeps its state for); `replicate_region` wraps the model the inner
step runs through after it. Either way the inner optimizer is built over `model.parameters()`:
under FSDP2 those are the local shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from cocodc.comm import CommEngine
from cocodc.config import Config
from cocodc.sync.fragments import find_blocks
from cocodc.topology import Topology


def shard_region(model: nn.Module, config: Config, topology: Topology) -> nn.Module:
    """With topology.parallel fsdp: FSDP2 on every block and the root over the region's ranks,
    bf16 compute with fp32 gradient reduction on CUDA, fp32 on CPU. The model is changed in place."""
    if config.topology.parallel != "fsdp":
        return model
    device = topology.device
    mesh = DeviceMesh.from_group(topology.intra_group, device.type)
    bf16 = device.type == "cuda" and config.train.precision != "fp32"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mesh": mesh, **({"mp_policy": policy} if policy is not None else {})}
    for block in find_blocks(model, config.sync.blocks):
        fully_shard(block, **kwargs)
    # The root too gives its parameters back after a forward (FSDP2 keeps them gathered by default):
    # a forward without backward (eval) would otherwise leave the embedding and head gathered, and the
    # outer sync's writes to their shards unseen by the next step.
    fully_shard(model, reshard_after_forward=True, **kwargs)
    return model


def replicate_region(model: nn.Module, config: Config, topology: Topology, intra: CommEngine) -> nn.Module:
    """What the inner step runs through: DDP over the region's ranks for ddp with R > 1; the model
    itself for fsdp (it reduces its own gradients) or a region of one rank."""
    if config.topology.parallel == "fsdp" or topology.ranks_per_region == 1:
        return model
    return data_parallel(model, intra)


def data_parallel(model: nn.Module, engine: CommEngine) -> DistributedDataParallel:
    """DDP over the engine's group, its gradients averaged by the engine: a lost peer is then a
    CommError that names the group, and the engine's deadline holds. No buffer broadcast: the
    model's only buffers are the rope tables, which every rank builds alike."""
    replicated = DistributedDataParallel(model, process_group=engine.group, broadcast_buffers=False)
    # A lambda: DDP rejects a hook whose annotations are strings (postponed evaluation).
    hook = lambda engine, bucket: engine.all_reduce_mean(bucket.buffer()).future()  # noqa: E731
    replicated.register_comm_hook(engine, hook)
    return replicated


@contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Backward inside the block leaves the region's gradients unreduced, to accumulate (a
    micro-batch but the last): DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of the storage FSDP owns), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like_params(tree: Any, params: dict[str, torch.Tensor]) -> Any:
    """`tree` with every `{name: local tensor}` leaf whose name is a sharded parameter's wrapped as a
    DTensor laid out like that parameter (views, no copy): the form torch.distributed.checkpoint
    saves once per region and reshards on load."""
    if isinstance(tree, dict):
        return {
            key: _as_dtensor(value, params[key])
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and key in params
            else like_params(value, params)
            for key, value in tree.items()
        }
    if isinstance(tree, list):
        return [like_params(value, params) for value in tree]
    return tree


def local_tree(tree: Any) -> Any:
    """`tree` with every DTensor replaced by its local shard (the inverse of `like_params`)."""
    if isinstance(tree, dict):
        return {key: local_tree(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [local_tree(value) for value in tree]
    return local(tree) if isinstance(tree, torch.Tensor) else tree


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with its DTensors as their local shards: what rank i of a region
    sends to rank i of a healing peer laid out alike (torchft's transport re-creates no mesh)."""
    return local_tree(optimizer.state_dict())


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The inverse of `local_optimizer_state`: each sharded parameter's state tensors become
    DTensors laid out like the parameter again (AdamW steps a DTensor with DTensor moments)."""
    optimizer.load_state_dict(state)
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # AdamW's `step` is a scalar, unsharded
                param_state[key] = _as_dtensor(value, param)


def _as_dtensor(shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if not isinstance(param, DTensor):
        return shard
    return DTensor.from_local(
        shard, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
