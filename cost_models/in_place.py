"""Which graph nodes change their first input in place."""

from __future__ import annotations

from torch import fx

__all__ = ["mutates_an_input"]


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
