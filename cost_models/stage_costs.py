"""What each stage of a linearised graph costs, read off one simulated step.

The schedule solver (`rewriter.schedule`) treats the graph as a chain of stages (the
recompute segments, in graph order). Per stage it needs: the bytes the stage holds from
its forward until its backward (`kept`), and the highest live bytes during its forward
and during its backward above what the stages before it hold (`forward`, `backward`).
These are read off `simulate`'s replay of a plan where every stage takes the same
option: exact for that plan, and additive over stages for mixed ones wherever the
stages' storages do not outlive their own backward (a U-Net skip does: the sums then
err high). Storages no stage made (the inputs, nodes between stages) count in the
`forward`/`backward` highs of the stages they are live beside.
"""

from __future__ import annotations

from dataclasses import dataclass

from rewriter.cost_models.node_costs import Costs
from rewriter.cost_models.simulate import _Replay

__all__ = ["StageCosts", "Steps", "stage_costs", "steps"]


@dataclass(frozen=True)
class StageCosts:
    kept: int  # bytes it made that are live when the forward ends
    forward: int  # highest live bytes in its forward steps, less what the stages before it keep
    backward: int  # the same over its backward steps


@dataclass(frozen=True)
class Steps:
    """One simulated step, as stages read it: the bytes each node made that are live
    when the forward ends, and the highest live bytes of each forward and each
    backward step, by node (graph order; backward steps in the order they run). The
    same for every way of cutting the graph into stages."""

    nodes: tuple[str, ...]
    kept: dict[str, int]
    forward: tuple[int, ...]
    backward: tuple[tuple[str, int], ...]


def steps(costs: Costs) -> Steps:
    """The step `costs` describes, simulated (`simulate`'s replay)."""
    replay = _Replay(costs, costs.example_batch)
    replay.forward()
    kept: dict[str, int] = {}
    for uid in replay.refs:
        owner = replay.born.get(uid, (None,))[0]
        if owner is not None:
            kept[owner] = kept.get(owner, 0) + replay.size[uid]
    replay.backward()
    highs = replay.step_highs()
    count = len(costs.nodes)
    backward = [node.name for node in reversed(costs.nodes) if node.has_backward]
    return Steps(tuple(node.name for node in costs.nodes), kept, tuple(highs[:count]),
                 tuple(zip(backward, highs[count:])))


def stage_costs(step: Steps, stage_of: dict[str, int], count: int) -> list[StageCosts]:
    """Each of `count` stages' costs in the simulated step `step` (`steps`); `stage_of`
    maps node names to their stage. A node in no stage belongs, for its steps, to the
    next stage in graph order (or the last one)."""
    kept = [0] * count
    for owner, nbytes in step.kept.items():
        if owner in stage_of:
            kept[stage_of[owner]] += nbytes
    owner_of, following = {}, count - 1
    for name in reversed(step.nodes):  # each node's stage; a node in none: the next one's
        following = stage_of.get(name, following)
        owner_of[name] = following
    forward, backward = [None] * count, [None] * count
    before = [0] * count
    for s in range(1, count):
        before[s] = before[s - 1] + kept[s - 1]
    for table, pairs in ((forward, zip(step.nodes, step.forward)), (backward, step.backward)):
        for name, high in pairs:
            owner = owner_of[name]
            value = high - before[owner]
            table[owner] = value if table[owner] is None else max(table[owner], value)
    return [StageCosts(kept[s], forward[s] or 0, backward[s] or 0) for s in range(count)]
