"""What compressing a node adds to a training step, measured on the example's values.

A compressed op packs what its backward keeps (a 1-bit mask, window offsets, a
quantized copy) in forward and unpacks it in backward: several small kernels where
eager runs one, whose cost three passes over the node's bytes (the roofline estimate
compress once used) put too low on a CPU. On the BatchNorm/LeakyReLU chain at 0.6 of its
peak, plans that compressed LeakyReLUs were estimated cheaper than recompute alone and
measured slower (benchmarks/README.md).

`FormTimings` times member nodes alone (recompute's code of a one-node segment),
forward and backward, as they are and as `compress.rewrite` makes them, on their real inputs while `node_seconds` times the
graph (its probes): per kind of node (its op, settings and form) the members with the
fewest and the most input elements; every member of the kind is then priced on the
straight line through those two points (one point: its value), never below zero. A
kind whose probe fails (out of memory, say) is priced by its bytes, as compress was before.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any, Callable

import torch
from torch import fx

from rewriter.cost_models.runtime import synchronizer
from rewriter.passes import compress, compressed_ops, recompute

__all__ = ["FormTimings"]

log = logging.getLogger(__name__)

ROUNDS = 5  # timed alternations of a node as it is and compressed, after one warm-up of each


class FormTimings:
    """The seconds each node of `forms` (node -> compressed form, as `compress.rewrite`
    takes them) adds compressed, from `probes` run by `node_seconds`; `shapes`: each
    node's output shape (the planner's), for the size of each member's input."""

    def __init__(self, gm: fx.GraphModule, forms: dict[str, str], shapes: dict[str, tuple[int, ...]]):
        self.gm = gm
        self.forms = forms
        self._by_kind: dict[tuple, list[tuple[int, str]]] = {}  # kind -> (input elements, node), fewest first
        for node in gm.graph.nodes:
            source = compress._activation_input(node) if node.name in forms else None
            if isinstance(source, fx.Node) and source.name in shapes:
                elements = math.prod(shapes[source.name])
                self._by_kind.setdefault(_kind_of(gm, node, forms[node.name]), []).append((elements, node.name))
        for members in self._by_kind.values():
            members.sort()
        self.measured: dict[str, float] = {}  # probed node -> seconds added

    def probes(self) -> dict[str, Callable[[list, Any], None]]:
        """For `node_seconds`: a probe per kind's smallest and largest member."""
        chosen = {name for members in self._by_kind.values() for _, name in (members[0], members[-1])}
        return {name: self._probe(name) for name in chosen}

    def seconds(self) -> dict[str, float]:
        """Each member's added seconds, where its kind's members were probed."""
        found = {}
        for members in self._by_kind.values():
            (low, first), (high, last) = members[0], members[-1]
            if first not in self.measured or last not in self.measured:
                continue
            a, b = self.measured[first], self.measured[last]
            slope = (b - a) / (high - low) if high > low else 0.0
            found.update((name, max(0.0, a + slope * (elements - low))) for elements, name in members)
        return found

    def _probe(self, name: str) -> Callable[[list, Any], None]:
        def probe(values: list, result: Any) -> None:
            try:
                self.measured[name] = _added_seconds(self.gm, name, self.forms[name], values)
            except RuntimeError as error:  # out of memory, say: its kind is priced by the roofline
                log.info("timing %s compressed failed (%s); its kind is priced by its bytes", name, error)

        return probe


def _kind_of(gm: fx.GraphModule, node: fx.Node, form: str) -> tuple:
    """What a node's compressed cost depends on besides its size: op, settings, form."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        what: Any = (type(module), repr(module))
    else:
        what = (node.op, node.target)
    settings = fx.node.map_arg((node.args, node.kwargs), lambda n: None)
    return what, repr(settings), form


def _added_seconds(gm: fx.GraphModule, name: str, form: str, values: list) -> float:
    """Median seconds of `name` forward and backward compressed, less as it is."""
    node = next(n for n in gm.graph.nodes if n.name == name)
    plain, outside = recompute._segment_code(gm, recompute.Segment((name,), (), name))  # the node alone
    compressed = compress.rewrite(plain, {name: form})
    inputs = [dict(zip(node.all_input_nodes, values))[n] for n in outside]
    device = next((v.device for v in inputs if isinstance(v, torch.Tensor)), torch.device("cpu"))
    synchronize = synchronizer(device.type)
    times: dict[str, list[float]] = {"plain": [], "compressed": []}
    rounding = compressed_ops._generator(device)  # lossy forms draw their roundings from it: left as it was
    state = rounding.get_state()
    try:
        with torch.enable_grad():
            for round_ in range(ROUNDS + 1):
                for label, code in (("plain", plain), ("compressed", compressed)):
                    seconds = _step(code, inputs, synchronize)
                    if round_:  # round 0 warms up
                        times[label].append(seconds)
    finally:
        rounding.set_state(state)
    return max(0.0, statistics.median(times["compressed"]) - statistics.median(times["plain"]))


def _step(code: fx.GraphModule, values: list, synchronize) -> float:
    """Seconds of one forward and backward of `code` on copies of `values` (floating
    tensors requiring grad, as a step's activations do; a copy, so that in-place ops may
    write them)."""
    leaves = [v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for v in values]
    inputs = [v.clone() if isinstance(v, torch.Tensor) and v.requires_grad else v for v in leaves]
    synchronize()
    start = time.perf_counter()
    out = code(*inputs)
    torch.autograd.backward(out, torch.ones_like(out))
    synchronize()
    return time.perf_counter() - start
