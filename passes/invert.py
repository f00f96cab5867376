"""Invert: rebuild the tensors a chain of layers saves from the chain's own output.

A chain is a run of invertible units, each one tensor in and one tensor out, whose
values are used only by the next unit:

- elementwise bijections: leaky_relu and PReLU with slope > 0, ELU, `x * a + b` with
  scalars (a != 0);
- BatchNorm in training mode: its input is rebuilt from its output and the batch mean
  and inverse std the forward computed (In-Place ABN);
- lossless rearrangements: view/reshape/flatten, permute, pixel_shuffle/unshuffle;
- fork-joins: `chunk` or `split` into pieces, elementwise units on each piece, `cat`
  of the pieces back along the same dimension;
- additive couplings `x1, x2 = chunk(x)`, `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`,
  `cat(y1, y2)`, found as a pattern on the graph (the RevNet trick): x2 = y2 - G(y1),
  x1 = y1 - F(x2).

`apply` replaces each chosen chain by one `InvertChain` call, an autograd Function
that saves the chain's output only (and per-channel statistics). Its backward walks
the units in reverse: rebuild the unit's input from its output, rerun the unit from
it, backpropagate through that one unit. A stack of couplings so keeps memory flat in
depth. BatchNorm running statistics are restored around the reruns (updated once).

Rebuilding amplifies rounding error: 1/slope for leaky_relu, std/|gamma| for
BatchNorm, ... `Unit.factor`; a rebuilt tensor's error grows by the product of the
factors of the units after it. `chains` cuts chains where that product would pass
`MAX_AMPLIFICATION` (the tensor at the cut is kept exactly: an anchor). Factors that
depend on values (BatchNorm's std, PReLU's slope, ELU's range) come from one forward
pass on the example inputs (`calibrate`) and are checked again at run time: a chain
whose factors have grown past the bound keeps its input instead, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules.batchnorm import _BatchNorm

from passes.recompute import _RestoreBatchNormStats, _mutates_an_input

__all__ = ["Unit", "Chain", "InvertChain", "chains", "chain_between", "calibrate", "apply", "MAX_AMPLIFICATION"]

log = logging.getLogger(__name__)

MAX_AMPLIFICATION = 100.0  # fp32 rounding (6e-8) x 100 stays well inside a 1e-4 gradient tolerance
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RESHAPES = {"view", "reshape", "flatten"}
_ARITHMETIC = {operator.mul: "mul", torch.mul: "mul", operator.add: "add", torch.add: "add",
               operator.sub: "sub", torch.sub: "sub", operator.truediv: "div", torch.div: "div"}
_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class Unit:
    """One invertible step: graph `nodes` reading the tensor made by node `input`,
    ending in `output`. `kind` says how to invert it; `arg` its constant (slope,
    alpha, scalar, dims); `f`, `g`: a coupling's two functions' nodes; `factor`: the
    error amplification of its inverse."""

    kind: str
    nodes: tuple[str, ...]
    input: str
    output: str
    arg: tuple = ()
    f: tuple[str, ...] = ()
    g: tuple[str, ...] = ()
    factor: float = 1.0
    branches: tuple[tuple["Unit", ...], ...] = ()  # a fork-join's elementwise units per piece


@dataclass(frozen=True)
class Chain:
    units: tuple[Unit, ...]

    @property
    def input(self) -> str:
        return self.units[0].input

    @property
    def output(self) -> str:
        return self.units[-1].output

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n for u in self.units for n in u.nodes)

    @property
    def amplification(self) -> float:
        """The error growth of the chain's first rebuilt tensor (the largest)."""
        return math.prod(u.factor for u in self.units)

    def saves_anything(self) -> bool:
        """Whether eager autograd saves a tensor inside the chain (else inverting gains nothing)."""
        return any(u.kind not in ("rearrange", "affine", "fork_join") or any(b for b in u.branches) for u in self.units)


