"""Split a model into fragments: the units the outer sync sends one at a time.

A model exposing `blocks` is split by groups of blocks, `strided` (fragment p holds blocks p,
p + P, p + 2P, ...) or `sequential` (contiguous runs). Parameters outside the blocks follow their
neighbours: those registered before the first block (the embedding) join block 0's fragment,
those after the last block (final norm, output head) join the last block's fragment. A list of
modules makes one fragment per module.
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


def split_model(model: nn.Module, count: int, pattern: str = "strided") -> list[Fragment]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if count == 1:
        return [Fragment(0, [n for n, _ in named], [p for _, p in named])]
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `blocks` ModuleList to split into {count} fragments")
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
    fragments, seen = [], set()
    for index, module in enumerate(modules):
        params = [p for p in module.parameters() if p.requires_grad]
        if any(id(p) in seen for p in params):
            raise ValueError(f"module {index} shares parameters with an earlier fragment")
        seen.update(id(p) for p in params)
        fragments.append(Fragment(index, [f"{index}.{n}" for n, _ in module.named_parameters()], params))
    return fragments
