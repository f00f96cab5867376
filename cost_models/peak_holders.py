"""What holds the predicted peak: every storage live at that moment, by kind and node.

The same replay as `simulate`, which keeps, each time the peak rises, the storages
alive at that point (those held across nodes, and those of the node's own events up
to their highest point). Their bytes add up to the peak exactly. Kinds:

- "activation": a node's forward output or internal, kept (for the backward, or for
  a later node): what recompute, invert, compress and row-split rewrite;
- "forward temporary": a node's forward storage freed within that node;
- "gradient": the gradient of a value (one node's, or the sum of several);
- "parameter gradient": a parameter's gradient as its node's backward makes it,
  before it is added into `.grad`;
- "backward temporary": anything else a node's backward allocates (workspaces; for a
  node a strategy made, such as a checkpoint, what its backward reruns too).

Strategies rewrite activations (and a rewritten node's temporaries), never gradients:
a peak held mostly by gradients cannot be lowered by a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from rewriter.cost_models.node_costs import Costs
from rewriter.cost_models.simulate import _Replay

__all__ = ["Holder", "peak_holders"]


@dataclass(frozen=True)
class Holder:
    kind: str  # one of the kinds in the module docstring
    node: str  # the label of the node it belongs to (a gradient: the value's)
    nbytes: int


class _Snapshots(_Replay):
    def __init__(self, costs: Costs, batch: int):
        super().__init__(costs, batch)
        self.held: dict[int, int] = {}  # uid -> bytes, at the highest peak so far
        self.sums: dict[int, tuple[str, int]] = {}  # summed gradient storage -> its value
        self.param_sums: dict[int, str] = {}  # summed parameter gradient storage -> the parameter

    def check(self, candidate: int, where: str, held: dict[int, int] | None = None) -> None:
        if candidate > self.peak:
            self.held = held if held is not None else {u: self.size[u] for u in self.refs}
        super().check(candidate, where)

    def window(self, events, where: str, slot=None, own=None, inputs=lambda: ()) -> None:
        current = highest = 0
        made: set[int] = set()  # this window's storages, alive at the point reached
        gone: set[int] = set()  # storages held before the window, freed by the point reached
        at_highest: tuple[set[int], set[int]] = (set(), set())
        for kind, uid, _ in events:
            if kind in ("release_grad", "release_out"):
                source = slot if kind == "release_grad" else own
                held = source(uid) if source is not None else None
                if held is not None and self.releasable(held) and held not in gone:
                    current -= self.size[held]
                    gone.add(held)
            elif kind == "release_in":
                for uid in set(self.freed_by(inputs())) - gone:
                    current -= self.size[uid]
                    gone.add(uid)
            elif kind == "alloc":
                current += self.size[uid]
                made.add(uid)
            else:
                current -= self.size[uid]
                (made.discard if uid in made else gone.add)(uid)
            if current > highest:
                highest, at_highest = current, (set(made), set(gone))
        if self.live + highest <= self.peak:  # no new peak: nothing to keep
            return
        made, gone = at_highest
        held = {u: self.size[u] for u in self.refs if u not in gone}
        held.update({u: self.size[u] for u in made})
        self.check(self.live + highest, where, held)

    def summed(self, uid: int, element: tuple[str, int]) -> None:
        self.sums[uid] = element

    def param_summed(self, uid: int, key: str) -> None:
        self.param_sums[uid] = key


def _kinds(costs: Costs) -> dict[int, tuple[str, str]]:
    """Each storage the step allocates -> (kind, node label)."""
    label = {node.name: node.label for node in costs.nodes}
    kinds: dict[int, tuple[str, str]] = {}
    for node in costs.nodes:
        for ref in node.outputs:
            if ref[0] == "new":
                kinds[ref[1]] = ("activation", node.label)
        for uid in node.internal:
            kinds[uid] = ("activation", node.label)
        for kind, uid, _ in node.fwd_events:
            if kind == "alloc":
                kinds.setdefault(uid, ("forward temporary", node.label))
        for element, ref in node.grad_inputs:
            if ref[0] == "new":
                kinds[ref[1]] = ("gradient", label.get(element[0], element[0]))
        for uid in node.param_grads:
            kinds[uid] = ("parameter gradient", node.label)
        allocated = [uid for kind, uid, _ in node.bwd_events if kind == "alloc"]
        for index, uid in enumerate(allocated):  # the loss's first: the initial gradient
            default = "gradient" if node.name == "loss" and index == 0 else "backward temporary"
            kinds.setdefault(uid, (default, node.label))
    return kinds


def peak_holders(costs: Costs, batch: int | None = None) -> tuple[Holder, ...]:
    """The storages live at the predicted peak, summed by kind and node, most bytes
    first; their bytes add up to `simulate(costs, batch).peak_bytes`."""
    replay = _Snapshots(costs, costs.example_batch if batch is None else batch)
    replay.forward()
    replay.backward()
    kinds = _kinds(costs)
    label = {node.name: node.label for node in costs.nodes}
    totals: dict[tuple[str, str], int] = {}
    for uid, nbytes in replay.held.items():
        if uid in replay.sums:
            name = replay.sums[uid][0]
            key = ("gradient", label.get(name, name))
        elif uid in replay.param_sums:
            key = ("parameter gradient", replay.param_sums[uid])
        else:
            key = kinds.get(uid, ("backward temporary", "?"))
        totals[key] = totals.get(key, 0) + nbytes
    return tuple(Holder(kind, node, nbytes) for (kind, node), nbytes
                 in sorted(totals.items(), key=lambda item: (-item[1], item[0])) if nbytes)
