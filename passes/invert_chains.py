"""Invert candidates: chains of invertible units found on a traced graph.

A chain is a run of units, each one tensor in and one tensor out, whose values are
used only by the next unit:

- elementwise bijections: leaky_relu and PReLU with slope > 0, ELU, `x * a + b` with
  scalars (a != 0);
- BatchNorm in training mode: its input is rebuilt from its output and the batch mean
  and inverse std the forward computed (In-Place ABN); InstanceNorm without running
  statistics and GroupNorm the same, from their per-sample statistics, and LayerNorm
  from its statistics per position (over the channels in a ConvNeXt block);
- dropout with p = 0 (MONAI's blocks hold one): the identity;
- lossless rearrangements: view/reshape/flatten, permute, pixel_shuffle/unshuffle;
- fork-joins: `chunk` or `split` into pieces, elementwise units on each piece, `cat`
  of the pieces back along the same dimension;
- additive couplings `x1, x2 = chunk(x)`, `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`,
  `cat(y1, y2)`, found as a pattern on the graph (the RevNet trick): x2 = y2 - G(y1),
  x1 = y1 - F(x2).

Rebuilding amplifies rounding error: 1/slope for leaky_relu, std/|gamma| for
BatchNorm, ... `Unit.factor`; a rebuilt tensor's error grows by the product of the
factors of the units after it. `chains` cuts chains where that product would pass
`MAX_AMPLIFICATION` (the tensor at the cut is kept exactly: an anchor). Factors that
depend on values (BatchNorm's std, PReLU's slope, ELU's range) come from one forward
pass on the example inputs (`calibrate`). `passes/invert.py` runs the chains.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from rewriter.cost_models.in_place import mutates_an_input as _mutates_an_input
from rewriter.passes.layers import computes_as

__all__ = ["Unit", "Chain", "chains", "chain_between", "calibrate", "calibration_probes", "MAX_AMPLIFICATION",
           "NORM_KINDS", "MOVING"]

MAX_AMPLIFICATION = 100.0  # fp32 rounding (6e-8) x 100 stays well inside a 1e-4 gradient tolerance
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
NORM_KINDS = ("batch_norm", "instance_norm", "group_norm", "layer_norm")  # units that keep (mean, inverse std) for backward
MOVING = (*NORM_KINDS, "prelu", "elu")  # units whose error factor depends on weights or values
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

    @property
    def can_fall_back(self) -> bool:
        """Whether training can move the chain's error factors past the bound (a unit in
        `MOVING`, a fork-join's branches included): then it keeps its input instead."""
        def moving(units) -> bool:
            return any(u.kind in MOVING or moving([v for branch in u.branches for v in branch]) for u in units)

        return moving(self.units)

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
        if computes_as(module) in _BATCH_NORMS and module.training:
            return "batch_norm", ()
        if computes_as(module) in _INSTANCE_NORMS and not module.track_running_stats:
            return "instance_norm", ()
        if isinstance(module, nn.GroupNorm):
            return "group_norm", ()
        if isinstance(module, nn.LayerNorm) and (module.weight is None or module.weight.dim() == len(module.normalized_shape)):
            return "layer_norm", ()
        if isinstance(module, _RANDOM_MODULES) and module.p == 0:
            return "affine", ("mul", 1.0, "left")
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
    by_name = {n.name: n for n in gm.graph.nodes}
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
        taken.update(by_name[n] for n in unit.nodes)
        factor = unit.factor if unit.kind == "fork_join" else factors.get(unit.output, _static_factor(unit))
        units[by_name[unit.input]] = dataclasses.replace(unit, factor=factor)
    mutated = {n.all_input_nodes[0] for n in gm.graph.nodes if n.op != "placeholder" and n.all_input_nodes and _mutates_an_input(gm, n)}
    outputs = {u.output for u in units.values()}
    starts = [u for u in units.values() if u.input not in outputs or len(by_name[u.input].users) != 1]
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
    if kind in ("instance_norm", "group_norm"):  # per sample and group, against each channel's |gamma|
        n, c = inp.shape[:2]
        groups = module.num_groups if kind == "group_norm" else c
        std = torch.sqrt(inp.detach().reshape(n, groups, -1).var(dim=2, unbiased=False) + module.eps)
        std = std.repeat_interleave(c // groups, dim=1)
        if module.weight is not None:
            std = std / module.weight.detach().abs().clamp(min=1e-30)
        return float(std.max().clamp(min=1.0))
    if kind == "layer_norm":  # per position, against each element's |gamma|
        dims = tuple(range(inp.dim() - len(module.normalized_shape), inp.dim()))
        std = torch.sqrt(inp.detach().var(dim=dims, unbiased=False, keepdim=True) + module.eps)
        if module.weight is not None:
            std = std / module.weight.detach().abs().clamp(min=1e-30)
        return float(std.max().clamp(min=1.0))
    if kind == "prelu":
        weight = module.weight.detach()
        return math.inf if bool((weight <= 0).any()) else float((1.0 / weight).max().clamp(min=1.0))
    if kind == "elu":
        alpha = arg[0]
        lowest = float(out.detach().min()) if out.numel() else 0.0
        return max(1.0, alpha / max(lowest + alpha, 1e-30))
    return 1.0


def calibration_probes(gm: fx.GraphModule) -> tuple[dict[str, Callable[[list, Any], None]], dict[str, float]]:
    """`calibrate` as probes of a no-grad forward that a caller runs anyway
    (`cost_models.runtime.node_seconds`): `probes[node](values, result)`, with the
    values of the node's inputs and its result, records its factor in the dict
    returned, which holds every factor once the run has passed every probed node."""
    factors: dict[str, float] = {}
    probes = {}
    for node in gm.graph.nodes:
        found = _elementwise(gm, node) if node.op != "placeholder" else None
        if not found or found[0] not in (*NORM_KINDS, "prelu", "elu") or not isinstance(node.args[0], fx.Node):
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        position = node.all_input_nodes.index(node.args[0])

        def probe(values: list, result: Any, name=node.name, kind=found[0], arg=found[1], module=module,
                  position=position) -> None:
            if isinstance(result, torch.Tensor):
                factors[name] = _runtime_factor(kind, module, values[position], result, arg)

        probes[node.name] = probe
    return probes, factors


def calibrate(gm: fx.GraphModule, inputs: tuple) -> dict[str, float]:
    """Value-dependent factors (node -> factor) from one no-grad forward of `gm` on
    `inputs`. The caller restores the model's state (BatchNorm statistics move)."""
    probes, factors = calibration_probes(gm)

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.name in probes:
                probes[node.name]([self.env[n] for n in node.all_input_nodes], result)
            return result

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return factors
