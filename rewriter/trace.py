"""Capture a model as a torch.fx GraphModule that keeps its module structure.

`capture(model)` traces symbolically. Built-in torch.nn layers stay whole
(`call_module` nodes whose target reads like `layer3.1.conv2`); user modules are
traced through. A submodule that symbolic tracing cannot follow (data-dependent
control flow, unsupported Python) is retried as an opaque leaf: one `call_module`
node that runs it as it is, with a logged warning naming it. Only a top level that
cannot be captured is an error. Tracing runs on proxies: it allocates no activation
and changes nothing in the model.

Tracing bakes `self.training` in as a constant (`F.dropout(x, training=self.training)`,
torchvision's `stochastic_depth`): the model is traced again with every module in
eval mode, and where that graph differs it is kept as `Captured.eval_gm`, for the
rewritten module to run after `.eval()` (`with_eval_path`).

While tracing, `torch.jit.isinstance(value, torch.Tensor)` of a traced value is True
(a traced value stands for a tensor): answered False, MONAI's `UpCat` left out its
skip connection and the graph was another network. Asked of any other type, it
stops the trace, and the module is kept as an opaque leaf. `torch.as_tensor` of a
traced value (MONAI's HighResNet wraps its blocks' outputs in it) is that value, or
with a dtype or device, a node that converts it; symbolic tracing cannot follow
torch's own (it reads the value's `__cuda_array_interface__`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import sys
import types
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten

from rewriter.passes.layers import computes_as
from rewriter.passes.recompute import RecomputeSegment, adopt_structure
from rewriter.passes.row_split_ops import tiled_chain
from rewriter.errors import CaptureError, InputError
from rewriter.example_values import ExampleValues, UnknownValue

__all__ = ["capture", "Captured", "with_eval_path"]

log = logging.getLogger(__name__)


class _ModuleTracer(fx.Tracer):
    """A tracer that remembers which submodule was being traced when tracing failed."""

    def __init__(self, opaque: frozenset[str], lifetimes: bool = True):
        """`lifetimes`: note in `held_until` how long eager Python holds each value (the
        graph a plan rewrites needs it; the eval-mode graph does not)."""
        # a module rewritten before (row-split) calls tiled_chain, whose tiling branches
        # on sizes: it stays one call, as the rewrite made it
        super().__init__(autowrap_functions=(tiled_chain,))
        # buffers read in forward are traced values: an in-place update of one (timm's
        # BatchNormAct2d counts num_batches_tracked itself) is a node of the graph, not a
        # change made to the model while tracing and missing from every step after
        self.proxy_buffer_attributes = True
        self.opaque = opaque
        self.path_stack: list[str] = []
        self.failed_in: list[str] | None = None
        self.held_until: dict[str, str] = {}
        self.lifetimes = lifetimes

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        rewritten = isinstance(module, RecomputeSegment) or hasattr(module, "code_parameters")  # our own calls
        # a subclass of a torch.nn layer that computes as it (torchvision's Conv3DSimple) stays one call too
        made_differently = computes_as(module) is not type(module)
        return qualname in self.opaque or rewritten or made_differently or super().is_leaf_module(module, qualname)

    def call_module(self, module, forward, args, kwargs):
        self.path_stack.append(self.path_of_module(module))
        try:
            result = super().call_module(module, forward, args, kwargs)
            if self.lifetimes:
                self._note_argument_lifetimes(args, kwargs)
            return result
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.path_stack)
            raise
        finally:
            self.path_stack.pop()

    def trace(self, root, concrete_args=None):
        """`fx.Tracer.trace`, noting as each traced forward returns the values its local
        variables still name (`_note_locals`), where it notes lifetimes (a profile hook on
        every Python call: a 1,000-module chain traces in about twice the time)."""
        if not self.lifetimes:
            return super().trace(root, concrete_args)
        codes = set()
        for module in root.modules() if isinstance(root, nn.Module) else ():
            for forward in (type(module).forward, module.forward):
                code = getattr(inspect.unwrap(getattr(forward, "__func__", forward)), "__code__", None)
                if code is not None:
                    codes.add(code)
        previous = sys.getprofile()

        def returned(frame, event, arg):
            if event == "return" and frame.f_code in codes:
                self._note_locals(frame.f_locals)
            if previous is not None:
                previous(frame, event, arg)

        sys.setprofile(returned)
        try:
            return super().trace(root, concrete_args)
        finally:
            sys.setprofile(previous)

    def _note_locals(self, names: dict) -> None:
        """Eager Python keeps what a forward's local variables name alive until it returns
        (`features = [...]` read by one op, then the loss; `x_0_0` of a UNet++ read by
        the next layer, kept to the end)."""
        self._hold_to_call_end(list(names.values()))

    def _note_argument_lifetimes(self, args, kwargs) -> None:
        """Eager Python keeps a module call's arguments alive until the call returns, even
        past their last use inside it; FX would free them earlier."""
        self._hold_to_call_end((args, kwargs))

    def _hold_to_call_end(self, values) -> None:
        """Remember, for each traced value in `values`, the last node of the call now
        ending (the graph's last so far) as the node until which eager Python holds it."""
        last = next(iter(reversed(self.graph.nodes)), None)
        for value in tree_flatten(values)[0]:
            if isinstance(value, fx.Proxy) and last is not None and value.node is not last:
                self.held_until[value.node.name] = last.name


class _BranchingTracer(_ModuleTracer):
    """A tracer for a forward that branches on sizes (`if x.shape[-1] % 32:`) or on the
    model's state (`if self.enabled:`): each traced value also takes its value on fake
    example inputs (`ExampleValues`), a branch is taken as those inputs take it, and the
    graph asserts the condition it took (`torch._assert`), so that inputs which would
    take the other branch stop with an error instead of running the wrong code; `len`,
    `int` and `float` of sizes likewise. A branch on the inputs' data stays untraceable."""

    def __init__(self, opaque: frozenset[str], root: nn.Module, inputs: list, lifetimes: bool = True):
        super().__init__(opaque, lifetimes)
        self.values = ExampleValues(root, inputs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values.record(proxy.node)
        return proxy

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def _known(self, obj: fx.Proxy, asked: str) -> Any:
        try:
            return self.values.value(obj.node)
        except UnknownValue as unknown:
            raise fx.proxy.TraceError(f"{asked} of {obj.node.name}, which the input sizes do not give: {unknown}") from None

    def length(self, obj: fx.Proxy) -> int:
        """`len` of a traced size or sequence (a tensor's, its batch, stays untraceable)."""
        value = self._known(obj, "len()")
        if isinstance(value, torch.Tensor) or not hasattr(value, "__len__"):
            raise fx.proxy.TraceError(f"len() of {obj.node.name}, whose length the input sizes do not give")
        return len(value)

    def concrete(self, obj: fx.Proxy, kind) -> Any:
        """`kind(value)` of a traced number, the graph asserting it equals that value."""
        value = self._known(obj, f"{kind.__name__}()")
        if isinstance(value, FakeTensor):
            raise fx.proxy.TraceError(f"{kind.__name__}() of {obj.node.name}, which the input sizes do not give")
        number = kind(value)
        equal = self.create_proxy("call_function", operator.eq, (obj, number), {})
        message = (f"the model was captured for inputs on which `{obj.node.name}` is {number}; these inputs "
                   "give another: optimize the model for them")
        self.create_proxy("call_function", torch._assert, (equal, message), {})
        return number

    def to_bool(self, obj: fx.Proxy) -> bool:
        try:
            taken = self.values.truth(obj.node)
        except UnknownValue as unknown:
            raise fx.proxy.TraceError(f"the forward branches on a value the input sizes do not give: {unknown}") from None
        condition = obj if taken else self.create_proxy("call_function", operator.not_, (obj,), {})
        message = (f"the model was captured for inputs on which `{obj.node.name}` is {taken} (a branch of its "
                   "forward); these inputs take the other branch: optimize the model for them")
        self.create_proxy("call_function", torch._assert, (condition, message), {})
        return taken


class _Concrete:
    """`len`, `int`, `float` and `operator.index` of a traced value, as its tracer
    answers them (`len(x.shape)`: the rank; `int(x.shape[1] * x.shape[2])`: a number the
    graph then asserts)."""

    def __len__(self) -> int:
        return self.tracer.length(self)

    def __int__(self) -> int:
        return self.tracer.concrete(self, int)

    def __index__(self) -> int:
        return self.tracer.concrete(self, operator.index)

    def __float__(self) -> float:
        return self.tracer.concrete(self, float)

    def __iter__(self):
        """The items of a traced sequence whose length the inputs give (`for size in
        x.shape[2:]`); anything else as torch.fx iterates it (a tuple unpacked)."""
        try:
            count = self.tracer.length(self)
        except fx.proxy.TraceError:
            return super().__iter__()
        return iter([self[index] for index in range(count)])


class _SizedProxy(_Concrete, fx.Proxy):
    def __getattr__(self, name: str) -> "_SizedAttribute":
        return _SizedAttribute(self, name)


class _SizedAttribute(_Concrete, fx.proxy.Attribute):
    pass


@contextlib.contextmanager
def _traced_values_as_tensors():
    """`torch.jit.isinstance` answering for traced values, and `torch.as_tensor` taking
    them (see the module docstring)."""
    isinstance_of, as_tensor = torch.jit.isinstance, torch.as_tensor

    def answer(value, target_type):
        if isinstance(value, fx.Proxy):
            if target_type is torch.Tensor:
                return True
            raise fx.proxy.TraceError(f"torch.jit.isinstance({value}, {target_type}) asks the type of a traced value")
        return isinstance_of(value, target_type)

    def as_tensor_of(data, *args, **kwargs):
        if not isinstance(data, fx.Proxy):
            return as_tensor(data, *args, **kwargs)
        if not args and all(v is None for v in kwargs.values()):
            return data  # a tensor as it is: the same tensor
        return data.tracer.create_proxy("call_function", as_tensor, (data, *args), kwargs)

    torch.jit.isinstance, torch.as_tensor = answer, as_tensor_of
    try:
        yield
    finally:
        torch.jit.isinstance, torch.as_tensor = isinstance_of, as_tensor


class Captured:
    """The graph of a model: `gm` (a GraphModule sharing the model's parameters),
    `opaque`, the qualified names of submodules kept as opaque leaves, and
    `held_until`, node name -> the node until which an eager module call holds it."""

    def __init__(self, gm: fx.GraphModule, opaque: tuple[str, ...], held_until: dict[str, str],
                 eval_gm: fx.GraphModule | None = None, absent: tuple[str, ...] = ()):
        self.gm = gm
        self.absent = absent  # forward's parameters traced as None
        self.opaque = opaque
        self.held_until = held_until
        self.eval_gm = eval_gm  # the graph in eval mode, where it differs from `gm`'s


def with_eval_path(module: fx.GraphModule, eval_gm: fx.GraphModule | None) -> fx.GraphModule:
    """`module` running `eval_gm` (a graph of the same model traced in eval mode) while
    not training; `module` itself where there is none. `eval_gm` is no submodule: the
    state_dict keys stay the model's."""
    if eval_gm is None:
        return module
    object.__setattr__(module, "eval_code", eval_gm)
    train_forward = module.forward

    def forward(self, *args, **kwargs):
        return train_forward(*args, **kwargs) if self.training else self.eval_code(*args, **kwargs)

    module.forward = types.MethodType(forward, module)
    return module


def _eval_graph(model: nn.Module, opaque: tuple[str, ...], absent: tuple[str, ...], graph: fx.Graph,
                inputs: list | None) -> fx.GraphModule | None:
    """`model` traced with every module in eval mode (put back after), where that graph's
    code differs from `graph`'s; None where it does not, or cannot be traced (logged).
    `inputs`: the example inputs a branching forward was traced on (None: not branching)."""
    modes = [(m, m.training) for m in model.modules()]
    tracer = _tracer(frozenset(opaque), model, inputs, lifetimes=False)
    try:
        for module, _ in modes:
            module.training = False
        with _traced_values_as_tensors():
            traced = tracer.trace(model, concrete_args=dict.fromkeys(absent) or None)
    except Exception as error:
        log.warning("%s cannot be traced in eval mode (%s: %s); after .eval() the rewritten module runs its training "
                    "graph", type(model).__name__, type(error).__name__, error)
        return None
    finally:
        for module, training in modes:
            module.training = training
    if traced.python_code("self").src == graph.python_code("self").src:
        return None
    return adopt_structure(fx.GraphModule(tracer.root, traced, class_name=type(model).__name__), model)


def _tracer(opaque: frozenset[str], model: nn.Module, inputs: list | None, lifetimes: bool = True) -> _ModuleTracer:
    return _ModuleTracer(opaque, lifetimes) if inputs is None else _BranchingTracer(opaque, model, inputs, lifetimes)


def capture(model: nn.Module, opaque: tuple[str, ...] = (), absent: tuple[str, ...] = (),
            inputs: tuple | None = None) -> Captured:
    """Trace `model` into a GraphModule, making untraceable submodules opaque leaves, and
    the modules named in `opaque` (paths) too. `absent`: forward's parameters given as
    None, traced as None (`if mask is None` takes its branch; the graph asserts None).
    `inputs` (forward's arguments, None where absent): where tracing fails, the model
    is traced again taking the branches on sizes that these inputs take, and the graph
    asserts them (`_BranchingTracer`); only what that cannot follow either is an opaque
    leaf (or, the model's own forward, an error)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model={type(model).__name__} is not a torch.nn.Module; pass the model object")
    opaque: list[str] = list(opaque)
    branching: list | None = None  # the example inputs, once a plain trace failed
    for _ in range(sum(1 for _ in model.modules()) + 2):
        tracer = _tracer(frozenset(opaque), model, branching)
        try:
            with _traced_values_as_tensors():
                graph = tracer.trace(model, concrete_args=dict.fromkeys(absent) or None)
        except Exception as error:
            failed = tracer.failed_in
            if branching is None and inputs is not None:
                log.info("%s is not symbolically traceable (%s: %s); tracing again on the example inputs' sizes",
                         repr(failed[-1]) if failed else f"{type(model).__name__}'s own forward()",
                         type(error).__name__, error)
                branching = list(inputs)
                continue
            if not failed:
                raise CaptureError(
                    f"cannot capture {type(model).__name__}: its own forward() is not symbolically "
                    f"traceable ({type(error).__name__}: {error}); move the untraceable part into a "
                    "submodule, which is then kept as an opaque leaf"
                ) from error
            name = failed[-1]
            log.warning(
                "submodule %r (%s) is not symbolically traceable (%s: %s); it is kept as an opaque "
                "leaf: its saved tensors are counted, but no strategy rewrites inside it",
                name, type(model.get_submodule(name)).__name__, type(error).__name__, error,
            )
            opaque.append(name)
            continue
        gm = adopt_structure(fx.GraphModule(tracer.root, graph, class_name=type(model).__name__), model)
        eval_gm = _eval_graph(model, tuple(opaque), absent, graph, branching)
        return Captured(gm, tuple(opaque), tracer.held_until, eval_gm, absent)
    raise CaptureError(f"cannot capture {type(model).__name__}: tracing did not converge")  # pragma: no cover
