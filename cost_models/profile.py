"""Profile every node of a captured graph on fake tensors: what it allocates, what
autograd saves for it, what its backward allocates, and its forward FLOPs.

Each node runs in isolation (its inputs are detached leaves that require grad as the
originals do) under a StorageTracker and saved-tensor hooks, forward in graph order,
then backward in reverse order with the gradients its consumers produced. Shapes are
static (a symbolic batch made the replay several times slower): one trace gives the
costs at the example batch, and two traces (batches b and b + 1) give every count as
an affine expression of `batch` (`over_batch=True`, what `largest_batch` asks for; from
an example batch of 1, the line through batches 2 and 3, batch 1 as traced, since CPU
kernels may differ at batch 1).
Nothing real is allocated, except for opaque leaves whose code branches on data:
those run for real, once, at the example batch, on copies of their parameters.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import weakref
from typing import Any, Callable

import sympy
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from rewriter.cost_models import fake_kernels
from rewriter.cost_models.cuda_allocator import allocated_bytes, workspace_bytes
from rewriter.cost_models.in_place import mutates_an_input
from rewriter.cost_models.kernel_storage import storage_bytes
from rewriter.cost_models.node_costs import BATCH, Costs, NodeCost
from rewriter.cost_models.opaque_leaves import OpaqueLeaves, _GradientSource, _state_items
from rewriter.cost_models.repeated_nodes import Records, RepeatedNodes
from rewriter.cost_models.storage_tracker import StorageTracker, storage_key, tensors_in
from rewriter.passes import accumulate_ops
from rewriter.phases import Progress

__all__ = ["profile_graph", "ProfileError", "UnreplayableOp", "REPEATED_RECORDS"]

log = logging.getLogger(__name__)

REPEATED_RECORDS = True  # profile_graph's default: nodes that repeat take an earlier record (off: to compare)


class ProfileError(ValueError):
    """The inputs or the loss do not fit the model; the message says which and why."""


class UnreplayableOp(ProfileError):
    """A node fails on fake tensors but runs on real ones (a custom op without a fake
    kernel): `module` is the path of the innermost module that calls it (None at the
    top level of forward), to keep as an opaque leaf."""

    def __init__(self, message: str, module: str | None):
        super().__init__(message)
        self.module = module


def _as_expr(value: Any) -> sympy.Expr:
    if isinstance(value, torch.SymInt):
        return value.node.expr
    if isinstance(value, sympy.Expr):
        return value
    return sympy.Integer(int(value))


class _Profiler(OpaqueLeaves, RepeatedNodes):
    def __init__(self, gm: fx.GraphModule, inputs: tuple, loss_fn: Callable, opaque: tuple[str, ...], batch: int | None = None,
                 flops: bool = True, repeats: bool = True, records: Records | None = None):
        """Static shapes at `batch` (default: the example inputs' own batch); FLOPs
        counted unless not `flops` (then 0); nodes that repeat an earlier node take its
        record unless not `repeats` (cost_models.repeated_nodes), `records` the records
        shared with other profiles."""
        self.gm = gm
        self.count_flops = flops
        self.inputs = inputs
        self.loss_fn = loss_fn
        self.opaque = set(opaque)
        self.example_batch = _example_batch(inputs)
        self.static_batch = self.example_batch if batch is None else batch
        self.mode = FakeTensorMode()
        self.device_type = "cuda" if any(t.is_cuda for t in tensors_in(inputs)) else "cpu"
        transient = (lambda func, args, kwargs: workspace_bytes(func, args, kwargs, self._concrete)) if self.device_type == "cuda" else None
        self.tracker = StorageTracker(record_events=True, transient=transient, storage_bytes=storage_bytes,
                                      kernel=fake_kernels.kernel)
        self.values: dict[str, Any] = {}
        self.elements: dict[str, list[torch.Tensor]] = {}
        self.owner: dict[int, tuple[str, int]] = {}  # storage key -> first value element on it
        self.grads: dict[tuple[str, int], torch.Tensor] = {}
        self.fake_of: dict[int, torch.Tensor] = {}
        self.costs: list[NodeCost] = []
        self._in_backward: str | None = None  # the node whose backward runs now
        self._aliases: dict[tuple[str, int], tuple[str, int]] = {}  # element -> the value it is
        self._name_of: dict[int, str] | None = None  # id of a parameter -> its name (one for a shared one)
        self._init_repeats(repeats, records)

    # ---- fake copies of parameters, buffers and inputs -------------------------------
    def _fake_state(self, modules) -> None:
        """Fakes of the parameters and buffers of `modules`, made where missing: before a
        node runs (outside the tracker: making one is no op of the step), for the
        modules it runs; those of nodes that take a repeated record are never made (a
        long chain's profile spent a third of its time on them)."""
        for module in modules:
            for _, tensor in _state_items(module):
                self._fake(tensor)

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        """The fake of a parameter or buffer, made the first time it is asked for."""
        if id(tensor) not in self.fake_of:
            self.fake_of[id(tensor)] = self.mode.from_tensor(tensor, static_shapes=True)
        return self.fake_of[id(tensor)]

    def _modules_run(self, node: fx.Node) -> list[torch.nn.Module]:
        """The modules whose state `node` runs on (`_run`)."""
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if hasattr(module, "checkpointed_code") or hasattr(module, "code_parameters"):
                return [module, *module.codes()]
            return [module]
        if node.op == "call_function":
            return _module_args(node, self.gm)
        return []

    def _fake_input(self, tensor: torch.Tensor) -> torch.Tensor:
        fake = self.mode.from_tensor(tensor, static_shapes=True)
        if tensor.dim() == 0 or tensor.shape[0] == self.static_batch:
            return fake
        return fake.new_empty((self.static_batch, *tensor.shape[1:])).requires_grad_(tensor.requires_grad)

    # ---- one node, forward --------------------------------------------------------------
    def _set_value(self, name: str, value: Any) -> None:
        self.values[name] = value
        self.elements[name] = tensors_in(value)
        self.tracker.pin(self.elements[name])  # held here until the profile ends

    def _isolate(self, structure: Any, element_of: dict[int, tuple[str, int]], written: int | None = None):
        """Replace each tensor by a detached leaf; return the new structure and the leaves.
        `written`: the id of the tensor the node changes in place, if any."""
        leaves: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

        def isolate(t):
            if not isinstance(t, torch.Tensor):
                return t
            element = element_of[id(t)]
            if element not in leaves:
                shaped = self._as_written_view(t, element) if id(t) == written and t.requires_grad else None
                if shaped is not None:
                    leaf, used = self._view_leaf(shaped, element)
                else:
                    leaf = t.detach().requires_grad_(t.requires_grad)
                    # a clone lets in-place ops run on an input that requires grad
                    used = leaf.clone() if leaf.requires_grad else leaf
                self.owner.setdefault(storage_key(used), self.owner.get(storage_key(t), element))
                leaves[element] = (leaf, used)
            return leaves[element][1]

        return tree_map(isolate, structure), leaves

    def _as_written_view(self, t: torch.Tensor, element: tuple[str, int]) -> torch.Tensor | None:
        """The view an input written in place is in the graph: `t` itself, or the value it
        is an alias of (a p=0 dropout hands on its input, InstanceNorm's view in MONAI's
        ADN blocks, where the profile's own run made a copy); None where it is no view."""
        if t._is_view():
            return t
        source = self._aliases.get(element)
        value = self.elements[source[0]][source[1]] if source is not None else None
        if value is not None and value._is_view() and value.shape == t.shape and value.stride() == t.stride():
            return value
        return None

    def _view_leaf(self, t: torch.Tensor, element: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A leaf for a view that the node changes in place: autograd then runs the op's
        backward through CopySlices, which allocates a gradient of the view's base and
        a copy of the slice (InstanceNorm's output is a view of a (1, N*C, H, W) batch
        norm, and an in-place LeakyReLU after it took 2 MiB more than a plain input).
        The leaf is the base; the node gets the view of a non-leaf copy of it, as in the
        graph. The base's gradient is handed on as the view's (`_as_element`)."""
        base = t._base
        leaf = base.detach().requires_grad_(True)
        offset = t.storage_offset() - base.storage_offset()
        self._views[element] = (tuple(t.shape), tuple(t.stride()), offset)
        return leaf, leaf.clone().as_strided(t.shape, t.stride(), offset)

    def _as_element(self, element: tuple[str, int], grad: torch.Tensor) -> torch.Tensor:
        """`grad` of an input leaf as the input's own gradient: for a view leaf
        (`_view_leaf`), the base's gradient viewed as the input (no copy)."""
        view = self._views.get(element)
        return grad if view is None or grad is None else grad.as_strided(*view)

    def _element_map(self, nodes) -> dict[int, tuple[str, int]]:
        return {id(t): (n, k) for n in nodes for k, t in enumerate(self.elements.get(n, []))}

    def _ref_of(self, tensor: torch.Tensor, new_uids: set[int]):
        return self._ref_of_key(storage_key(tensor), new_uids)

    def _ref_of_key(self, key: int, new_uids: set[int]):
        entry = self.tracker.live.get(key)
        if entry is not None and entry.uid in new_uids:
            return ("new", entry.uid)
        owner = self.owner.get(key)
        return ("value", *owner) if owner else ("external",)

    def forward_node(self, node: fx.Node) -> None:
        repeat = self._kind(node)
        repeated = self._repeated_forward(node, repeat, _op_name(self.gm, node), _label(node))
        if repeated is not None:
            self.costs.append(repeated)
            return
        self._fake_state(self._modules_run(node))
        input_names = [n.name for n in node.all_input_nodes]
        element_of = self._element_map(input_names)
        args = fx.node.map_arg(node.args, lambda n: self.values[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.values[n.name])
        opaque = node.op == "call_module" and node.target in self.opaque
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        written = self.values[first.name] if first is not None and not opaque and mutates_an_input(self.gm, node) else None
        (args, kwargs), leaves = self._isolate((args, kwargs), element_of, id(written) if written is not None else None)
        saved: list[int] = []
        checkpoint = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        checkpoint = checkpoint if hasattr(checkpoint, "checkpointed_code") else None
        if checkpoint is not None:
            # the only tensors saved under this hook are the checkpoint's inputs (its own
            # hooks take its ops'), kept by its frame: they go when the frame goes, as
            # the last op that saved a tensor for its rerun ends its backward
            pack, unpack = self._frame_hooks(node.name, saved)
        else:
            def pack(t):  # PyTorch keeps this hook as long as the saved tensor: hold no tensor here
                saved.append(storage_key(t))
                return t

            unpack = _unpack

        prepared = self._prepare_opaque(node, args, kwargs) if opaque else None
        self.tracker.poll()
        start = len(self.tracker.events)
        # FlopCounterMode hooks module outputs until backward, which would keep an opaque
        # leaf's outputs alive: opaque leaves are counted apart (_opaque_flops)
        apart = opaque or self._is_segment(node.name)
        # the tracker above the FLOP counter: it sees each op as it runs, not the ops the
        # counter decomposes it into (SiLU's backward into six, where the kernel allocates one)
        counted = self.count_flops and not apart
        with (FlopCounterMode(display=False) if counted else contextlib.nullcontext()) as flops, self.tracker:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                if opaque:
                    out = self._run_opaque(node, prepared)
                else:
                    out = self._run(node, args, kwargs)
            self.tracker.poll()
        events = _own_events(self.tracker.events[start:], ())
        new_uids = {uid for kind, uid, _ in events if kind == "alloc"}
        freed = {uid for kind, uid, _ in events if kind == "free"}
        outputs, shapes, nbytes = [], [], []
        for k, t in enumerate(tensors_in(out)):
            nbytes.append(allocated_bytes(_as_expr(t.numel() * t.element_size()), self.device_type))
            outputs.append(self._ref_of(t, new_uids))
            if outputs[-1][0] == "new":
                self.owner.setdefault(storage_key(t), (node.name, k))
            shapes.append(tuple(self._concrete(s) for s in t.shape))
        if opaque:
            out = self._fake_stand_in(out)
            for k, t in enumerate(tensors_in(out)):
                if outputs[k][0] == "new":
                    self.owner[storage_key(t)] = (node.name, k)
        self._set_value(node.name, out)
        for k, ref in enumerate(outputs):  # an output that is another value, as the graph's run has it
            if ref[0] == "value":
                self._aliases[(node.name, k)] = self._aliases.get(ref[1:], ref[1:])
        out_uids = {r[1] for r in outputs if r[0] == "new"}
        internal = tuple(sorted(new_uids - freed - out_uids))
        if checkpoint is not None:
            # a checkpoint keeps its inputs for the rerun, and a selective one the outputs
            # of the ops it keeps, its own output among them (its hooks hide both from ours)
            saved = [storage_key(t) for t in tensors_in((args, kwargs))]
            if checkpoint.keeps_output:
                saved += [storage_key(t) for t in tensors_in(out)]
        saved_refs = []
        for key in saved:
            ref = self._ref_of_key(key, new_uids)
            if ref[0] == "new" and ref[1] in out_uids:
                ref = ("value", *self.owner[key])
            if ref[0] != "external" and ref not in saved_refs:
                saved_refs.append(ref)
        self.costs.append(NodeCost(
            name=node.name,
            op=_op_name(self.gm, node),
            label=_label(node),
            shapes=tuple(shapes),
            nbytes=tuple(nbytes),
            inputs=tuple(e for n in input_names for e in ((n, k) for k in range(len(self.elements.get(n, []))))),
            outputs=tuple(outputs),
            requires_grad=tuple(t.requires_grad for t in self.elements[node.name]),
            internal=internal,
            saved=tuple(saved_refs),
            fwd_events=tuple((kind, uid, _as_expr(b)) for kind, uid, b in events),
            # a checkpointed segment's FLOPs are its members' (the pipeline counts the
            # rerun): FlopCounterMode's module hooks would keep the rerun's tensors alive
            fwd_flops=(
                self._opaque_flops(node, prepared)[0] if opaque
                else _as_expr(flops.get_total_flops()) if counted
                else sympy.Integer(0)
            ),
            opaque=opaque,
            many_ops=apart,
        ))
        self._leaves[node.name] = leaves
        self._remember_forward(repeat, self.costs[-1], out)

    def _frame_hooks(self, name: str, saved: list[int]):
        """Saved-tensor hooks for checkpointed segment `name` that record a "release_in"
        event in its backward where its checkpoint lets go of its inputs: they are
        packed with one token, which dies with the last of them."""
        token = _Token()

        def died():
            if self._in_backward == name:
                self.tracker.poll()
                self.tracker.events.append(("release_in", 0, 0))

        weakref.finalize(token, died)

        def pack(t):
            saved.append(storage_key(t))
            return token, t

        return pack, _unpack_held

    def _run(self, node: fx.Node, args, kwargs):
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            code = getattr(module, "checkpointed_code", None)
            if code is not None:  # a checkpointed segment: its code (nested ones too) runs on the fake state
                buffers = [self.fake_of[id(b)] for b in module.stat_buffers()]
                with self._fake_model(*module.codes()):
                    return module.run(code, *args, stat_buffers=buffers)
            if hasattr(module, "code_parameters"):  # an invert chain: its units run gm's modules
                with self._fake_model(*module.codes()):
                    return module(*args, **kwargs)
            state = {k: self.fake_of[id(t)] for k, t in _state_items(module)}
            return functional_call(module, state, args, kwargs)
        if node.op == "call_function":
            if node.target is torch._assert:  # a traced branch's guard: on fake state its truth is unknown
                return None
            modules = _module_args(node, self.gm)
            if modules:  # a compressed op reading its module's parameters: their fakes
                with self._fake_model(*modules):
                    return node.target(*args, **kwargs)
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise AssertionError(node.op)  # pragma: no cover

    def _concrete(self, size) -> int:
        return int(size)

    def _runs_for_real(self, node: fx.Node) -> bool:
        """Whether `node` runs on real random inputs shaped as its fake ones (on copies of
        the state it reads: nothing of the model changes)."""

        def real_like(t):
            return self._real(t) if isinstance(t, torch.Tensor) else t

        with unset_fake_temporarily():
            args = tree_map(real_like, fx.node.map_arg(node.args, lambda n: self.values[n.name]))
            kwargs = tree_map(real_like, fx.node.map_arg(node.kwargs, lambda n: self.values[n.name]))
            try:
                with torch.no_grad():
                    if node.op == "call_module":
                        module = self.gm.get_submodule(node.target)
                        state = {k: t.detach().clone() for k, t in _state_items(module)}
                        functional_call(module, state, args, kwargs)
                    elif node.op == "call_method":
                        getattr(args[0], node.target)(*args[1:], **kwargs)
                    else:
                        node.target(*args, **kwargs)
            except Exception:
                return False
        return True

    # ---- the loss ------------------------------------------------------------------------
    def loss_node(self, output_node: fx.Node) -> None:
        names = [n.name for n in output_node.all_input_nodes]
        structure = fx.node.map_arg(output_node.args[0], lambda n: self.values[n.name])
        structure, leaves = self._isolate(structure, self._element_map(names))
        start = len(self.tracker.events)
        with self.tracker:
            loss = self.loss_fn(structure)
            self.tracker.poll()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ProfileError(
                "loss_fn must return a one-element tensor that requires grad; got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        events = self.tracker.events[start:]
        self._set_value("loss", loss)
        new_uids = {uid for kind, uid, _ in events if kind == "alloc"}
        output = self._ref_of(loss, new_uids)
        # what the loss made and its graph still holds (an MSE target made inside it, say)
        # lives until the loss's backward, as any node's internals do
        held = new_uids - {uid for kind, uid, _ in events if kind == "free"} - ({output[1]} if output[0] == "new" else set())
        self.costs.append(NodeCost(
            name="loss", op="loss", label="loss", shapes=((),), nbytes=(_as_expr(loss.element_size()),),
            inputs=tuple((n, k) for n in names for k in range(len(self.elements[n]))),
            outputs=(output,), requires_grad=(True,), internal=tuple(sorted(held)),
            saved=(), fwd_events=tuple((kind, uid, _as_expr(b)) for kind, uid, b in events),
            fwd_flops=sympy.Integer(0),
        ))
        self._leaves["loss"] = leaves
        self.grads[("loss", 0)] = None  # backward starts here: autograd makes the ones itself

    # ---- one node, backward ------------------------------------------------------------
    def backward_node(self, cost: NodeCost) -> None:
        outs, grad_outs, indices = [], [], []
        for k, t in enumerate(self.elements[cost.name]):
            if (cost.name, k) in self.grads and t.requires_grad:
                outs.append(t)
                grad_outs.append(self.grads[(cost.name, k)])
                indices.append(k)
        if not outs:
            return
        repeat = self._backward_kind(cost.name, indices, grad_outs)
        translate = None  # a rerun's storages -> the recorded ones (cost_models.repeated_nodes)
        if cost.name in self._replayed:
            if self._repeated_backward(cost, repeat, dict(zip(indices, grad_outs))):
                return
            ran, translate = self._rerun_forward(cost, self._node[cost.name])
            outs = [ran[k] for k in indices]
        leaves = self._leaves[cost.name]
        targets = [(e, leaf) for e, (leaf, _) in leaves.items() if leaf.requires_grad]
        params = [] if cost.opaque else self._params_of(cost.name)
        names = [] if cost.opaque else self._param_names_of(cost.name)  # in the same order
        # a node of many ops frees its incoming gradient after its first op: feed it
        # through a gradient source that the harness does not hold (see _GradientSource);
        # so does a node that adds its weight's gradient into .grad (it must see the
        # engine accumulate: a backward over its inputs, not torch.autograd.grad)
        segment = self._is_segment(cost.name) or self._into_grad(cost.name)
        # the incoming gradients' layouts (None: contiguous), by output index
        layout = {k: None if g is None or g.is_contiguous() else tuple(g.stride()) for k, g in zip(indices, grad_outs)}
        if cost.opaque:
            source, real_inputs, real_params = self._opaque_source(cost, layout)
            with unset_fake_temporarily():
                seed = torch.ones_like(source)  # the harness's own: made before the node's events start
        elif segment:
            source = _GradientSource.apply(self.tracker, tuple(layout[k] for k in indices), *outs)
            seed = torch.ones_like(source)  # the harness's own: made before the node's events start
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.tracker.poll()
        start = len(self.tracker.events)
        param_arrivals: list[tuple[int | None, str]] = []  # a segment's parameter gradients as they reach .grad
        with self.tracker:
            if cost.opaque:  # parameter gradients go into .grad in place, as in a real step
                with unset_fake_temporarily():
                    torch.autograd.backward(source, seed, inputs=real_inputs + real_params)
                results, param_results = [t.grad for t in real_inputs], []
            elif segment:
                # the input gradients as autograd hands them on (a concat's are slices of
                # one storage), before `.grad` takes a copy in its own layout
                arrived: dict[tuple[str, int], int | None] = {}

                def capture(element):
                    def hook(grad):
                        self.tracker.poll()
                        arrived[element] = self.tracker.uid_of(grad)
                    return hook

                handles = [leaf.register_hook(capture(e)) for e, leaf in targets]
                handles += [torch.autograd.graph.get_gradient_edge(p).node.register_prehook(
                    self._arrival_of(key, param_arrivals)) for p, key in zip(params, names)]
                node = self._node[cost.name]
                module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
                codes = module.codes() if module is not None else _module_args(node, self.gm)

                def rerun_ended(segment):  # a selective checkpoint's cache of the output goes (held here)
                    if segment is module:
                        self.tracker.poll()
                        self.tracker.events.append(("release_out", 0, 0))

                # (a segment nested in this one lets go of its own output for real: no event)
                observers = type(module).rerun_ended if getattr(module, "keeps_output", False) else []
                observers.append(rerun_ended)
                self._in_backward = cost.name
                try:
                    with self._fake_model(*codes):  # a checkpoint's rerun, a chain's inverse: on the fake state too
                        torch.autograd.backward(source, seed, inputs=[leaf for _, leaf in targets] + params)
                finally:
                    observers.remove(rerun_ended)
                    self._in_backward = None
                for handle in handles:
                    handle.remove()
                results, param_results = [leaf.grad for _, leaf in targets], []
            else:
                everything = [leaf for _, leaf in targets] + params
                results = torch.autograd.grad(outs, everything, grad_outs if cost.name != "loss" else None, allow_unused=True)
                results, param_results = results[: len(targets)], results[len(targets):]
            self.tracker.poll()
        window = self.tracker.events[start:]
        if translate is not None:
            window = [(kind, translate.get(uid, uid), b) for kind, uid, b in window]
        events = _own_events(window, cost.fwd_events)
        if cost.opaque:  # its real outputs die with its graph here, but the caller holds the model's output
            held = {ref[1] for ref in cost.outputs if ref[0] == "new" and cost.name in self._model_outputs}
            events = [e for e in events if not (e[0] == "free" and e[1] in held)]
        if segment:  # eager hands on the gradients themselves: drop the copies, keep them alive
            copies = {self.tracker.uid_of(leaf.grad) for e, leaf in targets if leaf.grad is not None} - set(arrived.values())
            handed_on = set(arrived.values())
            events = [(kind, uid, b) for kind, uid, b in events
                      if kind in ("release_out", "release_in") or uid not in copies and not (kind == "free" and uid in handed_on)]
        if cost.opaque or segment:
            # the stand-in gradients are the incoming ones, already live: drop their
            # allocation, and turn their free into a release of that gradient slot
            stand_ins = dict(zip(_GradientSource.made, indices))
            events = [
                ("release_grad", stand_ins[uid], 0) if kind == "free" and uid in stand_ins else (kind, uid, b)
                for kind, uid, b in events
                if not (kind == "alloc" and uid in stand_ins)
            ]
        elif any(element in self._views for element, _ in targets):
            # an output written over a view: its backward starts with the view's own, which
            # copies the incoming gradient into a buffer of the base and lets it go
            first = next((i for i, event in enumerate(events) if event[0] == "alloc"), len(events))
            events = events[:first + 1] + [("release_grad", k, 0) for k in indices] + events[first + 1:]
        new_uids = {uid for kind, uid, _ in events if kind == "alloc"}
        grad_keys = {storage_key(g): i for i, g in zip(indices, grad_outs) if g is not None}
        grad_inputs, attr_grads, given = [], [], []
        for (element, _), g in zip(targets, results):
            if g is None:
                continue
            if self._node[element[0]].op == "get_attr":
                attr_grads.append((g, self._node[element[0]].target))  # a parameter used by a function: added in place
                continue
            if cost.opaque:
                ref = ("new", self.tracker.uid_of(g)) if self.tracker.uid_of(g) in new_uids else ("external",)
                g = self._fake_grad(element)
            elif segment:
                uid = arrived.get(element)
                ref = ("grad_out", stand_ins[uid]) if uid in stand_ins else ("new", uid) if uid in new_uids else ("external",)
            else:
                g = self._as_element(element, g)
                uid = self.tracker.uid_of(g)
                ref = (("grad_out", grad_keys[storage_key(g)]) if storage_key(g) in grad_keys
                       else ("new", uid) if uid in new_uids else ("external",))
            grad_inputs.append((element, ref))
            given.append((element, ref, g))
            self._accumulate(element, g)
        made = [(self.tracker.uid_of(g), key) for key, g in zip(names, param_results) if g is not None]
        made += [(self.tracker.uid_of(g), key) for g, key in attr_grads]
        made = [(uid, key) for uid, key in made + param_arrivals if uid in new_uids and key is not None]
        cost.has_backward = True
        cost.bwd_events = tuple((kind, uid, _as_expr(b)) for kind, uid, b in events)
        cost.grad_inputs = tuple(grad_inputs)
        cost.param_grads = tuple(uid for uid, _ in made)
        cost.param_keys = tuple(key for _, key in made)
        if cost.opaque:  # its backward's FLOPs, counted apart; others' are not counted (nothing reads them)
            cost.bwd_flops = self._apart_bwd_flops.pop(cost.name)
        self._remember_backward(repeat, cost, given)

    @contextlib.contextmanager
    def _fake_model(self, *modules: torch.nn.Module):
        """The parameters and buffers of `modules` (default: all of gm) swapped for their
        fakes (for code that calls gm's submodules itself, forward and backward)."""
        modules = {id(m): m for m in modules or (self.gm,)}.values()  # a shared module once
        # every state looked up before any is swapped: modules that share submodules
        # (a segment's code and the codes nested in it) would see the fakes otherwise
        states = [(m, {k: self.fake_of[id(t)] for k, t in _state_items(m)}) for m in modules]
        with contextlib.ExitStack() as stack:
            for module, state in states:
                stack.enter_context(_reparametrize_module(module, state))
            yield

    def _arrival_of(self, key: str | None, arrivals: list):
        """A hook on the AccumulateGrad of a parameter's fake (named `key`) that notes the
        storage of each gradient it gets, before `.grad` takes it in (a sparse stand-in,
        from passes.accumulate, is none; a hook on the parameter itself would turn that
        rewrite's in-place path off)."""

        def hook(grads):
            grad = grads[0]
            if grad is not None and grad.layout == torch.strided:
                self.tracker.poll()
                arrivals.append((self.tracker.uid_of(grad), key))
        return hook

    def _into_grad(self, name: str) -> bool:
        """A node that adds its weight's gradient into `.grad` (passes.accumulate_ops)."""
        node = self._node.get(name)
        return node is not None and node.op == "call_function" and node.target in _INTO_GRAD

    def _is_segment(self, name: str) -> bool:
        """A node of many ops (a recomputed segment, an invert chain)."""
        node = self._node.get(name)
        return node is not None and node.op == "call_module" and hasattr(self.gm.get_submodule(node.target), "code_parameters")

    def _params_of(self, name: str) -> list[torch.Tensor]:
        """The fakes of the parameters that node `name` takes gradients for."""
        node = self._node.get(name)
        if node is not None:  # (a node that took its forward's record has not made them)
            self._fake_state(self._modules_run(node))
        return [self.fake_of[id(p)] for p in self._real_params_of(node)]

    def _param_names_of(self, name: str) -> list[str | None]:
        """The names of those parameters, in that order (no fake made)."""
        if self._name_of is None:
            self._name_of = {id(p): n for n, p in self.gm.named_parameters()}
        return [self._name_of.get(id(p)) for p in self._real_params_of(self._node.get(name))]

    def _real_params_of(self, node: fx.Node | None) -> list[torch.Tensor]:
        if node is not None and node.op == "call_function":
            return list({id(p): p for m in _module_args(node, self.gm) for p in m.parameters() if p.requires_grad}.values())
        if node is None or node.op != "call_module":
            return []
        module = self.gm.get_submodule(node.target)
        if hasattr(module, "code_parameters"):  # a segment's or chain's parameters are its code's
            return [p for p in module.code_parameters() if p.requires_grad]
        return [p for p in module.parameters() if p.requires_grad]

    def _fake_grad(self, element: tuple[str, int]) -> torch.Tensor:
        return torch.zeros_like(self.elements[element[0]][element[1]])

    def _accumulate(self, element: tuple[str, int], grad: torch.Tensor) -> None:
        previous = self.grads.get(element)
        self.grads[element] = grad if previous is None else previous + grad

    # ---- the whole graph ---------------------------------------------------------------
    def run(self) -> Costs:
        self._leaves: dict[str, dict] = {}
        self._views: dict[tuple[str, int], tuple] = {}  # input element -> view geometry, where a node writes over a view
        self._opaque_real: dict[str, tuple] = {}
        self._apart_bwd_flops: dict[str, sympy.Expr] = {}  # opaque leaves' FLOPs, counted apart
        self._node = {n.name: n for n in self.gm.graph.nodes}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.inputs):
            raise ProfileError(
                f"the model takes {len(placeholders)} positional input(s) "
                f"({', '.join(n.name for n in placeholders)}) but example_inputs has {len(self.inputs)}"
            )
        output_node = None
        with self.mode:
            nodes = list(self.gm.graph.nodes)
            progress = Progress("profile: nodes run forward", len(nodes))
            for index, node in enumerate(nodes):
                progress.tick(index)
                if node.op == "placeholder":
                    value = self.inputs[len(self.values)]
                    self._set_value(node.name, self._fake_input(value) if isinstance(value, torch.Tensor) else value)
                elif node.op == "get_attr":
                    attr = _fetch_attr(self.gm, node.target)
                    if isinstance(attr, torch.Tensor):  # a parameter read in forward (a layer scale): its fake
                        attr = self._fake(attr)
                    self._set_value(node.name, attr)
                elif node.op == "output":
                    output_node = node
                else:
                    try:
                        self.forward_node(node)
                    except (ProfileError, TimeoutError):  # (a caller's alarm, say: not the op's doing)
                        raise
                    except Exception as error:
                        if self._runs_for_real(node):
                            caller = _caller(node)
                            raise UnreplayableOp(
                                f"node {_label(node)!r} ({_op_name(self.gm, node)}) runs on real tensors but not on "
                                f"fake ones ({type(error).__name__}: {error})"
                                + ("" if caller else "; call it inside a submodule, which is then kept as an opaque leaf"),
                                caller) from error
                        raise ProfileError(
                            f"the example inputs {_shapes(self.inputs)} do not fit the model: node "
                            f"{_label(node)!r} ({_op_name(self.gm, node)}) failed with "
                            f"{type(error).__name__}: {error}"
                        ) from error
            self._model_outputs = {n.name for n in output_node.all_input_nodes}
            self.loss_node(output_node)
            progress = Progress("profile: nodes run backward", len(self.costs))
            for index, cost in enumerate(reversed(self.costs)):
                progress.tick(index)
                self.backward_node(cost)
        log.debug("profile: %d of %d nodes took the record of an earlier node of their kind; %d of them ran again "
                  "for their backward", len(self._replayed), len(self.costs), len(self._rerun_outputs))
        sizes = {uid: allocated_bytes(b, self.device_type)
                 for c in self.costs for kind, uid, b in (*c.fwd_events, *c.bwd_events) if kind == "alloc"}
        outputs = tuple((n.name, k) for n in output_node.all_input_nodes for k in range(len(self.elements[n.name])))
        return Costs(
            nodes=self.costs, outputs=outputs, sizes=sizes, example_batch=self.example_batch,
            input_shapes=_shapes(self.inputs), opaque=tuple(sorted(self.opaque)),
        )


_INTO_GRAD = (accumulate_ops.linear, accumulate_ops.conv)


class _Token:
    """What a checkpoint's saved inputs are packed with (weakly referenceable)."""


def _unpack(t):
    return t


def _unpack_held(packed):
    return packed[1]


def _own_events(events, earlier) -> list:
    """The events of one window, less the frees of storages that other nodes allocated
    (they are freed when the harness drops them, not by this node)."""
    own = {uid for kind, uid, _ in earlier if kind == "alloc"} | {uid for kind, uid, _ in events if kind == "alloc"}
    return [e for e in events if e[0] != "free" or e[1] in own]


def _example_batch(inputs: tuple) -> int:
    batches = {t.shape[0] for t in tensors_in(inputs) if t.dim() > 0}
    if len(batches) > 1:
        raise ProfileError(
            f"example inputs have different sizes in dim 0 ({sorted(batches)}); dim 0 of every input "
            "is taken as the batch dimension"
        )
    return batches.pop() if batches else 1


def _shapes(inputs: tuple) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in tensors_in(inputs))


def _module_args(node: fx.Node, gm: fx.GraphModule) -> list[torch.nn.Module]:
    """The submodules a call_function node is handed (through get_attr)."""
    found = [_fetch_attr(gm, a.target) for a in node.all_input_nodes if a.op == "get_attr"]
    return [m for m in found if isinstance(m, torch.nn.Module)]


def _fetch_attr(gm: fx.GraphModule, target: str):
    return operator.attrgetter(target)(gm)


def _caller(node: fx.Node) -> str | None:
    """The path of the innermost module whose forward calls `node` (a leaf module's own
    path for its call); None at the top level."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else None


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return f"{path}:{node.name}" if path else node.name


def profile_graph(
    gm: fx.GraphModule,
    example_inputs: tuple,
    loss_fn: Callable,
    opaque: tuple[str, ...] = (),
    held_until: dict[str, str] | None = None,
    over_batch: bool = False,
    flops: bool = True,
    repeats: bool | None = None,
    records: Records | None = None,
) -> Costs:
    """Per-node costs of one training step of `gm` on inputs shaped like `example_inputs`.

    From one static trace, the costs hold at the example batch only (`batch_symbolic`
    False). With `over_batch`, byte counts and FLOPs are sympy expressions of `batch`,
    each taken as affine in the batch through two static traces (batch b and b + 1;
    for b = 1, through 2 and 3, any count off that line at 1 kept as traced there).
    Without `flops`, FLOPs are not counted (0; the counter takes about a fifth of the
    time, and a profile made to verify a plan's bytes needs none). With `repeats`
    (default `REPEATED_RECORDS`), a node that repeats an earlier one takes its record
    (cost_models.repeated_nodes), also one that `records` holds from other profiles
    (which take this one's).
    """
    repeats = REPEATED_RECORDS if repeats is None else repeats
    with _fixed_momentum(gm):
        costs = _Profiler(gm, example_inputs, loss_fn, opaque, flops=flops, repeats=repeats, records=records).run()
        if over_batch:
            def at(batch: int) -> Costs:
                return _Profiler(gm, example_inputs, loss_fn, opaque, batch=batch, flops=flops, repeats=repeats,
                                 records=records).run()

            if costs.example_batch == 1:  # a kernel may differ at batch 1: the line through 2 and 3, batch 1 as traced
                costs = _at_one(costs, _affine_fit(at(2), at(3), 2))
            else:
                costs = _affine_fit(costs, at(costs.example_batch + 1), costs.example_batch)
        else:
            costs.batch_symbolic = False
    costs.held_until = dict(held_until or {})
    return costs


@contextlib.contextmanager
def _fixed_momentum(gm: fx.GraphModule):
    """Norm layers with momentum=None (a cumulative average) turn their step count into
    a Python number, which a fake tensor cannot give; while profiling they run with a
    fixed momentum: the same ops on the same tensors, so the same memory."""
    roots = [gm] + [m.checkpointed_code for m in gm.modules() if hasattr(m, "checkpointed_code")]
    norms = {id(m): m for root in roots for m in root.modules()
             if getattr(m, "momentum", 0.0) is None and isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor)}
    for norm in norms.values():
        norm.momentum = 0.5
    try:
        yield
    finally:
        for norm in norms.values():
            norm.momentum = None


def _same_structure(first: Costs, second: Costs) -> bool:
    """Whether two traces made the same allocations and frees in the same order."""
    return len(first.nodes) == len(second.nodes) and all(
        [e[:2] for e in a.fwd_events + a.bwd_events] == [e[:2] for e in b.fwd_events + b.bwd_events]
        for a, b in zip(first.nodes, second.nodes)
    )


def _affine_fit(first: Costs, second: Costs, batch: int) -> Costs:
    """Costs whose counts are a*batch + c through the counts of two static traces at
    `batch` and `batch + 1`; if the traces differ in structure, the costs of the first
    alone, marked as valid at that batch only."""
    if not _same_structure(first, second):
        log.warning("the graph's allocations change with the batch size; costs hold at batch %d only", batch)
        first.batch_symbolic = False
        return first

    def fit(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
        slope = b - a
        return sympy.expand(slope * BATCH + a - slope * batch)

    def fit_events(a, b):
        return tuple((kind, uid, fit(x, y)) for (kind, uid, x), (_, _, y) in zip(a, b))

    for a, b in zip(first.nodes, second.nodes):
        a.fwd_events, a.bwd_events = fit_events(a.fwd_events, b.fwd_events), fit_events(a.bwd_events, b.bwd_events)
        a.nbytes = tuple(fit(x, y) for x, y in zip(a.nbytes, b.nbytes))
        a.fwd_flops, a.bwd_flops = fit(a.fwd_flops, b.fwd_flops), fit(a.bwd_flops, b.bwd_flops)
    first.sizes = {uid: fit(first.sizes[uid], second.sizes[uid]) for uid in first.sizes}
    first.example_batch = batch
    return first


def _at_one(one: Costs, fitted: Costs) -> Costs:
    """The trace at batch 1 (`one`), each count made the line of `fitted` (affine in
    the batch, from traces at 2 and 3), or a piecewise expression that is its traced
    value at batch 1 where that is off the line: on CPU, a 3-D transposed convolution
    runs another kernel at batch 1 in float32 (kernel_storage), whose output's storage
    is not a batch's share of batch 2's. Counts at batch 1 only if the traces differ
    in structure."""
    if not fitted.batch_symbolic or not _same_structure(one, fitted):
        log.warning("the graph's allocations change with the batch size; costs hold at batch 1 only")
        one.batch_symbolic = False
        return one

    def exact_at_one(line: sympy.Expr, value: sympy.Expr) -> sympy.Expr:
        if line.xreplace({BATCH: 1}) == value:
            return line
        return sympy.Piecewise((value, sympy.Eq(BATCH, 1)), (line, True))

    def events(values, lines):
        return tuple((kind, uid, exact_at_one(x, y)) for (kind, uid, y), (_, _, x) in zip(values, lines))

    for value, line in zip(one.nodes, fitted.nodes):
        value.fwd_events, value.bwd_events = events(value.fwd_events, line.fwd_events), events(value.bwd_events,
                                                                                            line.bwd_events)
        value.nbytes = tuple(exact_at_one(x, y) for x, y in zip(line.nbytes, value.nbytes))
        value.fwd_flops = exact_at_one(line.fwd_flops, value.fwd_flops)
        value.bwd_flops = exact_at_one(line.bwd_flops, value.bwd_flops)
    one.sizes = {uid: exact_at_one(fitted.sizes[uid], one.sizes[uid]) for uid in one.sizes}
    return one
