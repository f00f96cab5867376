"""Seconds: each node's forward timed on the real device, and a roofline to scale it.

What a plan adds is mostly forward work done once more (a recomputed segment's nodes,
a tiled chain's halo rows, an inverse op's passes over a tensor). `node_seconds` times
each node of the graph as it runs on the example inputs, so the estimate knows what a
FLOP count cannot: on a 2-core CPU DenseNet-BC's BatchNorms take four fifths of its
convolutions' time, and on a GPU every small kernel costs its launch. The roofline (one compute
rate and one bandwidth per device type, rough defaults) only says how a node's time
scales when the work is a multiple of its forward (`Roofline.scaled`), and stands in
where nothing was timed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

__all__ = ["Roofline", "ROOFLINES", "node_seconds", "synchronizer"]


@dataclass(frozen=True)
class Roofline:
    flops_per_second: float
    bytes_per_second: float

    def seconds(self, flops: float, moved_bytes: float = 0.0) -> float:
        return max(flops / self.flops_per_second, moved_bytes / self.bytes_per_second)

    def scaled(self, measured: float, flops: float, moved_bytes: float, times: float, move: float) -> float:
        """The seconds of `times` x a node's FLOPs and `move` x its bytes, where the node
        itself took `measured` seconds: the roofline's ratio of the two, applied to the
        measurement (a compute-bound node scales with `times`, a memory-bound one with `move`)."""
        alone = self.seconds(flops, moved_bytes)
        if alone <= 0.0:
            return measured * max(times, move)
        return measured * self.seconds(times * flops, move * moved_bytes) / alone


ROOFLINES = {
    "cpu": Roofline(flops_per_second=1e11, bytes_per_second=2e10),
    "cuda": Roofline(flops_per_second=2e14, bytes_per_second=2e12),
}


def synchronizer(device_type: str):
    """What to call before and after timing work on a device type: CUDA runs kernels
    asynchronously, so the clock must wait for them; the CPU needs nothing."""
    return torch.cuda.synchronize if device_type == "cuda" else (lambda: None)


class _NodeTimer(fx.Interpreter):
    """Runs the graph and adds each node's wall-clock seconds to `seconds[name]`."""

    def __init__(self, gm: fx.GraphModule, synchronize, probes: list[dict[str, Callable[[list, Any], None]]]):
        super().__init__(gm)
        self.synchronize = synchronize
        self.seconds: dict[str, list[float]] = {}
        self.probes = [dict(found) for found in probes]  # each called once, then dropped

    def run_node(self, node: fx.Node) -> Any:
        if node.op in ("placeholder", "output", "get_attr"):
            return super().run_node(node)
        self.synchronize()
        start = time.perf_counter()
        result = super().run_node(node)
        self.synchronize()
        self.seconds.setdefault(node.name, []).append(time.perf_counter() - start)
        for found in self.probes:
            probe = found.pop(node.name, None)
            if probe is not None:
                probe([self.env[n] for n in node.all_input_nodes], result)
        return result


def node_seconds(gm: fx.GraphModule, inputs: tuple, repeats: int = 3,
                 probes: list[dict[str, Callable[[list, Any], None]]] = ()) -> dict[str, float]:
    """Median forward seconds of each compute node of `gm` on `inputs` (on their device),
    over `repeats` runs after a warm-up run. Runs without autograd (values are freed
    after their last use, so this needs no more memory than inference), in `gm`'s
    current mode: the caller restores what the runs change (BatchNorm statistics, RNG).
    `probes`: maps of callers' own measurements; `found[node](values, result)` is called
    once, in the warm-up run, after the node ran, with the values of its inputs
    (`node.all_input_nodes`, as the node left them) and its result."""
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
    timer = _NodeTimer(gm, synchronizer("cuda" if cuda else "cpu"), list(probes))
    with torch.no_grad():
        for run in range(repeats + 1):  # on copies: the graph may change its inputs in place
            timer.run(*(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs))
            if run == 0:  # the warm-up: allocator, kernel selection, caches
                timer.seconds.clear()
    return {name: statistics.median(values) for name, values in timer.seconds.items()}
