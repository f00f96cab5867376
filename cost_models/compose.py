"""Costs of a plan without profiling it: composed from profiled records.

The graph is profiled once as it is and once per recompute mode with every candidate
segment in that mode. A plan's costs take, for each segment, either its nodes'
records from the first profile or the segment's record from the profile of the
chosen mode. Each profile numbers its storages from 0, so each is shifted apart.
"""

from __future__ import annotations

import dataclasses

from cost_models.node_costs import Costs, NodeCost

__all__ = ["compose"]

_SHIFT = 10**7


def _shift_ref(ref, offset: int):
    return ("new", ref[1] + offset) if ref[0] == "new" else ref


def _shift_events(events, offset: int):
    return tuple((kind, uid if kind == "release_grad" else uid + offset, b) for kind, uid, b in events)


def _shifted(node: NodeCost, offset: int) -> NodeCost:
    if offset == 0:
        return node
    return dataclasses.replace(
        node,
        outputs=tuple(_shift_ref(r, offset) for r in node.outputs),
        internal=tuple(u + offset for u in node.internal),
        saved=tuple(_shift_ref(r, offset) for r in node.saved),
        fwd_events=_shift_events(node.fwd_events, offset),
        bwd_events=_shift_events(node.bwd_events, offset),
        grad_inputs=tuple((e, _shift_ref(r, offset)) for e, r in node.grad_inputs),
        param_grads=tuple(u + offset for u in node.param_grads),
    )


def compose(base: Costs, alternatives: list[Costs], choice: dict[str, int], members: dict[str, tuple[str, ...]]) -> Costs:
    """`base` with each segment `out` in `choice` replaced by node `out` of
    `alternatives[choice[out]]`; `members[out]` are the segment's nodes in `base`."""
    dropped = {name for out in choice for name in members[out] if name != out}
    nodes = []
    for node in base.nodes:
        if node.name in dropped:
            continue
        if node.name in choice:
            index = choice[node.name]
            nodes.append(_shifted(alternatives[index].by_name[node.name], (index + 1) * _SHIFT))
        else:
            nodes.append(node)
    sizes = dict(base.sizes)
    for index, alternative in enumerate(alternatives):
        if index in choice.values():
            sizes.update({uid + (index + 1) * _SHIFT: b for uid, b in alternative.sizes.items()})
    return Costs(
        nodes=nodes, outputs=base.outputs, sizes=sizes, example_batch=base.example_batch,
        input_shapes=base.input_shapes, opaque=base.opaque, held_until={}, batch_symbolic=base.batch_symbolic,
    )