# ---- recognising units --------------------------------------------------------------------
def _tensor_input(node: fx.Node) -> fx.Node | None:
    inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
    return inputs[0] if len(inputs) == 1 else None


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> tuple[str, tuple] | None:
    """(kind, constant) for a single-node invertible unit, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.LeakyReLU) and module.negative_slope > 0:
            return "leaky_relu", (float(module.negative_slope),)
        if isinstance(module, nn.ELU) and module.alpha > 0:
            return "elu", (float(module.alpha),)
        if isinstance(module, nn.PReLU):
            return "prelu", ()
        if type(module) in _BATCH_NORMS and module.training:
            return "batch_norm", ()
        if isinstance(module, nn.Flatten):
            return "rearrange", ("reshape",)
        if isinstance(module, nn.PixelShuffle):
            return "rearrange", ("pixel_shuffle", module.upscale_factor)
        if isinstance(module, nn.PixelUnshuffle):
            return "rearrange", ("pixel_unshuffle", module.downscale_factor)
        return None
    if node.op == "call_function":
        if node.target is F.leaky_relu:
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return ("leaky_relu", (float(slope),)) if isinstance(slope, (int, float)) and slope > 0 else None
        if node.target is F.elu:
            alpha = node.args[1] if len(node.args) > 1 else node.kwargs.get("alpha", 1.0)
            return ("elu", (float(alpha),)) if isinstance(alpha, (int, float)) and alpha > 0 else None
        if node.target in _ARITHMETIC and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            op = _ARITHMETIC[node.target]
            if isinstance(a, fx.Node) and isinstance(b, (int, float)):
                if op in ("mul", "div") and b == 0:
                    return None
                return "affine", (op, float(b), "left")
            if isinstance(b, fx.Node) and isinstance(a, (int, float)) and op in ("mul", "add", "sub"):
                if op == "mul" and a == 0:
                    return None
                return "affine", (op, float(a), "right")
            return None
        if node.target in (torch.flatten, torch.reshape):
            return "rearrange", ("reshape",)
        if node.target is torch.permute:
            return "rearrange", ("permute",)
        if node.target in (F.pixel_shuffle, torch.pixel_shuffle):
            return "rearrange", ("pixel_shuffle", node.args[1])
        if node.target in (F.pixel_unshuffle, torch.pixel_unshuffle):
            return "rearrange", ("pixel_unshuffle", node.args[1])
        return None
    if node.op == "call_method":
        if node.target in _RESHAPES:
            return "rearrange", ("reshape",)
        if node.target == "permute":
            return "rearrange", ("permute",)
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _closure(start: fx.Node, end: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node] | None:
    """The nodes on paths from `start` to `end` (exclusive of `start`), when they read
    nothing but `start`, parameters and each other, and feed nothing but each other and
    `end`'s users; else None."""
    members, stack = set(), [end]
    while stack:
        node = stack.pop()
        if node in members or node is start:
            continue
        if node.op not in ("call_module", "call_function", "call_method") or order[node] <= order[start]:
            return None
        members.add(node)
        stack.extend(a for a in node.all_input_nodes if a.op != "get_attr")
    for node in members:
        if node is not end and any(u not in members for u in node.users):
            return None
    return sorted(members, key=order.get)


