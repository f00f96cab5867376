"""The record of a checkpointed segment, composed from its nodes' records without
profiling it.

A segment that runs under non-reentrant `torch.utils.checkpoint` saves nothing but its
inputs (and, in selective mode, the outputs of the ops it keeps). Its forward is its
nodes' forward with every saved tensor let go; its backward reruns its nodes up to the
last one whose output or own memory some node saves (the checkpoint stops early
there), then runs their backwards in reverse order; its frame, which holds its inputs,
goes as the first member that saved a tensor ends its backward (a "release_in" event),
not when the whole segment's backward does. `checkpoint_record` writes both as
the event lists of one `NodeCost`, replaying the nodes' own records by the simulator's
rules (reference-counted storages, gradients summed out of place where they meet), so
that the simulator prices a plan of any segments from the one profile of the graph.

What it leaves out: the checkpoint's own small tensors (4 bytes a segment on CPU).
Plans are verified on a profile of the rewritten graph before they are returned.
"""

from __future__ import annotations

import functools
import itertools
from typing import Iterator

import sympy

from rewriter.cost_models.node_costs import Costs, NodeCost
from rewriter.cost_models.compose import aliases, redirected
from rewriter.cost_models.saved import value_storages

__all__ = ["checkpoint_record", "fresh_uids", "owns_output"]


@functools.lru_cache(maxsize=65536)
def _integer(nbytes: int) -> sympy.Integer:
    """A byte count as records hold it (sympy's constructor takes microseconds; a
    composed plan's checkpoints make tens of thousands of events)."""
    return sympy.Integer(nbytes)


def fresh_uids(costs: Costs) -> Iterator[int]:
    """Storage uids that no record of `costs` uses."""
    return itertools.count(max(costs.sizes, default=0) + 1)


class _Storages:
    """Reference counts of storages and the events that free them (each storage once)."""

    def __init__(self, events: list, size: dict[int, int], incoming: int | None = None, output: int | None = None):
        self.events = events
        self.size = size
        self.refs: dict[int, int] = {}
        self.dead: set[int] = set()
        self.incoming = incoming  # the gradient the segment receives: freed as ("release_grad", 0)
        self.output = output  # the segment's output, in its backward: its hold let go as ("release_out", 0)

    def hold(self, uid: int | None) -> None:
        if uid is not None:
            self.refs[uid] = self.refs.get(uid, 0) + 1

    def release(self, uid: int | None) -> None:
        if uid is None or uid not in self.refs:
            return
        self.refs[uid] -= 1
        if self.refs[uid] == 0:
            del self.refs[uid]
            self.free(uid)

    def free(self, uid: int) -> None:
        if uid in self.dead:
            return
        self.dead.add(uid)
        if uid == self.incoming:
            self.events.append(("release_grad", 0, 0))
        elif uid == self.output:
            self.events.append(("release_out", 0, 0))
        else:
            self.events.append(("free", uid, _integer(self.size[uid])))


def _storages(nodes: list[NodeCost]) -> dict[tuple[str, int], int | None]:
    """Each element the nodes make -> the storage it is on, None where that is memory
    from outside them (a view of an input)."""
    storage: dict[tuple[str, int], int | None] = {}
    for node in nodes:
        for k, ref in enumerate(node.outputs):
            storage[(node.name, k)] = ref[1] if ref[0] == "new" else storage.get(ref[1:]) if ref[0] == "value" else None
    return storage


def owns_output(costs: Costs, members: tuple[str, ...]) -> bool:
    """Whether the last of `members` makes its output on memory of their own (else a
    checkpoint of them returns a view of its input, or no tensor at all, as a run that
    ends in `x.shape[0]`: no segment; `checkpoint_record` refuses it)."""
    return _storages([costs.by_name[m] for m in members]).get((members[-1], 0)) is not None


