"""The values a traced graph's nodes take on example inputs, on fake tensors.

Symbolic tracing cannot answer `if x.shape[-1] > 64:` (a traced value has no truth).
`ExampleValues` computes each node's value as the graph is built, on fake tensors
shaped as the example inputs (no activation memory, no change to the model), so that
the tracer can take the branch the example inputs take. The model's own state is used
as it is (`if self.scale > 0:` has a value; nothing is changed in place), but what
depends on the inputs' data (`if x.sum() > 0:`) has no value and stays untraceable.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.func import functional_call
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["ExampleValues", "UnknownValue"]


class UnknownValue(Exception):
    """A node whose value the example inputs do not give (it depends on tensor data, or
    its op failed on fake tensors)."""


class ExampleValues:
    """Node values on fake tensors for `inputs`, the values of the graph's placeholders
    in order (tensors are copied as fakes; a tensor on the meta device stands for a CPU
    one of its shape and dtype)."""

    def __init__(self, root: nn.Module, inputs: list[Any]):
        self.root = root
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.inputs = [self._fake(v) for v in inputs]
        self.placeholders = 0
        self.values: dict[fx.Node, Any] = {}
        self.reasons: dict[fx.Node, str] = {}

    def _fake(self, value: Any) -> Any:
        def fake(v):
            if not isinstance(v, torch.Tensor) or isinstance(v, FakeTensor):
                return v
            if v.is_meta:
                with self.mode:
                    return torch.empty(v.shape, dtype=v.dtype)
            return self.mode.from_tensor(v)

        return tree_map(fake, value)

    def record(self, node: fx.Node) -> None:
        """Compute `node`'s value from its inputs' (or note why it has none)."""
        try:
            self.values[node] = self._evaluate(node)
        except UnknownValue as unknown:
            self.reasons[node] = str(unknown)
        except Exception as error:  # an op fake tensors cannot run: no value, said if asked
            self.reasons[node] = f"{node.name} cannot run on fake tensors ({type(error).__name__}: {error})"

    def truth(self, node: fx.Node) -> bool:
        """Whether `node`'s value is true on the example inputs."""
        value = self.value(node)
        if isinstance(value, FakeTensor):
            raise UnknownValue(f"{node.name} is a tensor computed from the inputs: its truth is their data")
        try:
            return bool(value)  # a size, or a tensor of the model's own state alone
        except RuntimeError as error:
            raise UnknownValue(f"{node.name} has no truth ({error})") from None

    def value(self, node: fx.Node) -> Any:
        """`node`'s value on the example inputs (UnknownValue, saying why, where none)."""
        if node not in self.values:
            raise UnknownValue(self.reasons.get(node, f"{node.name} has no value"))
        return self.values[node]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            index, self.placeholders = self.placeholders, self.placeholders + 1
            if index >= len(self.inputs):
                raise UnknownValue(f"no example input for {node.name}")
            return self.inputs[index]
        if node.op == "get_attr":  # the model's own state, as it is
            value = self.root
            with _maybe_revert_all_patches():  # the tracer's nn.Module.__getattr__ would trace this
                for part in node.target.split("."):
                    value = getattr(value, part)
            return value
        args = fx.node.map_arg(node.args, self.value)
        kwargs = fx.node.map_arg(node.kwargs, self.value)
        from_inputs = any(isinstance(t, FakeTensor) for t in tree_flatten((args, kwargs))[0])
        if node.op == "call_module" or from_inputs or _in_place(node):
            args, kwargs = self._fake((args, kwargs))  # nothing of the model changes
            mode = self.mode
        else:  # of the model's state alone (`if self.scale > 0:`): for real
            mode = contextlib.nullcontext()
        # the tracer's patches of nn.Module reverted: the op runs, it is not traced
        with _maybe_revert_all_patches(), mode, torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                module = self.root.get_submodule(node.target)
                state = {k: self._fake(t) for k, t in module.state_dict(keep_vars=True).items()}
                return functional_call(module, state, args, kwargs)
        return None  # output


def _in_place(node: fx.Node) -> bool:
    """Whether `node` changes an argument in place (`x.add_(1)`, `x += 1`, `torch.relu_`)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op == "call_function" and getattr(operator, name, None) is node.target:
        return name.startswith("i") and hasattr(operator, name[1:])  # iadd, isub, ... (not is_, index)
    return name.endswith("_") and not name.endswith("__")
