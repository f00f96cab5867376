"""Predict the peak activation memory of one training step from per-node costs.

A pure function of `Costs` and a batch size. It replays the step the way eager
PyTorch runs it: forward in graph order, each value freed after its last use unless
autograd saved it or the caller holds it (the outputs); then the loss; then backward
in reverse order (the CPU autograd engine's order), where each node's gradient
outputs and saved tensors are released after its backward, parameter gradients are
added into `.grad` in place and freed, and gradients that meet at a value are summed
into a fresh tensor, as autograd does under the CPU measurement mode.
Storages are reference-counted, so views, in-place ops and tensors saved by two
consumers count once.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from rewriter.cost_models.node_costs import BATCH, Costs
from rewriter.cost_models.saved import value_storages

__all__ = ["Simulation", "simulate", "window_peak"]


@dataclass(frozen=True)
class Simulation:
    """The predicted peak, where it happens, live bytes after every step, and the
    lifetime of every storage a node allocated: node -> (step it was made, step it
    was freed), as indexes into `timeline`; a storage alive at the end of the step
    (the outputs the caller holds) ends at len(timeline). `highs`: the highest live
    bytes during each step of `timeline`."""

    peak_bytes: int
    peak_at: str
    timeline: tuple[tuple[str, int], ...]
    batch: int
    lifetimes: dict[str, list[tuple[int, int]]]
    highs: tuple[int, ...] = ()

    def lifetime(self, node: str) -> list[tuple[str, str]]:
        """The lifetimes of `node`'s storages as step labels."""
        label = [step for step, _ in self.timeline] + ["end of step"]
        return [(label[start], label[end]) for start, end in self.lifetimes.get(node, [])]


def window_peak(events, size: dict[int, int], released=lambda index: 0, let_go=lambda index: 0,
                let_in=lambda: 0) -> tuple[int, int]:
    """(highest, final) bytes above the start over one node's events; `released(k)` says
    how many bytes dropping the gradient of output k frees, `let_go(k)` how many the
    node's letting go of output k frees, `let_in()` how many its letting go of its
    inputs frees."""
    current = highest = 0
    for kind, uid, _ in events:
        if kind == "release_grad":
            current -= released(uid)
        elif kind == "release_out":
            current -= let_go(uid)
        elif kind == "release_in":
            current -= let_in()
        else:
            current += size[uid] if kind == "alloc" else -size[uid]
        highest = max(highest, current)
    return highest, current


