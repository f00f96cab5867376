"""Costs of a plan without profiling it: composed from profiled records.

The graph is profiled once as it is and once per alternative (a recompute mode, say)
with every candidate segment rewritten that way. A plan's costs take, for each
segment, either its nodes' records from the first profile or the segment's record
from the profile of the chosen alternative. Each profile numbers its storages from
0, so each alternative's records are shifted apart, each once, the first time a plan
takes it: the solver composes hundreds of plans from the same profiles.
"""

from __future__ import annotations

import dataclasses

from rewriter.cost_models.node_costs import Costs, NodeCost
from rewriter.cost_models.saved import value_storages

__all__ = ["Composer", "compose", "aliases", "redirected"]

_SHIFT = 10**7


def _shift_ref(ref, offset: int):
    return ("new", ref[1] + offset) if ref[0] == "new" else ref


def _shift_events(events, offset: int):
    return tuple((kind, uid if kind in ("release_grad", "release_out", "release_in") else uid + offset, b) for kind, uid, b in events)


def _shifted(node: NodeCost, offset: int) -> NodeCost:
    return dataclasses.replace(
        node,
        outputs=tuple(_shift_ref(r, offset) for r in node.outputs),
        internal=tuple(u + offset for u in node.internal),
        saved=tuple(_shift_ref(r, offset) for r in node.saved),
        fwd_events=_shift_events(node.fwd_events, offset),
        bwd_events=_shift_events(node.bwd_events, offset),
        grad_inputs=tuple((e, _shift_ref(r, offset)) for e, r in node.grad_inputs),
        param_grads=tuple(u + offset for u in node.param_grads),
        param_keys=node.param_keys,
    )


def aliases(storage: dict[tuple[str, int], int | None], members: tuple[str, ...], outs: tuple[str, ...],
            by_name: dict[str, NodeCost]) -> dict[tuple[str, int], tuple[str, int]]:
    """Each output element of the `members` that a unit replaces by its record (all but
    `outs`) on the same storage as an output of the unit (an in-place activation
    ending a segment: its consumers' saved tensors name the storage's first owner, the
    BatchNorm before it) -> that output. Without it a consumer outside the unit would
    hold a value that no longer exists, and its bytes would be left out."""
    owner = {storage[(o, 0)]: (o, 0) for o in outs if storage.get((o, 0)) is not None}
    return {(m, k): owner[storage[(m, k)]] for m in members if m not in outs
            for k in range(len(by_name[m].outputs)) if storage.get((m, k)) in owner}


def redirected(node: NodeCost, alias: dict[tuple[str, int], tuple[str, int]]) -> NodeCost:
    """`node` with its references to the elements in `alias` moved to what they alias."""
    if not alias:
        return node

    def ref(r):
        return ("value", *alias[r[1:]]) if r[0] == "value" and r[1:] in alias else r

    inputs = tuple(alias.get(e, e) for e in node.inputs)
    outputs, saved = tuple(map(ref, node.outputs)), tuple(map(ref, node.saved))
    grads = tuple((alias.get(e, e), r) for e, r in node.grad_inputs)
    if (inputs, outputs, saved, grads) == (node.inputs, node.outputs, node.saved, node.grad_inputs):
        return node
    return dataclasses.replace(node, inputs=inputs, outputs=outputs, saved=saved, grad_inputs=grads)


class Composer:
    """Composes plans from `base` and `alternatives`. `units[key] = (out, members)`: a
    rewritable unit (a recompute segment, an invert chain) whose nodes `members` in
    `base` each alternative holds as one node named `out`, or (a compress group) as
    the nodes named in the tuple `out`. Units chosen together must not share nodes."""

    def __init__(self, base: Costs, alternatives: list[Costs], units: dict[str, tuple[str, tuple[str, ...]]]):
        self.base = base
        self.units = units
        batch = base.example_batch
        self._alternatives = alternatives
        self._nodes: list[dict[str, NodeCost]] = [{} for _ in alternatives]  # shifted records, as plans take them
        self._sizes: list[tuple[dict, dict[int, int]]] = []
        for index, alternative in enumerate(alternatives):
            offset = (index + 1) * _SHIFT
            self._sizes.append((
                {uid + offset: b for uid, b in alternative.sizes.items()},
                {uid + offset: b for uid, b in alternative.sizes_at(batch).items()},
            ))
        self._base_numeric = base.sizes_at(batch)
        storage = value_storages(base)
        self._aliases = {key: aliases(storage, members, _names(out), base.by_name)
                         for key, (out, members) in units.items()}

    def __call__(self, choice: dict[str, int]) -> Costs:
        """`base` with each unit in `choice` replaced by its record in
        `alternatives[choice[key]]`."""
        dropped, replaced, used, alias = set(), {}, set(), {}
        for key, index in choice.items():
            alias.update(self._aliases[key])
            out, members = self.units[key]
            if used & set(members):
                raise ValueError(f"compose: unit {key!r} shares nodes with another chosen unit")
            used.update(members)
            outs = _names(out)
            dropped.update(m for m in members if m not in outs)
            replaced.update((o, self._record(index, o)) for o in outs)
        nodes = [replaced.get(node.name) or redirected(node, alias) for node in self.base.nodes if node.name not in dropped]
        sizes, numeric = dict(self.base.sizes), dict(self._base_numeric)
        for index in sorted(set(choice.values())):
            symbolic, evaluated = self._sizes[index]
            sizes.update(symbolic)
            numeric.update(evaluated)
        base = self.base
        composed = Costs(
            nodes=nodes, outputs=base.outputs, sizes=sizes, example_batch=base.example_batch,
            input_shapes=base.input_shapes, opaque=base.opaque, held_until={}, batch_symbolic=base.batch_symbolic,
        )
        composed.prime_sizes(base.example_batch, numeric)
        return composed

    def _record(self, index: int, out: str) -> NodeCost:
        """`alternatives[index]`'s record of `out`, its storages shifted apart."""
        found = self._nodes[index].get(out)
        if found is None:
            found = self._nodes[index][out] = _shifted(self._alternatives[index].by_name[out], (index + 1) * _SHIFT)
        return found


def _names(out: str | tuple[str, ...]) -> tuple[str, ...]:
    return out if isinstance(out, tuple) else (out,)


def compose(base: Costs, alternatives: list[Costs], choice: dict[str, int], members: dict[str, tuple[str, ...]]) -> Costs:
    """One plan's costs, segments keyed by their output node (see `Composer`)."""
    return Composer(base, alternatives, {out: (out, nodes) for out, nodes in members.items()})(choice)
