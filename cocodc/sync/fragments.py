"""Split a model into fragments: the units the outer sync sends one at a time.

A model is split by groups of its blocks, `strided` (fragment p holds blocks p, p + P, p + 2P, ...)
or `sequential` (contiguous runs). Its blocks are its own `blocks` ModuleList, else the ModuleList a
dotted path names (sync.blocks: "model.layers"), or else found: the ModuleList of repeated modules of one
type that holds the most parameters (a transformers model's decoder layers). Parameters outside
the blocks follow their neighbours: those registered before the first block (the embedding) join
block 0's fragment, those after the last block (final norm, output head) join the last block's
fragment; a parameter shared by two modules (tied embeddings) is in the fragment of the first. A
list of modules makes one fragment per module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass
class Fragment:
    index: int
    names: list[str]
    params: list[nn.Parameter]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def block_groups(n_blocks: int, count: int, pattern: str) -> list[list[int]]:
    if not 1 <= count <= n_blocks:
        raise ValueError(f"cannot split {n_blocks} blocks into {count} fragments")
    if pattern == "strided":
        return [list(range(p, n_blocks, count)) for p in range(count)]
    if pattern == "sequential":
        bounds = [n_blocks * p // count for p in range(count + 1)]
        return [list(range(bounds[p], bounds[p + 1])) for p in range(count)]
    raise ValueError(f"unknown fragment pattern {pattern!r}; use strided or sequential")


def find_blocks(model: nn.Module, path: str = "") -> nn.ModuleList:
    """The model's repeated blocks (see the module's docstring); ValueError if it has none."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):  # its own (a wrapper's applies `path` itself)
        return model.blocks
    if path:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {path!r} (sync.blocks)") from None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{path!r} in {type(model).__name__} is a {type(blocks).__name__}, not a ModuleList")
        return blocks
    repeated = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1
    ]
    if not repeated:
        raise ValueError(f"{type(model).__name__} has no ModuleList of repeated blocks: name one with sync.blocks")
    return max(repeated, key=lambda blocks: sum(p.numel() for p in blocks.parameters()))


def split_model(model: nn.Module, count: int, pattern: str = "strided", blocks_path: str = "") -> list[Fragment]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if count == 1:
        return [Fragment(0, [n for n, _ in named], [p for _, p in named])]
    blocks = find_blocks(model, blocks_path)
    owner_of_block = {}
    for fragment, members in enumerate(block_groups(len(blocks), count, pattern)):
        for block in members:
            owner_of_block[block] = fragment
    owner_of_param = {}
    for block, module in enumerate(blocks):
        for p in module.parameters():
            owner_of_param[id(p)] = owner_of_block[block]
    fragments = [Fragment(i, [], []) for i in range(count)]
    seen_block = False
    for name, p in named:
        if id(p) in owner_of_param:
            seen_block = True
            owner = owner_of_param[id(p)]
        else:
            owner = owner_of_block[len(blocks) - 1] if seen_block else owner_of_block[0]
        fragments[owner].names.append(name)
        fragments[owner].params.append(p)
    return fragments


def split_modules(modules: Sequence[nn.Module]) -> list[Fragment]:
    """One fragment per module; a parameter two modules share (a tied embedding and output head)
    travels with the first."""
    fragments, seen = [], set()
    for index, module in enumerate(modules):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for _, p in named)
        fragments.append(Fragment(index, [f"{index}.{n}" for n, _ in named], [p for _, p in named]))
    return fragments