class _Replay:
    def __init__(self, costs: Costs, batch: int):
        self.costs = costs
        self.batch = batch
        self.size = dict(costs.sizes_at(batch))
        self.refs: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.peak_at = "start"
        self.timeline: list[tuple[str, int]] = []
        self.highest: list[int] = []  # per step: the highest live bytes checked during it
        self.storage = value_storages(costs)
        self.fresh = -1
        self.born: dict[int, tuple[str, int]] = {}  # uid -> (owner node, step)
        self.lifetimes: dict[str, list[tuple[int, int]]] = {}
        self._value_bytes: dict[tuple[str, int], int] = {}

    def check(self, candidate: int, where: str) -> None:
        if candidate > self.peak:
            self.peak, self.peak_at = candidate, where
        step = len(self.timeline)
        while len(self.highest) <= step:
            self.highest.append(0)
        if candidate > self.highest[step]:
            self.highest[step] = candidate

    def step_highs(self) -> list[int]:
        """The highest live bytes during each step so far (at least what is live after it)."""
        return [max(live, self.highest[k] if k < len(self.highest) else 0) for k, (_, live) in enumerate(self.timeline)]

    def window(self, events, where: str, slot=None, own=None, inputs=lambda: ()) -> None:
        """`check` the highest point of one node's events; `slot(k)` is the storage of
        the gradient of its output k (released by a "release_grad" event where nothing
        else holds it), `own(k)` the storage of its output k (let go by a "release_out"),
        `inputs()` the storages of the inputs it holds (let go by a "release_in")."""
        released = (lambda k: 0) if slot is None else (lambda k: self.releasable(slot(k)))
        let_go = (lambda k: 0) if own is None else (lambda k: self.releasable(own(k)))
        highest, _ = window_peak(events, self.size, released, let_go, lambda: sum(map(self.size.get, self.freed_by(inputs()))))
        self.check(self.live + highest, where)

    def releasable(self, uid: int | None) -> int:
        """The bytes dropping one hold of `uid` frees: its size if that is the last hold."""
        return self.size[uid] if uid is not None and self.refs.get(uid) == 1 else 0

    def freed_by(self, holds) -> list[int]:
        """The storages that dropping `holds` (one hold each, a storage may repeat) frees."""
        counts = collections.Counter(uid for uid in holds if uid is not None)
        return [uid for uid, count in counts.items() if self.refs.get(uid) == count]

    def hold(self, uid: int | None, owner: str | None = None) -> None:
        if uid is not None:
            if uid not in self.refs and owner is not None:
                self.born[uid] = (owner, len(self.timeline))
            self.refs[uid] = self.refs.get(uid, 0) + 1

    def release(self, uid: int | None) -> None:
        if uid is None or uid not in self.refs:
            return
        self.refs[uid] -= 1
        if self.refs[uid] == 0:
            del self.refs[uid]
            self.live -= self.size[uid]
            self._died(uid, len(self.timeline))

    def _died(self, uid: int, step: int) -> None:
        if uid in self.born:
            owner, start = self.born.pop(uid)
            self.lifetimes.setdefault(owner, []).append((start, step))

    def resolve(self, ref) -> int | None:
        if ref[0] == "new":
            return ref[1]
        if ref[0] == "value":
            return self.storage.get((ref[1], ref[2]))  # absent: an input of the step
        return None

    # ---- forward ---------------------------------------------------------------------------
    def forward(self) -> None:
        nodes = self.costs.nodes
        last_use: dict[tuple[str, int], int] = {}
        position = {node.name: index for index, node in enumerate(nodes)}
        for index, node in enumerate(nodes):
            for element in node.inputs:
                last_use[element] = index
        for name, until in self.costs.held_until.items():
            producer = self.costs.by_name.get(name)
            if producer is None or until not in position:
                continue
            for k in range(len(producer.outputs)):
                last_use[(name, k)] = max(last_use.get((name, k), -1), position[until])
        release_at: dict[int, list[tuple[str, int]]] = {}
        for element, index in last_use.items():
            release_at.setdefault(index, []).append(element)
        for index, node in enumerate(nodes):
            self.window(node.fwd_events, f"forward {node.label}")
            for k, ref in enumerate(node.outputs):
                uid = self.storage[(node.name, k)]
                if ref[0] == "new":
                    self.live += self.size[uid]
                self.hold(uid, node.name)
            for uid in node.internal:
                self.live += self.size[uid]
                self.hold(uid, node.name)
            for ref in node.saved:
                if ref[0] == "value":
                    self.hold(self.resolve(ref))
            if node.name == "loss":
                for element in self.costs.outputs:  # the caller holds the outputs until backward ends
                    self.hold(self.storage.get(element))
            for element in release_at.get(index, ()):
                self.release(self.storage.get(element))
            for k in range(len(node.outputs)):
                if (node.name, k) not in last_use and node.name != "loss" and (node.name, k) not in self.costs.outputs:
                    self.release(self.storage[(node.name, k)])
            self.timeline.append((f"forward {node.label}", self.live))

    # ---- backward --------------------------------------------------------------------------
    def backward(self) -> None:
        slots: dict[tuple[str, int], int] = {}  # value element -> storage of its gradient
        # a parameter several nodes read gets its gradient from each: autograd holds the
        # first in AccumulateGrad's buffer, sums each next into it (out of place, as for
        # values), and adds the sum into `.grad` after the last (in backward order)
        producers = collections.Counter(key for node in self.costs.nodes if node.has_backward for key in node.param_keys)
        pending: dict[str, int] = {}  # parameter -> the storage of its gradient so far
        for node in reversed(self.costs.nodes):
            if not node.has_backward:
                continue
            events = self.summed_inside(node, slots) if node.many_ops else node.bwd_events
            events, inside, after = self.shared_parameters(node, events, producers, pending)
            self.window(events, f"backward {node.label}", lambda k, name=node.name: slots.get((name, k)),
                        lambda k, name=node.name: self.storage.get((name, k)),
                        lambda node=node: [self.storage.get(e) for e in node.held_inputs()])
            allocated = [uid for kind, uid, _ in node.bwd_events if kind == "alloc"]
            freed = {uid for kind, uid, _ in node.bwd_events if kind == "free"}
            for uid in allocated:
                if uid not in freed:
                    self.live += self.size[uid]
                    self.hold(uid)
            for uid in freed & set(node.internal):  # saved internals, freed inside its backward
                self.refs[uid] = 1
                self.release(uid)
            incoming = []
            for element, ref in node.grad_inputs:
                uid = slots.get((node.name, ref[1])) if ref[0] == "grad_out" else self.resolve(ref)
                self.hold(uid)
                incoming.append((element, uid))
            if node.name == "loss" and allocated:  # backward() holds the initial gradient (the first
                first = allocated[0]  # allocation: ones like the loss) until it returns, nothing else
                if first in freed:  # the profile's own grad call let it go as the loss's backward ended
                    self.live += self.size[first]
                self.hold(first)
            for k in range(len(node.outputs)):
                self.release(slots.pop((node.name, k), None))
            for ref in node.saved:  # (its hold on an output let go inside: here, as the window counted it)
                self.release(self.resolve(ref))
            for uid in node.internal:
                self.release(uid)
            for uid, kept in inside:  # a parameter's gradient summed inside the node: what it holds now
                if kept is not None:
                    self.live += self.size[kept]
                    self.hold(kept)
            for element, uid in incoming:  # the engine sums each input gradient into its buffer
                self.accumulate(slots, element, uid, node.label)  # while all the node's results live
            for key, uid in after:  # a parameter's gradient made as the node ends, summed with the others
                self.buffer(pending, key, uid, producers[key] > 0, node.label)
            for uid in allocated:  # drop the allocation's own hold: what a slot holds stays,
                if uid not in freed:  # parameter gradients and temporaries die here
                    self.release(uid)
            for uid, _ in inside:
                self.release(uid)
            self.timeline.append((f"backward {node.label}", self.live))

    def shared_parameters(self, node, events, producers: collections.Counter, pending: dict[str, int]):
        """The node's events with the gradients of parameters that other nodes read too
        held or summed as autograd does (see `backward`); and what to do after its
        window: `inside`, (earlier sum let go or None, the storage now held for the
        parameter or None) for each summed inside it; `after`, (parameter, storage) for
        each made as it ends. `producers` counts down the nodes still to make each
        parameter's."""
        inside, after, freed = [], [], None
        for uid, key in zip(node.param_grads, node.param_keys):
            producers[key] -= 1
            last = producers[key] == 0
            if last and key not in pending:
                continue  # read by this node alone: into `.grad` as it comes
            if freed is None:
                freed = {u for kind, u, _ in events if kind == "free"}
            if uid not in freed:  # held to the node's end (a single op's): summed there
                after.append((key, uid))
                continue
            # a node of many ops: `.grad` took it inside; the buffer does
            earlier = pending.pop(key, None)
            at = next(i for i, e in enumerate(events) if e[0] == "alloc" and e[1] == uid) + 1
            total, added = uid, []
            if earlier is not None:
                total = self.new_sum(self.size[uid], key)
                added = [("alloc", total, 0), ("free", uid, 0), ("free", earlier, 0)]
            if last:  # the sum goes into `.grad` where the node's own gradient went
                rest = [("free", total, 0) if e[:2] == ("free", uid) else e for e in events[at:]]
                inside.append((earlier, None))
            else:
                rest = [e for e in events[at:] if e[:2] != ("free", uid)]
                pending[key] = total
                inside.append((earlier, total))
            events = list(events[:at]) + added + rest
            freed = {u for kind, u, _ in events if kind == "free"}
        return events, inside, after

    def buffer(self, pending: dict[str, int], key: str, uid: int, more: bool, where: str) -> None:
        """Parameter `key`'s gradient `uid`, made as a node ends, into its buffer: summed
        out of place with the one held (a fresh tensor, both let go); held there while
        `more` nodes are still to make theirs, else (added into `.grad`) let go."""
        earlier = pending.pop(key, None)
        if earlier is None:  # the first: kept past the node's end
            self.hold(uid)
            pending[key] = uid
            return
        total = self.new_sum(self.size[uid], key)
        self.live += self.size[total]
        self.hold(total)
        self.check(self.live, f"backward {where}")
        self.release(earlier)  # (the node's own is let go with its other results)
        if more:
            pending[key] = total
        else:
            self.release(total)

    def new_sum(self, nbytes: int, key: str) -> int:
        """A fresh storage of `nbytes` for the summed gradient of parameter `key`."""
        self.fresh -= 1
        self.size[self.fresh] = nbytes
        self.param_summed(self.fresh, key)
        return self.fresh

    def summed_inside(self, node, slots) -> list:
        """The backward events of a node of several ops, with each gradient it hands on
        for a value that already has one summed where the engine sums it: after the op
        that makes it has let go of its saved tensors, before its other results (a
        weight's gradient) are used, and before the next op allocates; not when the
        whole node ends, when its other ops' memory is gone. The sum's storage stands in
        under a fresh uid; `accumulate` makes the sum for good."""
        at: dict[int, list] = {}  # event index -> the sums made before it
        events = node.bwd_events
        allocated_at: dict[int, int] | None = None  # storage -> the index of its allocation
        for element, ref in node.grad_inputs:
            old = slots.get(element)
            if ref[0] != "new" or old is None:
                continue
            if allocated_at is None:
                allocated_at = {}
                for i, event in enumerate(events):
                    if event[0] == "alloc":
                        allocated_at.setdefault(event[1], i)
            index = allocated_at.get(ref[1])
            if index is None:
                continue
            while index > 0 and events[index - 1][0] == "alloc":
                index -= 1
            born = set()  # what the op allocated: its other results (a weight's gradient) die after the sum
            while index < len(events) and events[index][0] == "alloc":
                born.add(events[index][1])
                index += 1
            while index < len(events) and events[index][0] != "alloc" and (events[index][0] != "free" or events[index][1] not in born):
                index += 1
            if index == len(events):  # the node's last op: summed as it ends, as `accumulate` does
                continue
            self.fresh -= 1
            self.summed(self.fresh, element)
            self.size[self.fresh] = self.value_bytes(element)
            at.setdefault(index, []).extend([("alloc", self.fresh, 0), ("free", ref[1], 0)]
                                             + ([("free", old, 0)] if self.refs.get(old) == 1 else []))
        if not at:
            return events
        return [e for i, event in enumerate(events) for e in at.get(i, []) + [event]]

    def value_bytes(self, element: tuple[str, int]) -> int:
        """The bytes of a value's gradient (the value's own size), worked out once a replay."""
        found = self._value_bytes.get(element)
        if found is None:
            producer = self.costs.by_name[element[0]]
            found = self._value_bytes[element] = int(math.ceil(producer.nbytes[element[1]].xreplace({BATCH: self.batch})))
        return found

    def summed(self, uid: int, element: tuple[str, int]) -> None:
        """`accumulate` made storage `uid` for the summed gradient of `element`."""

    def param_summed(self, uid: int, key: str) -> None:
        """Storage `uid` is the summed gradient of parameter `key` (`shared_parameters`)."""

    def accumulate(self, slots, element, uid, where: str) -> None:
        """Sum gradients that meet at a value. Under the CPU measurement mode autograd
        sums them out of place (the mode's Python references fail its last-reference
        test for adding in place): a fresh tensor of the value's size, both sides freed.
        Where sums happen in place (CUDA, no mode), this errs high by one gradient."""
        if uid is None:
            return
        old = slots.get(element)
        if old is None:
            slots[element] = uid
            return
        self.fresh -= 1
        self.summed(self.fresh, element)
        self.size[self.fresh] = self.value_bytes(element)
        self.live += self.size[self.fresh]
        self.hold(self.fresh)
        self.check(self.live, f"backward {where}")
        slots[element] = self.fresh
        self.release(old)
        self.release(uid)


def simulate(costs: Costs, batch: int | None = None) -> Simulation:
    """The predicted peak of one training step at `batch` (default: the traced batch)."""
    batch = costs.example_batch if batch is None else batch
    if batch != costs.example_batch and not costs.batch_symbolic:
        raise ValueError(
            f"batch={batch}: these costs hold at batch {costs.example_batch} only (one static trace, or "
            f"allocations that change with the batch in a way two traces cannot fit): profile with "
            f"over_batch=True, or at batch {batch}"
        )
    replay = _Replay(costs, batch)
    replay.forward()
    replay.backward()
    for uid in list(replay.born):
        replay._died(uid, len(replay.timeline))
    return Simulation(replay.peak, replay.peak_at, tuple(replay.timeline), batch, replay.lifetimes,
                      tuple(replay.step_highs()))
