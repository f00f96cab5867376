"""Nodes that repeat: a node whose op, module settings and inputs' layouts match a node
profiled before takes that node's record, with fresh storage ids, without running on
fake tensors; its backward too, once a node of the same kind has run backward with
incoming gradients of the same layouts. A chain of identical blocks is profiled in
about the time of one block.

Only nodes whose record names nothing but their own storages, their inputs and
their outputs qualify: calls of torch.nn's own modules (no hooks), of invert chains
(passes.invert: a chain's kind is its units, the settings of the modules they run and
the structure of their code, not the modules' paths), of checkpointed segments
(passes.recompute: a segment's kind is the segment itself, so its record serves other
profiles of the same rewritten graph, `Records`), of torch's and Python's operator
functions and of compressed ops (passes.compressed_ops), and tensor methods, that
write no input in place, read no parameter through `get_attr` (a module handed to a
compressed op counts by its settings), and return new tensors (no views). A node that
repeats one whose backward is not on record yet runs its forward again when its
backward comes (its storages matched to the recorded ones in order), then backward as
any node does. Profiles that share a `Records` take each other's records.

`RepeatedNodes` is a mixin of the profiler (`cost_models/profile.py`): it reads the
profiler's `gm`, `opaque`, `values`, `elements`, `owner`, `grads`, `tracker`, `mode`
(its fake tensor mode), `count_flops`, `_leaves`, `_isolate`, `_element_map`, `_run`,
`_set_value`, `_accumulate`, `_fake_state`, `_modules_run`, `_param_names_of` and
`_frame_hooks`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
from torch import fx

from rewriter.cost_models.fake_kernels import empty_fake
from rewriter.cost_models.in_place import mutates_an_input
from rewriter.cost_models.node_costs import NodeCost
from rewriter.cost_models.storage_tracker import storage_key, tensors_in
from rewriter.passes import compressed_ops

__all__ = ["Records", "RepeatedNodes"]

# torch's and Python's operator functions, and the compressed forms of ops (pure
# functions of their arguments and the settings of the modules they are handed)
_FUNCTION_MODULES = frozenset({"torch", "torch.nn.functional", "torch._C._nn", "torch.functional", "_operator",
                               compressed_ops.__name__})
_SETTINGS = (int, float, bool, str, tuple, type(None))


@dataclasses.dataclass(frozen=True)
class _Forward:
    """A forward record with storages numbered in order of allocation (0, 1, ...) and
    saved inputs by position in the node's input elements."""

    shapes: tuple
    nbytes: tuple
    requires_grad: tuple
    fwd_flops: Any
    events: tuple  # (kind, storage number, bytes)
    outputs: tuple  # (storage number, shape, stride, dtype, device, requires_grad) per output element
    as_list: bool | None  # None: one tensor; else a list (True) or a tuple (False) of them
    internal: tuple
    saved: tuple  # ("new", storage number), ("input", position) or ("output", index): its own output
    allocations: int
    many_ops: bool = False  # an invert chain, a checkpointed segment
    flops_counted: bool = True  # made by a profile that counts FLOPs (else `fwd_flops` is 0)


@dataclasses.dataclass(frozen=True)
class _Backward:
    """A backward record: events on ("f", forward storage number) or ("b", backward
    storage number), or ("k", output index) for an incoming gradient let go; input
    gradients by input position, as a view of an incoming gradient or a new storage;
    parameter gradients by position in the node's parameters."""

    events: tuple
    grads: tuple  # (input position, ("grad_out", k) or ("b", number), (shape, stride, offset, dtype, device))
    params: tuple  # (backward storage number, parameter position)
    allocations: int


class _Input:
    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"<input {self.index}>"


def _extent(t: torch.Tensor) -> int:
    """The bytes a tensor of this shape and stride takes from offset 0."""
    if t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def _is_whole(t: torch.Tensor) -> bool:
    """A tensor that `torch.empty_strided` makes as it is: no view, a storage of its own extent."""
    return not t._is_view() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == _extent(t)


def _layout(t: torch.Tensor, aliases: dict[int, int]) -> tuple:
    alias = aliases.setdefault(storage_key(t), len(aliases))
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device, t.requires_grad, t._is_view(),
            t.untyped_storage().nbytes(), alias)


