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

__all__ = ["StageCosts", "stage_costs"]


@dataclass(frozen=True)
class StageCosts:
    kept: int  # bytes it made that are live when the forward ends
    forward: int  # highest live bytes in its forward steps, less what the stages before it keep
    backward: int  # the same over its backward steps


def stage_costs(costs: Costs, stage_of: dict[str, int], count: int) -> list[StageCosts]:
    """Each of `count` stages' costs in the step `costs` describes; `stage_of` maps the
    names of `costs`' nodes to their stage. A node in no stage belongs, for its steps,
    to the next stage in graph order (or the last one)."""
    replay = _Replay(costs, costs.example_batch)
    replay.forward()
    kept = [0] * count
    for uid in replay.refs:
        owner = replay.born.get(uid, (None,))[0]
        if owner in stage_of:
            kept[stage_of[owner]] += replay.size[uid]
    replay.backward()
    highs = replay.step_highs()
    owners, following = [], count - 1
    for node in reversed(costs.nodes):  # each node's stage; a node in none: the next one's
        following = stage_of.get(node.name, following)
        owners.append(following)
    owners.reverse()
    forward, backward = [None] * count, [None] * count
    steps = [(node, owner, forward) for node, owner in zip(costs.nodes, owners)]
    steps += [(node, owner, backward) for node, owner in reversed(list(zip(costs.nodes, owners))) if node.has_backward]
    before = [0] * count
    for s in range(1, count):
        before[s] = before[s - 1] + kept[s - 1]
    for (node, owner, table), high in zip(steps, highs):
        value = high - before[owner]
        table[owner] = value if table[owner] is None else max(table[owner], value)
    return [StageCosts(kept[s], forward[s] or 0, backward[s] or 0) for s in range(count)]