def _coupling(gm: fx.GraphModule, chunk: fx.Node, order: dict[fx.Node, int]) -> Unit | None:
    """The coupling that starts at `chunk` (chunk(x, 2, dim=1)), or None."""
    is_chunk = (chunk.op == "call_function" and chunk.target is torch.chunk) or (chunk.op == "call_method" and chunk.target == "chunk")
    if not is_chunk:
        return None
    chunks = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    if chunks != 2 or dim != 1 or len(chunk.users) != 2:
        return None
    parts = {u.args[1]: u for u in chunk.users if u.op == "call_function" and u.target is operator.getitem}
    if set(parts) != {0, 1}:
        return None
    x1, x2 = parts[0], parts[1]

    def adds(a: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
        """(the add, its other operand) for each `a + other` among a's users."""
        found = []
        for user in a.users:
            if user.op == "call_function" and user.target in (operator.add, torch.add) and len(user.args) == 2 and not user.kwargs:
                other = user.args[1] if user.args[0] is a else user.args[0]
                if isinstance(other, fx.Node) and other is not a:
                    found.append((user, other))
        return found

    if len(x1.users) != 1:
        return None
    for y1, f_out in adds(x1):
        f_nodes = _closure(x2, f_out, order)
        if f_nodes is None:
            continue
        for y2, g_out in adds(x2):
            g_nodes = _closure(y1, g_out, order)
            if g_nodes is None or len(x2.users) != 2 or len(y1.users) != 2:
                continue
            cat = _only_user(y2)
            if cat is None or cat.target is not torch.cat or cat not in y1.users:
                continue
            tensors = cat.args[0]
            cat_dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
            if list(tensors) != [y1, y2] or cat_dim != 1:
                continue
            modules = [gm.get_submodule(n.target) for n in f_nodes + g_nodes if n.op == "call_module"]
            if any(isinstance(m, _RANDOM_MODULES) or not _traceable_rerun(m) for m in modules):
                continue
            if any(_mutates_an_input(gm, n) and n.all_input_nodes[0] in (x2, y1) for n in f_nodes + g_nodes):
                continue
            nodes = sorted([chunk, x1, x2, *f_nodes, y1, *g_nodes, y2, cat], key=order.get)
            return Unit("coupling", tuple(n.name for n in nodes), chunk.args[0].name, cat.name,
                        f=tuple(n.name for n in f_nodes), g=tuple(n.name for n in g_nodes))
    return None


def _fork_join(gm: fx.GraphModule, split: fx.Node, factors: dict[str, float]) -> Unit | None:
    """The fork-join that starts at `split` (chunk or split), or None: each piece runs
    through elementwise units used once, and one `cat` joins the pieces in order along
    the dimension they were cut on."""
    if split.op == "call_function" and split.target in (torch.chunk, torch.split):
        how = "chunk" if split.target is torch.chunk else "split"
    elif split.op == "call_method" and split.target in ("chunk", "split"):
        how = split.target
    else:
        return None
    size = split.args[1] if len(split.args) > 1 else split.kwargs.get("chunks" if how == "chunk" else "split_size_or_sections")
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(size, (int, list, tuple)) or not isinstance(dim, int) or not isinstance(split.args[0], fx.Node):
        return None
    pieces = {u.args[1]: u for u in split.users if u.op == "call_function" and u.target is operator.getitem}
    if len(pieces) != len(split.users) or set(pieces) != set(range(len(pieces))):
        return None
    branches, ends, nodes = [], [], [split]
    for index in range(len(pieces)):
        value, branch = pieces[index], []
        nodes.append(value)
        while len(value.users) == 1:
            user = next(iter(value.users))
            found = _elementwise(gm, user)
            if found is None or found[0] == "rearrange" or _tensor_input(user) is not value or _mutates_an_input(gm, user):
                break
            unit = Unit(found[0], (user.name,), value.name, user.name, found[1])
            branch.append(dataclasses.replace(unit, factor=factors.get(user.name, _static_factor(unit))))
            nodes.append(user)
            value = user
        branches.append(tuple(branch))
        ends.append(value)
    join = next(iter(ends[0].users)) if len(ends[0].users) == 1 else None
    if join is None or join.op != "call_function" or join.target is not torch.cat:
        return None
    join_dim = join.args[1] if len(join.args) > 1 else join.kwargs.get("dim", 0)
    if list(join.args[0]) != ends or join_dim != dim or any(len(e.users) != 1 for e in ends):
        return None
    factor = max((math.prod(u.factor for u in branch) for branch in branches), default=1.0)
    return Unit("fork_join", tuple(n.name for n in nodes + [join]), split.args[0].name, join.name,
                (how, size, dim), factor=factor, branches=tuple(branches))


def _traceable_rerun(module: nn.Module) -> bool:
    return not any(isinstance(m, _RANDOM_MODULES) for m in module.modules())


def chains(gm: fx.GraphModule, opaque: tuple[str, ...] = (), factors: dict[str, float] | None = None,
           bound: float = MAX_AMPLIFICATION) -> list[Chain]:
    """Candidate chains, disjoint, in graph order: maximal runs of units, each unit's
    output used by the next unit only, cut where the product of the units' factors
    (`factors`, node -> factor, from `calibrate`; value-free factors otherwise) passes
    `bound`. Chains that change a tensor in place, whose output a later node
    changes in place, or that save nothing in eager, are left out."""
    factors = factors or {}
    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method", "placeholder")]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    units: dict[fx.Node, Unit] = {}  # by the node whose output the unit reads
    taken: set[fx.Node] = set()
    for node in nodes:
        if node in taken or node.op == "placeholder" or (node.op == "call_module" and node.target in opaque):
            continue
        unit = _coupling(gm, node, order) or _fork_join(gm, node, factors)
        if unit is None:
            found = _elementwise(gm, node)
            source = _tensor_input(node)
            if found is None or source is None or _mutates_an_input(gm, node):
                continue
            kind, arg = found
            unit = Unit(kind, (node.name,), source.name, node.name, arg)
        by_name = {n.name: n for n in gm.graph.nodes}
        taken.update(by_name[n] for n in unit.nodes)
        factor = unit.factor if unit.kind == "fork_join" else factors.get(unit.output, _static_factor(unit))
        units[by_name[unit.input]] = dataclasses.replace(unit, factor=factor)
    by_name = {n.name: n for n in gm.graph.nodes}
    mutated = {n.all_input_nodes[0] for n in gm.graph.nodes if n.op != "placeholder" and n.all_input_nodes and _mutates_an_input(gm, n)}
    starts = [u for u in units.values() if not any(o.output == u.input for o in units.values())
              or len(by_name[u.input].users) != 1]
    found: list[Chain] = []
    for unit in sorted(starts, key=lambda u: order[by_name[u.output]]):
        run = [unit]
        while True:
            out = by_name[run[-1].output]
            nxt = units.get(out)
            if nxt is None or len(out.users) != 1 or out in mutated:
                break
            run.append(nxt)
        piece: list[Unit] = []
        for u in run:  # cut where the product of factors would pass the bound
            if u.factor > bound:
                _close(piece, found, by_name, mutated)
                piece = []
                continue
            if piece and math.prod(p.factor for p in piece) * u.factor > bound:
                _close(piece, found, by_name, mutated)
                piece = []
            piece.append(u)
        _close(piece, found, by_name, mutated)
    return sorted(found, key=lambda c: order[by_name[c.output]])


def chain_between(candidates: list[Chain], first: str, last: str) -> Chain:
    """The run of units of one of `candidates` from the unit reading node `first` to
    the unit ending in node `last` (a stored plan's chain, cut from maximal ones)."""
    for chain in candidates:
        starts = [i for i, u in enumerate(chain.units) if u.input == first]
        ends = [i for i, u in enumerate(chain.units) if u.output == last]
        if starts and ends and starts[0] <= ends[0]:
            return Chain(chain.units[starts[0]:ends[0] + 1])
    raise KeyError(f"no invertible chain runs from node {first!r} to node {last!r} in this graph")


def _close(piece: list[Unit], found: list[Chain], by_name, mutated) -> None:
    if not piece:
        return
    chain = Chain(tuple(piece))
    if chain.saves_anything() and by_name[chain.output] not in mutated:
        found.append(chain)


def _static_factor(unit: Unit) -> float:
    if unit.kind == "leaky_relu":
        return max(1.0, 1.0 / unit.arg[0])
    if unit.kind == "affine":
        op, value, _ = unit.arg
        return max(1.0, 1.0 / abs(value)) if op == "mul" else max(1.0, abs(value)) if op == "div" else 1.0
    return 1.0  # rearrangements, couplings (errors add, not multiply); value-dependent ones: calibrate


# ---- factors from values -----------------------------------------------------------------
def _runtime_factor(kind: str, module: nn.Module | None, inp: torch.Tensor, out: torch.Tensor, arg: tuple) -> float:
    """The error amplification of rebuilding `inp` from `out`."""
    if kind == "batch_norm":
        dims = [d for d in range(inp.dim()) if d != 1]
        std = torch.sqrt(inp.detach().var(dim=dims, unbiased=False) + module.eps)
        if module.weight is None:
            return float(std.max().clamp(min=1.0))
        ratio = std / module.weight.detach().abs().clamp(min=1e-30)
        return float(ratio.max().clamp(min=1.0))
    if kind == "prelu":
        weight = module.weight.detach()
        return math.inf if bool((weight <= 0).any()) else float((1.0 / weight).max().clamp(min=1.0))
    if kind == "elu":
        alpha = arg[0]
        lowest = float(out.detach().min()) if out.numel() else 0.0
        return max(1.0, alpha / max(lowest + alpha, 1e-30))
    return 1.0


def calibrate(gm: fx.GraphModule, inputs: tuple) -> dict[str, float]:
    """Value-dependent factors (node -> factor) from one no-grad forward of `gm` on
    `inputs`. The caller restores the model's state (BatchNorm statistics move)."""
    factors: dict[str, float] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            found = _elementwise(gm, node) if node.op != "placeholder" else None
            if found and found[0] in ("batch_norm", "prelu", "elu") and isinstance(result, torch.Tensor):
                module = gm.get_submodule(node.target) if node.op == "call_module" else None
                inp = self.env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
                if inp is not None:
                    factors[node.name] = _runtime_factor(found[0], module, inp, result, found[1])
            return result

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return factors


# ---- running a chain -----------------------------------------------------------------------
def _subgraph(gm: fx.GraphModule, names: tuple[str, ...], inputs: list[str], output: str) -> fx.GraphModule:
    """A GraphModule over gm's submodules running `names`, reading `inputs`, returning `output`."""
    graph = fx.Graph()
    by_name = {n.name: n for n in gm.graph.nodes}
    env = {by_name[name]: graph.placeholder(name) for name in inputs}
    for node in gm.graph.nodes:
        if node.name not in names:
            continue
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":
                env[arg] = graph.get_attr(arg.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[by_name[output]])
    return fx.GraphModule(gm, graph, class_name="Unit")


class _Step:
    """A unit, ready to run: `code(x)` its forward; `inverse(out, info)` its input."""

    def __init__(self, unit: Unit, code, modules: list[nn.Module], module: nn.Module | None = None,
                 inplace: bool = False, f=None, g=None, inverse_dims: tuple[int, ...] | None = None,
                 branches: list[list["_Step"]] | None = None):
        """`code` runs the unit (a GraphModule over the owner's submodules, or any
        callable: an exported module's method); `modules`, the submodules it calls;
        `module`, the one whose weights the inverse reads (BatchNorm, PReLU); `f`, `g`:
        a coupling's functions; `inverse_dims`: the permutation undoing a permute;
        `branches`: a fork-join's steps per piece."""
        self.unit, self.code, self.modules, self.module = unit, code, modules, module
        self.inplace, self.f, self.g, self.inverse_dims = inplace, f, g, inverse_dims
        self.branches = branches or []

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, unit: Unit) -> "_Step":
        by_name = {n.name: n for n in gm.graph.nodes}
        node = by_name[unit.output]
        modules = list({id(m): m for m in (gm.get_submodule(by_name[n].target) for n in unit.nodes
                                           if by_name[n].op == "call_module")}.values())
        module = gm.get_submodule(node.target) if node.op == "call_module" and unit.kind != "coupling" else None
        inplace = any(_mutates_an_input(gm, by_name[n]) for n in unit.nodes)
        f = g = inverse_dims = None
        if unit.kind == "coupling":
            chunk = by_name[unit.nodes[0]]
            x2 = next(u for u in chunk.users if u.args[1] == 1)
            y1 = next(by_name[n] for n in unit.nodes if by_name[n].target in (operator.add, torch.add) and x2 not in by_name[n].args)
            f_out = next(a for a in y1.args if a.name in unit.f)
            g_out = next(a for u in x2.users if u.name in unit.nodes and u.target in (operator.add, torch.add) for a in u.args if a is not x2)
            f = _subgraph(gm, unit.f, [x2.name], f_out.name)
            g = _subgraph(gm, unit.g, [y1.name], g_out.name)
        if unit.kind == "rearrange" and unit.arg[0] == "permute":
            dims = node.args[1:] if node.op == "call_method" else node.args[1]
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            inverse_dims = tuple(sorted(range(len(dims)), key=lambda i: dims[i]))
        branches = [[cls.from_graph(gm, u) for u in branch] for branch in unit.branches]
        code = _subgraph(gm, unit.nodes, [unit.input], unit.output)
        return cls(unit, code, modules, module, inplace, f, g, inverse_dims, branches)

    def _cut(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A fork-join's pieces of `tensor` (its input, output or gradient), as its split makes them."""
        how, size, dim = self.unit.arg
        return torch.chunk(tensor, size, dim) if how == "chunk" else torch.split(tensor, size, dim)

    def _branch_infos(self, info: tuple) -> list[list[tuple]]:
        """A fork-join's flat `info`, per branch and step (BatchNorm keeps two tensors)."""
        rest, found = list(info), []
        for branch in self.branches:
            found.append([])
            for step in branch:
                count = 2 if step.unit.kind == "batch_norm" else 0
                found[-1].append(tuple(rest[:count]))
                rest = rest[count:]
        return found

    def parameters(self) -> list[nn.Parameter]:
        found = {id(p): p for m in self.modules for p in m.parameters()}
        if isinstance(self.code, nn.Module):  # parameters a function reads through get_attr
            found.update({id(p): p for p in self.code.parameters()})
        return [p for p in found.values() if p.requires_grad]

    def norms(self) -> list[nn.Module]:
        return [m for m in self.modules if isinstance(m, _BatchNorm)]

    def forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The unit's output, and what its backward needs beyond the output: a
        BatchNorm's batch mean and inverse std, from the same kernel and with the same
        running-statistics update as `nn.BatchNorm` itself."""
        if self.unit.kind == "fork_join":
            outs, infos = [], []
            for branch, piece in zip(self.branches, self._cut(inp)):
                for step in branch:
                    piece, info = step.forward(piece)
                    infos.extend(info)
                outs.append(piece)
            return torch.cat(outs, self.unit.arg[2]), tuple(infos)
        if self.unit.kind != "batch_norm":
            return self.code(inp), ()
        bn = self.module
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # a cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        out, mean, invstd = torch.native_batch_norm(
            inp, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, momentum, bn.eps)
        return out, (mean, invstd)

    def backward(self, out: torch.Tensor, grad: torch.Tensor, info: tuple, shape: torch.Size, rebuild: bool):
        """From the unit's output alone: the gradient of its input, its parameters'
        gradients [(parameter, gradient)], and (if `rebuild`) its input."""
        kind, arg = self.unit.kind, self.unit.arg
        if kind == "fork_join":  # each piece back through its branch, then joined again
            grads, inputs, pairs = [], [], []
            for branch, piece, piece_grad, infos in zip(self.branches, self._cut(out), self._cut(grad), self._branch_infos(info)):
                for j in reversed(range(len(branch))):
                    piece_grad, found, rebuilt = branch[j].backward(piece, piece_grad, infos[j], piece.shape, rebuild=j > 0 or rebuild)
                    pairs += found
                    piece = rebuilt
                grads.append(piece_grad)
                inputs.append(piece)
            dim = arg[2]
            return torch.cat(grads, dim), pairs, torch.cat(inputs, dim) if rebuild else None
        if kind == "leaky_relu":  # PyTorch's own kernels, each one pass
            grad_in = torch.ops.aten.leaky_relu_backward(grad, out, arg[0], True)
            return grad_in, [], F.leaky_relu(out, 1.0 / arg[0]) if rebuild else None
        if kind == "elu":
            grad_in = torch.ops.aten.elu_backward(grad, arg[0], 1, 1, True, out)
            return grad_in, [], self.inverse(out, info, shape) if rebuild else None
        if kind == "prelu":
            inp = self.inverse(out, info, shape)
            weight = self.module.weight
            slope = weight.reshape(1, -1, *([1] * (out.dim() - 2))) if weight.numel() > 1 else weight
            grad_in = grad * slope
            torch.where(out > 0, grad, grad_in, out=grad_in)
            params = []
            if weight.requires_grad:
                contribution = grad * inp
                contribution.masked_fill_(out > 0, 0)
                dims = [d for d in range(out.dim()) if d != 1] if weight.numel() > 1 else list(range(out.dim()))
                params.append((weight, contribution.sum(dims).reshape(weight.shape)))
            return grad_in, params, inp
        if kind == "batch_norm":  # rebuild the input in one pass, then BatchNorm's own backward kernel
            inp = self.inverse(out, info, shape)
            bn, (mean, invstd) = self.module, info
            wanted = [True, bn.weight is not None and bn.weight.requires_grad, bn.bias is not None and bn.bias.requires_grad]
            grad_in, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad, inp, bn.weight, None, None, mean, invstd, True, bn.eps, wanted)
            params = [(p, g) for p, g in ((bn.weight, grad_weight), (bn.bias, grad_bias)) if g is not None]
            return grad_in, params, inp if rebuild else None
        # affine maps and rearrangements: the gradient goes back through the same linear map
        if kind == "affine":
            op, value, side = arg
            factor = value if op == "mul" else 1.0 / value if op == "div" else -1.0 if (op, side) == ("sub", "right") else 1.0
            grad_in = grad * factor if factor != 1.0 else grad
        else:
            grad_in = self.inverse(grad, info, shape)
        return grad_in, [], self.inverse(out, info, shape) if rebuild else None

    def coupling_backward(self, out: torch.Tensor, grad: torch.Tensor, rebuild: bool):
        """The RevNet backward: G then F each run once, with autograd, on rebuilt
        inputs; each one's graph freed before the next is built."""
        own = self.parameters()
        y1, y2 = torch.chunk(out, 2, dim=1)
        grad_y1, grad_y2 = torch.chunk(grad, 2, dim=1)
        with torch.enable_grad():
            leaf = y1.detach().requires_grad_()
            g = self.g(leaf)
            found_g = torch.autograd.grad(g, [leaf, *own], grad_y2, allow_unused=True)
        x2 = y2 - g.detach()
        del g, leaf
        grad_y1 = grad_y1 + found_g[0]
        with torch.enable_grad():
            leaf = x2.detach().requires_grad_()
            f = self.f(leaf)
            found_f = torch.autograd.grad(f, [leaf, *own], grad_y1, allow_unused=True)
        grad_in = torch.cat([grad_y1, grad_y2 + found_f[0]], dim=1)
        inp = torch.cat([y1 - f.detach(), x2], dim=1) if rebuild else None
        del f, leaf
        pairs = [(p, a if b is None else b if a is None else a + b) for p, a, b in zip(own, found_g[1:], found_f[1:])]
        return grad_in, pairs, inp

    def inverse(self, out: torch.Tensor, info: tuple, shape: torch.Size) -> torch.Tensor:
        kind, arg = self.unit.kind, self.unit.arg
        if kind == "leaky_relu":  # leaky_relu with the reciprocal slope
            return F.leaky_relu(out, 1.0 / arg[0])
        if kind == "elu":
            rebuilt = torch.log1p(out / arg[0])
            return torch.where(out > 0, out, rebuilt, out=rebuilt)
        if kind == "prelu":
            weight = self.module.weight
            weight = weight.reshape(1, -1, *([1] * (out.dim() - 2))) if weight.numel() > 1 else weight
            rebuilt = out / weight
            return torch.where(out > 0, out, rebuilt, out=rebuilt)
        if kind == "batch_norm":  # x = y / (gamma * invstd) + (mean - beta / (gamma * invstd))
            mean, invstd = info
            bn, view = self.module, (1, -1) + (1,) * (out.dim() - 2)
            scale = 1.0 / (invstd if bn.weight is None else bn.weight * invstd)
            shift = mean if bn.bias is None else mean - bn.bias * scale
            return torch.mul(out, scale.reshape(view)).add_(shift.reshape(view))  # (addcmul: no symbolic-shape meta)
        if kind == "affine":
            op, value, side = arg
            if op == "mul":
                return out / value
            if op == "div":
                return out * value
            if op == "add":
                return out - value
            return out + value if side == "left" else value - out  # x - b, or b - x
        if kind == "rearrange":
            if arg[0] == "reshape":
                return out.reshape(shape)
            if arg[0] == "permute":
                return out.permute(self.inverse_dims)
            if arg[0] == "pixel_shuffle":
                return F.pixel_unshuffle(out, arg[1])
            return F.pixel_shuffle(out, arg[1])
        if kind == "coupling":
            y1, y2 = torch.chunk(out, 2, dim=1)
            x2 = y2 - self.g(y1)
            x1 = y1 - self.f(x2)
            return torch.cat([x1, x2], dim=1)
        raise ValueError(f"unit kind {kind!r} has no inverse")

    def factor(self, out: torch.Tensor, info: tuple) -> torch.Tensor | float:
        """The error amplification of this step's inverse with the current values (a
        0-dim tensor where it depends on them)."""
        kind = self.unit.kind
        if kind == "fork_join":  # the worst piece; an ELU inside a branch keeps its calibrated factor
            worst = 1.0
            for branch, piece, infos in zip(self.branches, self._cut(out), self._branch_infos(info)):
                growth = 1.0
                for j, step in enumerate(branch):
                    growth = growth * (step.factor(piece, infos[j]) if step.unit.kind != "elu" or j == len(branch) - 1 else step.unit.factor)
                worst = torch.maximum(torch.as_tensor(worst, dtype=torch.float32), torch.as_tensor(growth, dtype=torch.float32))
            return worst
        if kind == "batch_norm":
            std = 1.0 / info[1]
            if self.module.weight is not None:
                std = std / self.module.weight.detach().abs()
            return std.max().clamp(min=1.0)
        if kind == "prelu":
            weight = self.module.weight.detach()
            return torch.where(weight > 0, 1.0 / weight, torch.full_like(weight, math.inf)).max().clamp(min=1.0)
        if kind == "elu":
            alpha = self.unit.arg[0]
            return (alpha / (out.detach().min() + alpha)).clamp(min=1.0)
        return self.unit.factor


class _InvertFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain: "InvertChain", x: torch.Tensor, *params):
        ctx.chain = chain
        infos, shapes, amplification, inp = [], [], 1.0, x
        for step in chain.steps:
            out, info = step.forward(inp)
            infos.append(info)
            shapes.append(inp.shape)
            amplification = amplification * step.factor(out, info)
            inp = out
        # values are unknown while the cost model traces on fake tensors: the plan's check holds
        fake = isinstance(out, FakeTensor)
        ctx.fallback = not fake and float(amplification) > MAX_AMPLIFICATION
        if ctx.fallback:
            log.warning("invert chain ending at %s: rebuilding would amplify rounding error %.3g-fold "
                        "(bound %g) with the current weights; its input is kept instead this step",
                        chain.steps[-1].unit.output, float(amplification), MAX_AMPLIFICATION)
            ctx.save_for_backward(x)
        else:
            ctx.save_for_backward(out, *(t for info in infos for t in info))
        ctx.counts = [len(info) for info in infos]
        ctx.shapes = shapes
        return out

    @staticmethod
    def backward(ctx, grad):
        chain: InvertChain = ctx.chain
        saved = ctx.saved_tensors
        params = chain.params
        param_grads: dict[int, torch.Tensor] = {}
        with _RestoreBatchNormStats(chain.stat_buffers()):
            if ctx.fallback:
                with torch.enable_grad():
                    leaf = saved[0].detach().requires_grad_()
                    value = leaf
                    for step in chain.steps:
                        value = step.code(value.clone() if step.inplace else value)
                    results = torch.autograd.grad(value, [leaf, *params], grad, allow_unused=True)
                return (None, results[0], *results[1:])
            out, rest = saved[0], list(saved[1:])
            infos = []
            for count in ctx.counts:
                infos.append(tuple(rest[:count]))
                rest = rest[count:]
            for index in reversed(range(len(chain.steps))):
                step = chain.steps[index]
                if step.unit.kind == "coupling":
                    grad, pairs, inp = step.coupling_backward(out, grad, rebuild=index > 0)
                    del out
                else:  # elementwise units: the gradient straight from the output
                    grad, pairs, inp = step.backward(out, grad, infos[index], ctx.shapes[index], rebuild=index > 0)
                    del out
                for p, g in pairs:
                    if g is not None:
                        param_grads[id(p)] = g if id(p) not in param_grads else param_grads[id(p)] + g
                out = inp
        return (None, grad, *(param_grads.get(id(p)) for p in params))