def _arguments(node: fx.Node, index: dict[fx.Node, int]) -> str:
    """A node's arguments, each node among them by its position in `index`."""
    return repr(fx.node.map_arg((node.args, node.kwargs), lambda n: _Input(index[n])))


def _module_key(module: torch.nn.Module) -> tuple | None:
    if not type(module).__module__.startswith("torch.nn.modules."):
        return None
    if any(getattr(module, hooks, None) for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                      "_backward_pre_hooks", "_state_dict_hooks")):
        return None
    settings = tuple(sorted((k, v) for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, _SETTINGS)))
    if module._modules:  # (a leaf's own tables give the same items, without named_*'s recursion)
        items = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    else:
        items = [(k, t) for table in (module._parameters, module._buffers) for k, t in table.items() if t is not None]
    state = tuple((name, tuple(t.shape), t.stride(), t.dtype, t.requires_grad) for name, t in items)
    return ("module", type(module), repr(module), settings, state)


class Records:
    """The records of node kinds that profiles taking this object share: a planner's
    profiles of one graph and its rewrites (cost_models.profile's `records`) meet the
    same kinds again, and the profile of a plan with its chains fallen back meets every
    node of the plan's own profile, its checkpointed segments included, but the chains.
    A kind says everything its record depends on; a record made where FLOPs were not
    counted serves only profiles that do not count them."""

    def __init__(self):
        self.forwards: dict[tuple, _Forward | None] = {}  # None: a kind whose record cannot be repeated
        self.backwards: dict[tuple, _Backward | None] = {}


