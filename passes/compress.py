"""Compress candidates and the rewrite: nodes whose saved tensors the backward gets
back from a smaller copy (`passes/compressed_ops.py` holds the ops).

For every saved storage the question is who holds it. A ReLU's output kept by the
next convolution costs the same whether the ReLU keeps a mask or not: only when every
holder of a storage can do without it (the ReLU with a mask, a max-pool with window
offsets, the convolution with a quantized copy when lossy compression is allowed)
is it freed. `groups` therefore joins the nodes that hold a common storage into one
candidate, offered only where that frees something, and the solver takes or leaves
each group whole.

Lossless kinds (used by default): relu, leaky_relu, hardtanh (ReLU6 too), dropout,
max_pool2d, avg_pool2d and their 3-D forms.
Lossy kinds (only with `bits`): conv, linear, batch_norm (training mode), group_norm and
instance_norm (per-sample statistics, as MONAI's networks use them; an InstanceNorm that
normalises with running statistics is none), layer_norm (statistics per position: over
the channels in a ConvNeXt block, module or functional form), prelu (its input gradient exact from a
1-bit mask, its slope's from the quantized input). A BatchNorm whose output only a ReLU
reads, and whose ReLU only a convolution or Linear reads, is grouped with both and the
three run as one op that keeps one copy (`fusable`). Lossy readers of one tensor keep
one copy between them; convolution modules among them (a
ResNet stage's conv1 and downsample) run as one op that also sums their input
gradients in one buffer. A BatchNorm that alone reads a convolution's output writes
its output over it (`_overwritable`), and a sum that alone reads a lossy BatchNorm's
output writes over that (`_sum_into`: tracing makes `out += identity` out of place).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Collection

import torch
import torch.nn.functional as F
from torch import fx, nn

from rewriter.cost_models.node_costs import Costs
from rewriter.cost_models.saved import saved_tensors
from rewriter.passes import compressed_ops
from rewriter.passes.compressed_ops import BITS
from rewriter.passes.names import fresh_name
from rewriter.passes.layers import computes_as
from rewriter.passes.registry import Candidate, Decision, Pricing

__all__ = ["LOSSLESS", "LOSSY", "KEY", "Group", "kind", "groups", "candidates", "mode_bits", "fusable", "calibrate_bits",
           "bits_for", "lossy_nodes", "sensitivity", "apply", "rewrite", "form_of"]

LOSSLESS = ("relu", "leaky_relu", "hardtanh", "relu6", "dropout", "max_pool2d", "avg_pool2d", "max_pool3d", "avg_pool3d")
_MAX_POOLS = ("max_pool2d", "max_pool3d")
LOSSY = ("conv", "linear", "batch_norm", "group_norm", "instance_norm", "layer_norm", "prelu")
KEY = "compress:"  # a group's candidate key: this prefix and its first node

_MODULE_KINDS = {
    nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Hardtanh: "hardtanh", nn.ReLU6: "hardtanh",
    nn.Dropout: "dropout", nn.MaxPool2d: "max_pool2d", nn.MaxPool3d: "max_pool3d", nn.AvgPool3d: "avg_pool3d",
    nn.AvgPool2d: "avg_pool2d", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv", nn.Linear: "linear",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.GroupNorm: "group_norm", nn.InstanceNorm1d: "instance_norm", nn.InstanceNorm2d: "instance_norm",
    nn.InstanceNorm3d: "instance_norm", nn.LayerNorm: "layer_norm", nn.PReLU: "prelu",
}
_FUNCTION_KINDS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.leaky_relu: "leaky_relu", F.hardtanh: "hardtanh",
    F.relu6: "relu6", F.dropout: "dropout",
    F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d", F.max_pool3d: "max_pool3d", F.avg_pool3d: "avg_pool3d",
    F.conv1d: "conv", F.conv2d: "conv",
    F.conv3d: "conv", F.linear: "linear", F.layer_norm: "layer_norm",
}
_COMPRESSED = {
    "relu": compressed_ops.relu, "leaky_relu": compressed_ops.leaky_relu, "hardtanh": compressed_ops.hardtanh,
    "relu6": compressed_ops.relu6, "dropout": compressed_ops.dropout,
    "max_pool2d": compressed_ops.max_pool2d, "avg_pool2d": compressed_ops.avg_pool2d,
    "max_pool3d": compressed_ops.max_pool3d, "avg_pool3d": compressed_ops.avg_pool3d,
    "conv": compressed_ops.conv, "linear": compressed_ops.linear, "layer_norm": compressed_ops.layer_norm,
}


def _module_ok(module: nn.Module, kind: str) -> bool:
    if kind == "dropout":
        return 0.0 < module.p < 1.0 and not module.inplace
    if kind in _MAX_POOLS:
        kernel = compressed_ops._ntuple(module.kernel_size, 2 if kind == "max_pool2d" else 3)
        return not module.return_indices and math.prod(kernel) <= 256
    if kind == "conv":
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if kind in ("batch_norm", "instance_norm"):  # batch or input statistics: its backward reads its input
        return module.training or not module.track_running_stats
    return True


def _function_ok(node: fx.Node, kind: str) -> bool:
    args, kwargs = node.args, node.kwargs
    if any(isinstance(a, str) for a in (*args, *kwargs.values())):  # padding="same" and the like
        return False
    if kind == "dropout":
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
        return isinstance(p, float) and 0.0 < p < 1.0 and training is True and inplace is False
    if kind in _MAX_POOLS:
        return not kwargs.get("return_indices", args[6] if len(args) > 6 else False)
    if kind in ("leaky_relu", "hardtanh", "relu6"):
        return all(not isinstance(a, fx.Node) for a in (*args[1:], *kwargs.values()))
    return True


def kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """What compress can do with `node`: one of LOSSLESS or LOSSY, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        found = _MODULE_KINDS.get(computes_as(module))
        ok = found and len(node.args) == 1 and not node.kwargs and _module_ok(module, found)
        return found if ok else None
    if node.op == "call_function":
        found = _FUNCTION_KINDS.get(node.target)
        return found if found and node.args and _function_ok(node, found) else None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
        return "relu"
    return None