class InvertChain(nn.Module):
    """Runs a chain of invertible units, saving only its output for the backward.

    The units' code are GraphModules over the owner's submodules, kept out of the
    module tree (no parameter or state_dict key of their own)."""

    def __init__(self, steps: list[_Step]):
        super().__init__()
        object.__setattr__(self, "steps", steps)

    @property
    def params(self) -> list[nn.Parameter]:
        seen, found = set(), []
        for step in self.steps:
            for p in step.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    found.append(p)
        return found

    def code_parameters(self) -> list[nn.Parameter]:
        return self.params

    def stat_buffers(self) -> list[torch.Tensor]:
        return [b for step in self.steps for m in step.norms() for b in m.buffers()]

    def forward(self, x):
        # without autograd, or with BatchNorm in eval mode (the inverse needs batch
        # statistics), the units run as they are
        if not torch.is_grad_enabled() or not all(m.training for step in self.steps for m in step.norms()):
            for step in self.steps:
                x = step.code(x)
            return x
        return _InvertFunction.apply(self, x, *self.params)

    def extra_repr(self) -> str:
        return ", ".join(s.unit.kind for s in self.steps)


def apply(gm: fx.GraphModule, chosen: list[str], all_chains: list[Chain]) -> fx.GraphModule:
    """A new GraphModule where each chain whose output is in `chosen` runs as an
    InvertChain. `gm` is not modified; parameters are shared. Chains whose nodes are
    no longer in `gm` (inside a recomputed segment) are skipped."""
    from passes.recompute import adopt_structure

    present = {n.name for n in gm.graph.nodes}
    by_output = {c.output: c for c in all_chains if c.output in chosen and all(n in present for n in c.nodes)}
    member = {name: c for c in by_output.values() for name in c.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    new = adopt_structure(fx.GraphModule(gm, fx.Graph(), class_name=type(gm).__name__), gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    for count, chain in enumerate(by_output.values()):
        new.add_submodule(f"rewriter_invert_{count}", InvertChain([_Step.from_graph(gm, u) for u in chain.units]))
    targets = {c.output: f"rewriter_invert_{i}" for i, c in enumerate(by_output.values())}
    for node in gm.graph.nodes:
        chain = member.get(node.name)
        if chain is None:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        if node.name != chain.output:
            continue
        call = graph.create_node("call_module", targets[chain.output], (env[by_name[chain.input]],), name=chain.output)
        call.meta["rewriter"] = {"strategy": "invert", "nodes": chain.nodes}
        env[node] = call
    new.graph = graph
    new.recompile()
    return new
