"""Which graph nodes change their first input in place, and which hand it on as their
output (a view or the tensor itself), so that a change made through them reaches it."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

__all__ = ["mutates_an_input", "aliases_input", "written_through"]

_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
                           "permute", "expand", "expand_as", "narrow", "t", "contiguous", "as_strided", "chunk",
                           "split", "unbind", "detach"})
_VIEW_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
                             torch.permute, torch.narrow, torch.t, torch.chunk, torch.split, torch.unbind,
                             torch.detach, operator.getitem})
_PASSING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten)


def mutates_an_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` writes over its first input: a module with `inplace=True`, a
    method or function whose name ends in "_", Python's in-place arithmetic, or an
    `inplace=True` keyword."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") or name.startswith("i") and name[1:] in {"add", "sub", "mul", "truediv"} or bool(node.kwargs.get("inplace"))


def aliases_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node`'s output may be its first input's memory: an identity (timm's
    norm_head, a drop path at rate 0), a view, an item of a tuple, or an in-place op."""
    if mutates_an_input(gm, node):
        return True
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASSING_MODULES)
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def written_through(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes whose memory `node` writes over: its first input, and what that one
    hands on (an in-place activation after an identity writes over the identity's
    input); [] where it writes nothing."""
    if not mutates_an_input(gm, node) or not node.all_input_nodes:
        return []
    written = [node.all_input_nodes[0]]
    while aliases_input(gm, written[-1]) and written[-1].all_input_nodes:
        written.append(written[-1].all_input_nodes[0])
    return written