@dataclass(frozen=True)
class Group:
    """Nodes compressed together: each holds a storage that only members hold."""

    nodes: tuple[str, ...]  # in graph order
    kinds: tuple[str, ...]
    freed_bytes: int  # at the example batch: the storages only members hold
    fused: tuple[tuple[str, str, str], ...] = ()  # (batch_norm, relu, consumer) run as one op (see `fusable`)

    @property
    def key(self) -> str:
        return KEY + self.nodes[0]

    @property
    def outs(self) -> tuple[str, ...]:
        """The members that stay nodes once compressed (a fused triple is one node, named
        as its consumer)."""
        gone = {n for bn, relu, _ in self.fused for n in (bn, relu)}
        return tuple(n for n in self.nodes if n not in gone)

    @property
    def lossless(self) -> bool:
        return all(k in LOSSLESS for k in self.kinds)


def mode_bits(mode: str) -> int:
    """The bits a compress mode ("compress4") keeps lossy inputs at; 0 for "compress"
    (lossless, or the widths an error bound sets)."""
    return int(mode[len("compress"):] or 0)


def candidates(pricing: Pricing, found: list[Group], forms: dict[str, dict[str, str]]) -> list[Candidate]:
    """Each group in each compress mode of `forms` (mode -> each member's form, widest
    mode first; a lossless group in the first only): packed in forward and unpacked in
    backward, the seconds its members add as measured in the first mode
    (`pricing.compressed_seconds`; where a member was not, three passes over its bytes);
    the bytes it frees, less for wider modes (for ranking)."""
    offered = []
    modes = tuple(forms)
    for group in found if modes else ():
        options = modes[:1] if group.lossless else modes
        seconds = sum(_member_seconds(pricing, n) for n in group.nodes)
        saved = tuple(group.freed_bytes * (1 - mode_bits(m) / 40) for m in options)
        details = tuple(tuple(forms[m][n] for n in group.nodes) for m in options)
        offered.append(Candidate("compress", group.key, group.nodes, group.outs, options, (seconds,) * len(options), saved,
                                 details))
    return offered


def _member_seconds(pricing: Pricing, node: str) -> float:
    measured = pricing.compressed_seconds(node)
    return pricing.rerun_seconds((node,), times=0.0, move=3.0) if measured is None else measured