class RepeatedNodes:
    def _init_repeats(self, enabled: bool, records: Records | None = None) -> None:
        self.repeats = enabled
        records = Records() if records is None else records
        self._forwards = records.forwards
        self._backwards = records.backwards
        self._repeat_key: dict[str, tuple] = {}  # node -> its kind, for nodes of a kind with a forward record
        self._replayed: set[str] = set()  # nodes whose forward was not run
        self._module_keys: dict[int, tuple | None] = {}
        self._rerun_outputs: list = []

    # ---- what makes two nodes the same -----------------------------------------------------
    def _kind(self, node: fx.Node) -> tuple | None:
        """What a node's record depends on: its op and settings, and its inputs' layouts;
        None for a node that never repeats a record."""
        if not self.repeats:
            return None
        if node.op == "call_module":
            if node.target in self.opaque:
                return None
            module = self.gm.get_submodule(node.target)
            what = self._module_kind(module) or self._chain_kind(module) or self._span_kind(module)
        elif node.op == "call_function":
            module = getattr(node.target, "__module__", None)
            what = ("function", node.target) if module in _FUNCTION_MODULES and node.target is not torch._assert else None
        elif node.op == "call_method":
            what = ("method", node.target)
        else:
            return None
        if what is None or mutates_an_input(self.gm, node):
            return None
        inputs = node.all_input_nodes
        aliases: dict[int, int] = {}
        layouts = []
        for n in inputs:
            value = self.values[n.name]
            if n.op == "get_attr":  # a module handed to a compressed op, by its settings; not a parameter
                settings = self._module_kind(value) if isinstance(value, torch.nn.Module) else None
                if settings is None:
                    return None
                layouts.append(settings)
            elif isinstance(value, torch.Tensor):
                if value.layout != torch.strided:
                    return None
                layouts.append(_layout(value, aliases))
            elif isinstance(value, (int, float, bool, str, type(None))):
                layouts.append((type(value), value))
            else:
                return None
        return what, _arguments(node, {n: i for i, n in enumerate(inputs)}), tuple(layouts)

    def _module_kind(self, module: torch.nn.Module) -> tuple | None:
        if id(module) not in self._module_keys:
            self._module_keys[id(module)] = _module_key(module)
        return self._module_keys[id(module)]

    def _chain_kind(self, chain: torch.nn.Module) -> tuple | None:
        """An invert chain's kind: its steps' units, modules and code, and whether chains
        run as fallen back (passes.invert); None for any other module."""
        from rewriter.passes import invert

        if type(chain) is not invert.InvertChain:
            return None
        try:
            steps = tuple(self._step_kind(step) for step in chain.steps)
        except _Unrepeatable:
            return None
        return ("invert chain", invert._FALLBACK[0], steps)

    def _span_kind(self, segment: torch.nn.Module) -> tuple | None:
        """A checkpointed segment's kind (passes.recompute): the segment itself (its code
        repeats nowhere else in a graph; a record of it serves the profiles of the same
        rewritten graph), and whether chains run as fallen back where it runs any; None
        for any other module."""
        from rewriter.passes import invert

        if not hasattr(segment, "checkpointed_code"):
            return None
        chains = any(isinstance(m, invert.InvertChain) for code in segment.codes() if isinstance(code, torch.nn.Module)
                     for m in code.modules())
        return ("checkpointed segment", segment, invert._FALLBACK[0] if chains else None)

    def _step_kind(self, step) -> tuple:
        module = None if step.module is None else self._module_kind(step.module)
        if step.module is not None and module is None:
            raise _Unrepeatable
        return (step.unit.kind, repr(step.unit.arg), step.inplace, step.inverse_dims, step.moves, module,
                *(self._code_kind(code) for code in (step.code, step.f, step.g)),
                tuple(tuple(self._step_kind(s) for s in branch) for branch in step.branches))

    def _code_kind(self, code) -> tuple | None:
        """A unit's code (a GraphModule over the model's modules) by what it runs, not
        by the paths of the modules it calls."""
        if code is None:
            return None
        if not isinstance(code, fx.GraphModule):
            raise _Unrepeatable
        index = {n: i for i, n in enumerate(code.graph.nodes)}
        found = []
        for node in code.graph.nodes:
            target = None if node.op == "placeholder" else node.target  # (a placeholder is named for what it reads)
            if node.op in ("call_module", "get_attr"):
                attr = code.get_submodule(target) if node.op == "call_module" else fx.graph_module._get_attr(code, target)
                if isinstance(attr, torch.nn.Module):
                    target = self._module_kind(attr)
                elif isinstance(attr, torch.Tensor):
                    target = (tuple(attr.shape), attr.stride(), attr.dtype, attr.requires_grad)
                else:
                    target = None
                if target is None:
                    raise _Unrepeatable
            found.append((node.op, target, _arguments(node, index)))
        return tuple(found)

    def _module_of(self, node: fx.Node) -> torch.nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def _input_owners(self, inputs: tuple) -> list[tuple]:
        return [self.owner.get(storage_key(self.elements[n][k]), (n, k)) for n, k in inputs]

    # ---- forward -----------------------------------------------------------------------------
    def _repeated_forward(self, node: fx.Node, kind: tuple | None, op: str, label: str) -> NodeCost | None:
        """The record of `node` taken from an earlier node of its kind, its outputs made
        as fake tensors of the recorded layouts; None where there is none to take."""
        record = self._forwards.get(kind) if kind is not None else None
        if record is None or self.count_flops and not record.flops_counted:
            return None
        first = self.tracker.reserve(record.allocations)
        made = []
        for number, shape, stride, dtype, device, requires_grad in record.outputs:
            t = empty_fake(self.mode, shape, stride, dtype, device)
            made.append(t.requires_grad_(True) if requires_grad else t)
        out = made[0] if record.as_list is None else (made if record.as_list else tuple(made))
        for k, t in enumerate(made):
            self.owner.setdefault(storage_key(t), (node.name, k))
        self._set_value(node.name, out)
        inputs = tuple((n.name, k) for n in node.all_input_nodes for k in range(len(self.elements.get(n.name, []))))
        owners = self._input_owners(inputs)
        self._repeat_key[node.name] = kind
        self._replayed.add(node.name)
        return NodeCost(
            name=node.name, op=op, label=label, shapes=record.shapes, nbytes=record.nbytes, inputs=inputs,
            outputs=tuple(("new", first + o[0]) for o in record.outputs), requires_grad=record.requires_grad,
            internal=tuple(first + n for n in record.internal),
            saved=tuple(("new", first + i) if what == "new" else ("value", node.name, i) if what == "output"
                        else ("value", *owners[i]) for what, i in record.saved),
            fwd_events=tuple((kind_, first + n, b) for kind_, n, b in record.events),
            fwd_flops=record.fwd_flops if self.count_flops else sympy.Integer(0), many_ops=record.many_ops,
        )

    def _remember_forward(self, kind: tuple | None, cost: NodeCost, out: Any) -> None:
        """Keep `cost` (just profiled) as the record of its kind, where it can be repeated."""
        if kind is None or kind in self._forwards and (self._forwards[kind] is None or self._forwards[kind].flops_counted
                                                       or not self.count_flops):
            return
        self._forwards[kind] = record = self._forward_record(cost, out)
        if record is not None:
            self._repeat_key[cost.name] = kind

    def _forward_record(self, cost: NodeCost, out: Any) -> _Forward | None:
        tensors = tensors_in(out)
        if isinstance(out, torch.Tensor):
            as_list = None
        elif type(out) in (list, tuple) and tensors and len(tensors) == len(out):
            as_list = type(out) is list
        else:
            return None
        numbers = {uid: i for i, uid in enumerate(uid for kind, uid, _ in cost.fwd_events if kind == "alloc")}
        if any(kind not in ("alloc", "free") or uid not in numbers for kind, uid, _ in cost.fwd_events):
            return None
        outputs = []
        for ref, t in zip(cost.outputs, tensors):
            if ref[0] != "new" or ref[1] not in numbers or not _is_whole(t):
                return None
            outputs.append((numbers[ref[1]], tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad))
        if len({o[0] for o in outputs}) != len(outputs) or any(uid not in numbers for uid in cost.internal):
            return None
        owners = self._input_owners(cost.inputs)
        saved = []
        for ref in cost.saved:
            if ref[0] == "new" and ref[1] in numbers:
                saved.append(("new", numbers[ref[1]]))
            elif ref[0] == "value" and ref[1] == cost.name:
                saved.append(("output", ref[2]))
            elif ref[0] == "value" and tuple(ref[1:]) in owners:
                saved.append(("input", owners.index(tuple(ref[1:]))))
            else:
                return None
        return _Forward(
            shapes=cost.shapes, nbytes=cost.nbytes, requires_grad=cost.requires_grad, fwd_flops=cost.fwd_flops,
            events=tuple((kind, numbers[uid], b) for kind, uid, b in cost.fwd_events), outputs=tuple(outputs),
            as_list=as_list, internal=tuple(numbers[uid] for uid in cost.internal), saved=tuple(saved),
            allocations=len(numbers), many_ops=cost.many_ops, flops_counted=self.count_flops,
        )

    # ---- backward ----------------------------------------------------------------------------
    def _backward_kind(self, name: str, indices: list[int], grad_outs: list) -> tuple | None:
        """A node's kind and its incoming gradients' layouts; None if it has no kind."""
        kind = self._repeat_key.get(name)
        if kind is None or any(g is None for g in grad_outs):
            return None
        aliases: dict[int, int] = {}
        return kind, tuple((k, *_layout(g, aliases)) for k, g in zip(indices, grad_outs))

    def _repeated_backward(self, cost: NodeCost, kind: tuple | None, grad_outs: dict[int, torch.Tensor]) -> bool:
        """Give `cost` the backward record of its kind, if there is one (False if not)."""
        record = self._backwards.get(kind) if kind is not None else None
        if record is None:
            return False
        first = self.tracker.reserve(record.allocations)
        forward = [uid for kind_, uid, _ in cost.fwd_events if kind_ == "alloc"]

        def uid(ref):
            return forward[ref[1]] if ref[0] == "f" else first + ref[1] if ref[0] == "b" else ref[1]

        grad_inputs = []
        for position, ref, (shape, stride, offset, dtype, device) in record.grads:
            element = cost.inputs[position]
            if ref[0] == "grad_out" and not cost.many_ops:  # the incoming gradient, or a view of it
                incoming = grad_outs[ref[1]]
                same = tuple(incoming.shape) == shape and incoming.stride() == stride and incoming.storage_offset() == offset
                g = incoming if same else incoming.as_strided(shape, stride, offset)
            else:  # a new storage, or a many-op node's stand-in of the incoming gradient (a storage of its own)
                g = empty_fake(self.mode, shape, stride, dtype, device)
            grad_inputs.append((element, ref if ref[0] == "grad_out" else ("new", first + ref[1])))
            self._accumulate(element, g)
        names = self._param_names_of(cost.name)
        cost.has_backward = True
        cost.bwd_events = tuple((kind_, uid(ref), b) for kind_, ref, b in record.events)
        cost.grad_inputs = tuple(grad_inputs)
        cost.param_grads = tuple(first + number for number, _ in record.params)
        cost.param_keys = tuple(names[position] for _, position in record.params)
        return True

    def _rerun_forward(self, cost: NodeCost, node: fx.Node) -> tuple[list[torch.Tensor], dict[int, int]]:
        """Run a node whose forward was repeated, for its backward: its output elements,
        and the tracker's ids of the storages it made -> the recorded ones. Its leaves
        replace `_leaves[name]`."""
        self._fake_state(self._modules_run(node))
        args = fx.node.map_arg(node.args, lambda n: self.values[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.values[n.name])
        (args, kwargs), leaves = self._isolate((args, kwargs), self._element_map([n.name for n in node.all_input_nodes]))
        self.tracker.poll()
        start = len(self.tracker.events)
        # a checkpoint's inputs, saved with its frame's hooks, let go where its backward says
        hooks = self._frame_hooks(node.name, []) if hasattr(self._module_of(node), "checkpointed_code") else (_same, _same)
        with self.tracker:
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                out = self._run(node, args, kwargs)
            self.tracker.poll()
        window = self.tracker.events[start:]
        del self.tracker.events[start:]  # a rerun for the profile's sake: no event of the step
        made = {uid for kind, uid, _ in window if kind == "alloc"}
        ran = [(kind, uid, b) for kind, uid, b in window if kind == "alloc" or uid in made]
        if [(k, b) for k, _, b in ran] != [(k, b) for k, _, b in cost.fwd_events]:
            raise AssertionError(f"node {cost.name!r} ran otherwise than the node whose record it repeats")
        self._leaves[cost.name] = leaves
        rerun_uids = [uid for kind, uid, _ in ran if kind == "alloc"]
        recorded = [uid for kind, uid, _ in cost.fwd_events if kind == "alloc"]
        self._rerun_outputs.append(out)  # held, as a profiled node's outputs are, to the profile's end
        return tensors_in(out), dict(zip(rerun_uids, recorded))

    def _remember_backward(self, kind: tuple | None, cost: NodeCost, given: list[tuple[tuple, Any, torch.Tensor]]) -> None:
        """Keep `cost`'s backward (just profiled; `given`: each input element, the ref
        and the tensor of its gradient) as the record of its kind, where it can be repeated."""
        if kind is None or kind in self._backwards:
            return
        self._backwards[kind] = self._backward_record(cost, given)

    def _backward_record(self, cost: NodeCost, given: list) -> _Backward | None:
        forward = {uid: i for i, uid in enumerate(uid for kind, uid, _ in cost.fwd_events if kind == "alloc")}
        backward = {uid: i for i, uid in enumerate(uid for kind, uid, _ in cost.bwd_events if kind == "alloc")}

        def ref(kind, uid):
            if kind in ("release_grad", "release_out", "release_in"):  # output `uid`'s gradient, the output
                return ("k", uid)  # a selective checkpoint kept, the checkpoint's inputs: let go
            return ("f", forward[uid]) if uid in forward else ("b", backward[uid]) if uid in backward else None

        events = tuple((kind, ref(kind, uid), b) for kind, uid, b in cost.bwd_events)
        if any(kind not in ("alloc", "free", "release_grad", "release_out", "release_in") or r is None
               for kind, r, _ in events):
            return None
        grads, numbers = [], set()
        for element, grad_ref, g in given:
            geometry = (tuple(g.shape), g.stride(), g.storage_offset(), g.dtype, g.device)
            if grad_ref[0] == "grad_out":
                grads.append((cost.inputs.index(element), grad_ref, geometry))
            elif grad_ref[0] == "new" and grad_ref[1] in backward and _is_whole(g) and grad_ref[1] not in numbers:
                numbers.add(grad_ref[1])
                grads.append((cost.inputs.index(element), ("b", backward[grad_ref[1]]), geometry))
            else:
                return None
        keys = self._param_names_of(cost.name)
        if any(uid not in backward or key not in keys for uid, key in zip(cost.param_grads, cost.param_keys)):
            return None
        params = tuple((backward[uid], keys.index(key)) for uid, key in zip(cost.param_grads, cost.param_keys))
        return _Backward(events=events, grads=tuple(grads), params=params, allocations=len(backward))


def _same(t):
    return t


class _Unrepeatable(Exception):
    """Part of a node that no kind describes."""