def checkpoint_record(costs: Costs, members: tuple[str, ...], kept: frozenset[str] = frozenset(),
                      uids: Iterator[int] | None = None, scratch: int = 0) -> tuple[NodeCost, dict[int, sympy.Expr]]:
    """The record of `members` (graph order, one output: the last member's) run as one
    checkpointed segment, and the sizes of the storages it adds (its rerun's). `kept`
    are the members whose outputs the checkpoint keeps (selective mode) and does not
    rerun; `scratch` bytes live through the rerun (the copies of BatchNorm buffers that
    `passes.recompute` restores after it). Raises ValueError where the output is
    memory from outside the segment."""
    uids = fresh_uids(costs) if uids is None else uids
    nodes = [costs.by_name[m] for m in members]
    inside = set(members)
    size = dict(costs.sizes_at(costs.example_batch))
    added: dict[int, sympy.Expr] = {}
    storage = _storages(nodes)  # element made inside -> its storage (None: outside memory)
    output = (members[-1], 0)
    if storage[output] is None:
        raise ValueError(f"segment ending in {members[-1]!r}: its output is memory from outside the segment")
    last_use: dict[tuple[str, int], int] = {}
    for index, node in enumerate(nodes):
        for element in node.inputs:
            if element[0] in inside:
                last_use[element] = index
    dying_at: dict[int, list[tuple[str, int]]] = {}  # member -> the elements it reads last, in `last_use`'s order
    for element, last in last_use.items():
        dying_at.setdefault(last, []).append(element)
    outside = list(dict.fromkeys(e for node in nodes for e in node.inputs if e[0] not in inside))
    kept_storages = [storage[(m, 0)] for m in members if m in kept and storage.get((m, 0)) is not None]

    def released_after(index: int) -> list[tuple[str, int]]:
        """Elements made inside that die after member `index` (their last use, or at once)."""
        node = nodes[index]
        return dying_at.get(index, []) + [(node.name, k) for k in range(len(node.outputs)) if (node.name, k) not in last_use]

    # forward: every saved tensor let go, the kept outputs and the output stay
    forward: list = []
    live = _Storages(forward, size)
    for uid in kept_storages:
        live.hold(uid)
    live.hold(storage[output])
    for index, node in enumerate(nodes):
        forward.extend(node.fwd_events)
        for k in range(len(node.outputs)):
            live.hold(storage[(node.name, k)])
        for uid in node.internal:
            live.free(uid)
        for element in released_after(index):
            live.release(storage[element])

    # backward: the rerun (fresh storages), then each member's backward in reverse order
    backward: list = []
    remap: dict[int, int] = {}

    def fresh(uid: int) -> int:
        remap[uid] = new = next(uids)
        size[new] = size[uid]
        added[new] = _integer(size[uid])
        return new

    incoming = next(uids)
    size[incoming] = size[storage[output]]
    live = _Storages(backward, size, incoming, storage[output])
    saved_uids = {ref[1] if ref[0] == "new" else storage.get(ref[1:]) for n in nodes for ref in n.saved
                  if ref[0] == "new" or ref[1] in inside} - {None}
    made = [{storage[(n.name, k)] for k in range(len(n.outputs))} | set(n.internal) for n in nodes]
    stop = max((i for i, uids_made in enumerate(made) if uids_made & saved_uids), default=-1)
    rerun: dict[tuple[str, int], int | None] = {}  # element -> its storage in the rerun
    last = nodes[-1]
    for uid in kept_storages:
        live.hold(uid)
    copies = next(uids)
    size[copies] = scratch
    added[copies] = _integer(scratch)
    backward.append(("alloc", copies, added[copies]))
    for index, node in enumerate(nodes[: stop + 1]):
        if node.name in kept:
            for k in range(len(node.outputs)):
                rerun[(node.name, k)] = storage[(node.name, k)]
                live.hold(rerun[(node.name, k)])
        else:
            for kind, uid, _ in node.fwd_events:
                backward.append((kind, fresh(uid) if kind == "alloc" else remap.get(uid, uid), _integer(size[uid])))
            for k, ref in enumerate(node.outputs):
                rerun[(node.name, k)] = remap.get(ref[1]) if ref[0] == "new" else rerun.get(ref[1:]) if ref[0] == "value" else None
                live.hold(rerun[(node.name, k)])
            for uid in node.internal:
                if ("new", uid) in node.saved:
                    live.hold(remap[uid])
                else:
                    live.free(remap[uid])
        for ref in node.saved:
            if ref[0] == "value" and ref[1] in inside:
                live.hold(rerun.get(ref[1:]))
        for element in released_after(index):
            live.release(rerun.get(element))
    for node in nodes[stop + 1:]:  # not rerun, but their backward reads what the rerun made
        for ref in node.saved:
            if ref[0] == "value" and ref[1] in inside:
                live.hold(rerun.get(ref[1:]))
    for element, at in last_use.items():  # the rerun ends: what later members would have read dies
        if at > stop and element in rerun:
            live.release(rerun[element])
    for uid in kept_storages:  # the checkpoint hands its kept outputs to the rerun
        live.release(uid)
    live.free(copies)

    slots: dict[tuple[str, int], int] = {output: incoming}
    live.hold(incoming)
    handed: dict[tuple[str, int], int] = {}  # gradients for the segment's inputs
    flops = sum((n.bwd_flops for n in nodes), sympy.Integer(0))
    # the checkpoint's frame, which holds its inputs, goes with the last tensor saved for
    # its rerun: as the first member that saves one ends its backward (or, a nested
    # checkpoint, as that one lets go of its own inputs)
    first_saver = next((i for i, n in enumerate(nodes) if n.has_backward and n.saved), None)
    for index in reversed(range(len(nodes))):
        node = nodes[index]
        if not node.has_backward:
            continue
        frame_ends = index == first_saver
        flops += node.fwd_flops if node.name not in kept and members.index(node.name) <= stop else 0
        allocated, freed, let_go = [], set(), []
        for kind, uid, _ in node.bwd_events:
            if kind == "release_grad":
                slot = slots.get((node.name, uid))
                if slot is not None and live.refs.get(slot) == 1:
                    live.free(slot)
            elif kind == "release_out":  # a member's hold on its own output (its rerun's copy)
                let_go.append(rerun.get((node.name, uid)))
                live.release(let_go[-1])
            elif kind == "release_in":  # a nested checkpoint's holds on its inputs (the rerun's copies)
                for element in node.held_inputs():
                    if element[0] in inside and rerun.get(element) is not None:
                        let_go.append(rerun[element])
                        live.release(let_go[-1])
                if frame_ends:
                    backward.append(("release_in", 0, 0))
                    frame_ends = False
            elif kind == "alloc":
                allocated.append(fresh(uid))
                backward.append(("alloc", allocated[-1], _integer(size[uid])))
            else:
                freed.add(remap.get(uid, uid))
                live.free(remap.get(uid, uid))
        for uid in allocated:
            if uid not in freed:
                live.hold(uid)
        arriving = []
        for element, ref in node.grad_inputs:
            uid = slots.get((node.name, ref[1])) if ref[0] == "grad_out" else remap.get(ref[1]) if ref[0] == "new" else None
            live.hold(uid)
            arriving.append((element, uid))
        for k in range(len(node.outputs)):
            live.release(slots.pop((node.name, k), None))
        for ref in node.saved:
            uid = remap.get(ref[1]) if ref[0] == "new" else rerun.get(ref[1:]) if ref[1] in inside else None
            if uid is not None and uid in let_go:  # let go already
                let_go.remove(uid)
            else:
                live.release(uid)
        for uid in node.internal:
            live.release(remap.get(uid))
        if frame_ends:
            backward.append(("release_in", 0, 0))
        for element, uid in arriving:
            _accumulate(slots if element[0] in inside else handed, element, uid, live, costs, uids, added)
        for uid in allocated:
            if uid not in freed:
                live.release(uid)
    record = NodeCost(
        name=last.name, op="RecomputeSegment", label=last.label, shapes=last.shapes[:1], nbytes=last.nbytes[:1],
        inputs=tuple(outside), outputs=(("new", storage[output]),), requires_grad=last.requires_grad[:1],
        internal=tuple(u for u in kept_storages if u != storage[output]),
        saved=tuple(("value", *e) for e in outside) + ((("value", *output),) if last.name in kept else ()),
        fwd_events=tuple(forward), fwd_flops=sum((n.fwd_flops for n in nodes), sympy.Integer(0)),
        has_backward=any(n.has_backward for n in nodes), bwd_events=tuple(backward),
        grad_inputs=tuple((e, ("grad_out", 0) if uid == incoming else ("new", uid)) for e, uid in handed.items()),
        bwd_flops=flops, many_ops=True,
        # the members' parameter gradients as the rerun's backward makes them (a parameter
        # that nodes outside read too has its gradient held until theirs: simulate)
        param_grads=tuple(remap[u] for n in nodes for u, _ in zip(n.param_grads, n.param_keys) if u in remap),
        param_keys=tuple(k for n in nodes for u, k in zip(n.param_grads, n.param_keys) if u in remap),
    )
    return record, added