def groups(gm: fx.GraphModule, base: Costs, lossy: Collection[str] = ()) -> list[Group]:
    """The candidate groups of `gm` whose profile is `base`: lossless kinds, and the
    lossy-kind nodes named in `lossy`."""
    kinds = {n.name: kind(gm, n) for n in gm.graph.nodes}
    allowed = {n for n, k in kinds.items()
               if k in LOSSLESS or (k in LOSSY and n in lossy and _fills_a_group(base, n))}
    parent = {n: n for n in allowed}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    triples = [t for t in fusable(gm) if set(t) <= allowed]
    for bn, relu, _ in triples:  # one op keeps one copy for all three: taken or left together
        parent[root(bn)] = root(relu)
    freed: dict[str, int] = {}
    for tensor in saved_tensors(base):
        if not tensor.held_by or not set(tensor.held_by) <= allowed:
            continue
        first = root(tensor.held_by[0])
        for other in tensor.held_by[1:]:
            parent[root(other)] = first
        freed[first] = freed.get(first, 0) + tensor.nbytes
    totals: dict[str, int] = {}
    for n, b in freed.items():
        totals[root(n)] = totals.get(root(n), 0) + b
    order = [n.name for n in gm.graph.nodes]
    members: dict[str, list[str]] = {}
    for name in order:
        if name in allowed and root(name) in totals:
            members.setdefault(root(name), []).append(name)
    found = [Group(tuple(ns), tuple(kinds[n] for n in ns), totals[r], tuple(t for t in triples if set(t) <= set(ns)))
             for r, ns in members.items()]
    return sorted(found, key=lambda g: order.index(g.nodes[0]))


def _fills_a_group(base: Costs, name: str) -> bool:
    """Whether the input of lossy node `name` has at least GROUP values per channel at
    the example batch. A shorter channel is padded to a whole row (16 values: 40 bytes
    at 4 bits against 64 in float32; 4, a Linear's input at batch 4: 40 against 16), and
    a BatchNorm's input quantized over so few values errs the most (MobileNetV2's last
    2x2 stage at batch 4: gradient cosine 0.982 with it, see the README)."""
    cost = base.by_name.get(name)
    if cost is None or not cost.inputs or cost.inputs[0][0] not in base.by_name:
        return True
    source, index = cost.inputs[0]
    shape = [int(size) for size in base.by_name[source].shapes[index]]
    return math.prod(shape) // (shape[1] if len(shape) > 1 else 1) >= compressed_ops.GROUP


def fusable(gm: fx.GraphModule) -> list[tuple[str, str, str]]:
    """(batch_norm, relu, consumer) module calls where the BatchNorm's output goes only
    to the ReLU and the ReLU's only to the consumer (a convolution or Linear): compressed
    together, they run as one op that keeps one quantized copy of the BatchNorm's input
    and a 1-bit mask (`compressed_ops.norm_relu_call`), where apart they keep a copy of
    the BatchNorm's input, a mask and a copy of the ReLU's output."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or kind(gm, node) not in ("conv", "linear"):
            continue
        relu = node.args[0]
        if not isinstance(relu, fx.Node) or kind(gm, relu) != "relu" or list(relu.users) != [node]:
            continue
        bn = relu.args[0]
        if (isinstance(bn, fx.Node) and bn.op == "call_module" and kind(gm, bn) == "batch_norm"
                and list(bn.users) == [relu]):
            found.append((bn.name, relu.name, node.name))
    return found


def lossy_nodes(gm: fx.GraphModule) -> list[str]:
    """The nodes of lossy kinds (conv, linear, training-mode batch_norm, group_norm,
    instance_norm, layer_norm, prelu)."""
    return [n.name for n in gm.graph.nodes if kind(gm, n) in LOSSY]


def _activation_input(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def _forkable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` can run in one `compressed_ops.convs` op with other convolutions
    of its input: a call of a zero-padded convolution module with groups 1."""
    if node.op != "call_module" or kind(gm, node) != "conv":
        return False
    module = gm.get_submodule(node.target)
    return module.groups == 1 and not module.transposed


def _sum_into(gm: fx.GraphModule, node: fx.Node, chosen: dict[str, str]) -> int | None:
    """Which argument of the sum `node` it may write over: one made by a BatchNorm
    compressed lossy (its backward keeps a copy of its input, never its output) that
    only this sum reads (`compressed_ops.add_into` checks shapes and dtypes as it runs);
    None if neither."""
    if node.op != "call_function" or node.target not in (operator.add, torch.add) or node.kwargs or len(node.args) != 2:
        return None
    for index, arg in enumerate(node.args):
        if (isinstance(arg, fx.Node) and arg.name in chosen and kind(gm, arg) == "batch_norm"
                and list(arg.users) == [node]):
            return index
    return None


