"""The per-node cost records the profiler writes and the simulator reads.

Storage references (`Ref`) say where a tensor's memory lives:
  ("new", uid)            a storage this node allocated (uid from the StorageTracker)
  ("value", node, index)  the storage of element `index` of another node's output
  ("grad_out", index)     (backward only) the gradient this node received for output `index`
  ("external",)           memory that existed before the step: parameters, buffers, inputs
Byte counts are sympy expressions of the symbol `batch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy

__all__ = ["Ref", "Event", "NodeCost", "Costs", "BATCH"]

Ref = tuple
Event = tuple  # ("alloc" | "free", uid, bytes expression), or ("release_grad", output index, 0):
# the gradient this node received for that output is dropped here (inside an opaque leaf),
# or ("release_out", output index, 0): the node's own hold on that output (a selective
# checkpoint's cache of it, held for its backward) ends here, in its backward; or
# ("release_in", 0, 0): its holds on the inputs it saves end here (a checkpoint's frame
# lets them go as the last op that saved a tensor for its rerun ends its backward)

BATCH = sympy.Symbol("batch", positive=True, integer=True)


@dataclass
class NodeCost:
    """What one graph node costs in memory and arithmetic, forward and backward.

    `name` is the FX node name (the plan's key); `label` names it for people: the
    module path of a module call (`layer3.1.conv2`), else `module.path:node_name`.
    """

    name: str
    op: str
    label: str
    shapes: tuple[tuple[int, ...], ...]
    nbytes: tuple[sympy.Expr, ...]
    inputs: tuple[tuple[str, int], ...]
    outputs: tuple[Ref, ...]
    requires_grad: tuple[bool, ...]
    internal: tuple[int, ...]
    saved: tuple[Ref, ...]
    fwd_events: tuple[Event, ...]
    fwd_flops: sympy.Expr
    opaque: bool = False
    has_backward: bool = False
    bwd_events: tuple[Event, ...] = ()
    grad_inputs: tuple[tuple[tuple[str, int], Ref], ...] = ()
    param_grads: tuple[int, ...] = ()
    param_keys: tuple[str, ...] = ()  # the parameter each of `param_grads` is the gradient of
    bwd_flops: sympy.Expr = sympy.Integer(0)  # an opaque leaf's (counted apart); 0 for others, not counted
    many_ops: bool = False  # its backward runs several ops (a checkpointed segment, an opaque leaf)

    def held_inputs(self) -> list[tuple[str, int]]:
        """The inputs it saves (a checkpoint's frame holds them, and lets them go at its
        "release_in" event)."""
        inputs = set(self.inputs)
        return [tuple(ref[1:]) for ref in self.saved if ref[0] == "value" and tuple(ref[1:]) in inputs]


@dataclass
class Costs:
    """Every node's costs for one model and input signature, in execution order.

    `nodes` ends with the loss node `"loss"`; `outputs` are the graph's output
    elements, which the caller holds until backward ends; `sizes` maps every
    storage uid to its bytes; `example_batch` is the batch the model was traced at;
    `held_until` maps a node to the node until which eager Python keeps its output
    (the end of a module call it was passed to); `batch_symbolic` is False when the
    counts hold at `example_batch` only.
    """

    nodes: list[NodeCost]
    outputs: tuple[tuple[str, int], ...]
    sizes: dict[int, sympy.Expr]
    example_batch: int
    input_shapes: tuple[tuple[int, ...], ...]
    opaque: tuple[str, ...] = ()
    held_until: dict[str, str] = field(default_factory=dict)
    batch_symbolic: bool = True
    by_name: dict[str, NodeCost] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_name = {n.name: n for n in self.nodes}
        self._numeric: dict[int, dict[int, int]] = {}

    def prime_sizes(self, batch: int, values: dict[int, int]) -> None:
        """Give `sizes_at(batch)` its answer, already evaluated (by whoever built `sizes`
        from other evaluated costs)."""
        if values.keys() != self.sizes.keys():
            raise ValueError("prime_sizes: the evaluated sizes must cover exactly the storages in `sizes`")
        self._numeric[batch] = values

    def sizes_at(self, batch: int) -> dict[int, int]:
        """Every storage's bytes at `batch`, evaluated once and cached."""
        if batch not in self._numeric:
            values = {}
            for uid, expr in self.sizes.items():
                value = expr.xreplace({BATCH: batch}) if expr.free_symbols else expr
                values[uid] = int(math.ceil(value))
            self._numeric[batch] = values
        return self._numeric[batch]