def _accumulate(slots: dict, element: tuple[str, int], uid: int | None, live: _Storages, costs: Costs,
                uids: Iterator[int], added: dict) -> None:
    """Sum gradients that meet at a value as the simulator does: out of place."""
    if uid is None:
        return
    old = slots.get(element)
    if old is None:
        slots[element] = uid
        return
    total = next(uids)
    nbytes = int(costs.by_name[element[0]].nbytes[element[1]])
    live.size[total] = nbytes
    added[total] = _integer(nbytes)
    live.events.append(("alloc", total, _integer(nbytes)))
    live.hold(total)
    slots[element] = total
    live.release(old)
    live.release(uid)


def nest(costs: Costs, spans: list[tuple[str, ...]], uids: Iterator[int] | None = None,
         scratch: dict[tuple[str, ...], int] | None = None) -> Costs:
    """`costs` with each span (the node names it covers, in graph order; spans nested
    or disjoint) run as one checkpointed segment around what it covers, innermost
    first: its members are the records of `costs` left under its names (a segment
    already composed there counts as one member, by its output's name). `scratch`
    gives a span's BatchNorm buffer bytes (see `checkpoint_record`)."""
    uids = fresh_uids(costs) if uids is None else uids
    nodes, sizes = list(costs.nodes), dict(costs.sizes)
    numeric = dict(costs.sizes_at(costs.example_batch))
    for covered in sorted(spans, key=len):
        names = set(covered)
        current = Costs(nodes=nodes, outputs=costs.outputs, sizes=sizes, example_batch=costs.example_batch,
                        input_shapes=costs.input_shapes, batch_symbolic=False)
        current.prime_sizes(costs.example_batch, numeric)
        members = tuple(n.name for n in nodes if n.name in names)
        record, added = checkpoint_record(current, members, uids=uids, scratch=(scratch or {}).get(covered, 0))
        sizes.update(added)
        numeric.update({uid: int(b) for uid, b in added.items()})
        alias = aliases(value_storages(current), members, (record.name,), current.by_name)
        nodes = [record if n.name == record.name else redirected(n, alias) for n in nodes
                 if n.name not in names or n.name == record.name]
    nested = Costs(nodes=nodes, outputs=costs.outputs, sizes=sizes, example_batch=costs.example_batch,
                   input_shapes=costs.input_shapes, opaque=costs.opaque, batch_symbolic=costs.batch_symbolic)
    nested.prime_sizes(costs.example_batch, numeric)
    return nested