def _overwritable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether BatchNorm `node` may write its output over its input: the input is a
    convolution's or Linear's output (their backward keeps their input, never their
    output) that only this node reads."""
    source = _activation_input(node)
    if not isinstance(source, fx.Node) or list(source.users) != [node]:
        return False
    if source.op == "call_module":
        return isinstance(gm.get_submodule(source.target), (nn.modules.conv._ConvNd, nn.Linear))
    return kind(gm, source) in ("conv", "linear")


def calibrate_bits(gm: fx.GraphModule, inputs: tuple, error: float) -> dict[str, int]:
    """For each lossy node, the fewest bits (of BITS) whose worst-case rounding error,
    |x~ - x| < the group's scale, stays under `error` x max|x| on the example inputs;
    nodes that would need more than 8 bits are left out. The caller restores the
    model's state (BatchNorm statistics move)."""
    chosen: dict[str, int] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            if node.op in ("call_module", "call_function") and kind(gm, node) in LOSSY:
                x = self.env.get(_activation_input(node))
                if isinstance(x, torch.Tensor) and x.numel():
                    bits = bits_for(x, error)
                    if bits is not None:
                        chosen[node.name] = bits
            return super().run_node(node)

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return chosen


def _own_parameters(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    if node.op == "call_module":
        return [p for p in gm.get_submodule(node.target).parameters() if p.requires_grad]
    attrs = [operator.attrgetter(a.target)(gm) for a in node.all_input_nodes if a.op == "get_attr"]
    return [p for p in attrs if isinstance(p, torch.Tensor) and p.requires_grad]


def sensitivity(gm: fx.GraphModule, forms: dict[str, str], inputs: tuple, loss_fn) -> dict[str, float]:
    """Per lossy node of `forms`, the share of the gradient's squared error that falls on
    its own parameters when every node of `forms` is compressed so, measured by one
    exact and one compressed training step on `inputs` (the gradient error its
    quantized input causes). The caller restores the model's state."""

    def gradients(module) -> dict[int, torch.Tensor]:
        params = [p for p in gm.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        torch.manual_seed(0)
        loss_fn(module(*inputs)).backward()
        return {id(p): p.grad.detach().clone() for p in params if p.grad is not None}

    exact = gradients(gm)
    approximate = gradients(rewrite(gm, forms))
    total = sum(float(g.square().sum()) for g in exact.values()) or 1.0
    shares: dict[str, float] = {}
    for node in gm.graph.nodes:
        if node.name in forms and forms[node.name] != "lossless":
            errors = [float((approximate[id(p)] - exact[id(p)]).square().sum())
                      for p in _own_parameters(gm, node) if id(p) in exact and id(p) in approximate]
            shares[node.name] = sum(errors) / total
    return shares


def bits_for(x: torch.Tensor, error: float) -> int | None:
    """The fewest bits that keep `x`'s rounding error under `error` x max|x|."""
    rows = compressed_ops.grouped(x.detach())  # the groups `quantize` makes
    lowest, highest = rows.amin(1), rows.amax(1)
    largest = float(x.detach().abs().max())
    for bits in sorted(BITS):  # the step `quantize` takes, its bfloat16 rounding included
        _, scale = compressed_ops.group_range(lowest, highest, 2**bits - 1)
        if float(scale.float().max()) <= error * largest:
            return bits
    return None


def form_of(kind_: str, bits: int | None) -> str:
    """How the plan names a compressed node: "lossless", or "4-bit" and the like."""
    return "lossless" if kind_ in LOSSLESS else f"{bits}-bit"


def _bits(form: str) -> int | None:
    if form == "lossless":
        return None
    try:
        bits = int(form.split("-")[0])
    except ValueError:
        bits = -1
    if bits not in BITS:
        raise ValueError(f"compress form {form!r} is not 'lossless' or one of {[f'{b}-bit' for b in BITS]}")
    return bits


def apply(gm: fx.GraphModule, decisions: list[Decision]) -> fx.GraphModule:
    """`rewrite` as `decisions` say: each group's nodes in the forms of its detail."""
    return rewrite(gm, {n: form for d in decisions for n, form in zip(d.nodes, d.detail, strict=True)})


def rewrite(gm: fx.GraphModule, chosen: dict[str, str]) -> fx.GraphModule:
    """A new GraphModule where each node named in `chosen` (node -> form, see `form_of`)
    runs as its compressed op. `gm` is not modified; parameters are shared."""
    from rewriter.passes.recompute import adopt_structure

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    new = adopt_structure(fx.GraphModule(gm, fx.Graph(), class_name=type(gm).__name__), gm)
    present = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in chosen if n not in present or kind(gm, present[n]) is None]
    if missing:
        raise ValueError(f"compress: nodes {missing} are not compressible nodes of this graph")
    fused = {consumer: (bn, relu) for bn, relu, consumer in fusable(gm) if {bn, relu, consumer} <= set(chosen)}
    skipped = {n for pair in fused.values() for n in pair}  # run inside their consumer's fused op
    readers: dict[tuple[fx.Node, int], list[str]] = {}  # lossy ops reading one tensor at one width
    for node in gm.graph.nodes:
        if node.name in chosen and node.name not in fused and node.name not in skipped and kind(gm, node) in LOSSY:
            readers.setdefault((_activation_input(node), _bits(chosen[node.name])), []).append(node.name)
    shared = {name: key for key, names in readers.items() if len(names) > 1 for name in names}
    forks = {names[0]: names for names in readers.values()
             if len(names) > 1 and all(_forkable(gm, present[n]) for n in names)}
    forked = {n for names in forks.values() for n in names[1:]}  # made by the first reader's op
    copies: dict[tuple[fx.Node, int], fx.Node] = {}
    for node in gm.graph.nodes:
        if node.name not in chosen:
            into = _sum_into(gm, node, chosen)
            if into is None:
                env[node] = graph.node_copy(node, lambda n: env[n])
            else:
                args = fx.node.map_arg((node.args[into], node.args[1 - into]), lambda n: env[n])
                env[node] = graph.create_node("call_function", compressed_ops.add_into, args, name=node.name)
            continue
        found = kind(gm, node)
        bits = _bits(chosen[node.name])
        if (bits is None) != (found in LOSSLESS):
            raise ValueError(f"compress: node {node.name!r} ({found}) cannot be compressed {chosen[node.name]!r}")
        if node.name in skipped or node.name in forked:
            continue
        if node.name in forks:  # convolutions of one tensor: one op, one copy, one input gradient
            names = forks[node.name]
            owners = tuple(graph.create_node("get_attr", present[n].target, name=fresh_name(f"{n}_module", present))
                           for n in names)
            call = graph.create_node("call_function", compressed_ops.convs, (owners, env[_activation_input(node)]),
                                     {"bits": bits}, name=node.name)
            call.meta["rewriter"] = {"strategy": "compress", "form": chosen[node.name], "convolutions": names}
            for k, n in enumerate(names):
                name = fresh_name(f"{n}_out", present) if k == 0 else n
                env[present[n]] = graph.create_node("call_function", operator.getitem, (call, k), name=name)
                env[present[n]].meta["rewriter"] = {"strategy": "compress", "form": chosen[n]}
            continue
        if node.name in fused:
            bn, relu = (present[n] for n in fused[node.name])
            owners = [graph.create_node("get_attr", m.target, name=fresh_name(f"{m.name}_module", present)) for m in (bn, node)]
            widest = max(bits, _bits(chosen[bn.name]))  # one copy serves both: the finer width
            call = graph.create_node("call_function", compressed_ops.norm_relu_call, (*owners, env[bn.args[0]]),
                                     {"bits": widest}, name=node.name)
            call.meta["rewriter"] = {"strategy": "compress", "form": f"{widest}-bit", "fused": (bn.name, relu.name)}
            env[node] = call
            continue
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        extra = {"bits": bits} if bits else {}
        if node.name in shared:  # one quantized copy for every lossy reader of this tensor
            key = source, width = shared[node.name]
            if key not in copies:
                copies[key] = graph.create_node("call_function", compressed_ops.shared_copy, (env[source], width),
                                                name=fresh_name(f"{source.name}_copy", present))
            extra["copy"] = copies[key]
        elif found == "batch_norm" and _overwritable(gm, node):
            extra["overwrite"] = True
        if node.op == "call_module":
            owner = graph.create_node("get_attr", node.target, name=fresh_name(f"{node.name}_module", present))
            call = graph.create_node("call_function", compressed_ops.module_call, (owner, *args), extra, name=node.name)
        elif node.op == "call_method":
            call = graph.create_node("call_function", compressed_ops.relu, args, {"inplace": node.target == "relu_"}, name=node.name)
        else:
            if node.target is torch.relu_:
                kwargs = {**kwargs, "inplace": True}
            if found == "dropout":
                kwargs = {k: v for k, v in kwargs.items() if k not in ("training", "inplace")}
                args = args[:2]
            if found in _MAX_POOLS:
                kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
                args = args[:6]
            call = graph.create_node("call_function", _COMPRESSED[found], args, {**kwargs, **extra}, name=node.name)
        call.meta["rewriter"] = {"strategy": "compress", "form": chosen[node.name]}
        env[node] = call
    new.graph = graph
    new.recompile()
    return new

