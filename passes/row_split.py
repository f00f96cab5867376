"""Row-split candidates and the rewrite: chains of spatially local ops run tile by tile.

A chain is a run of graph nodes, each a spatially local op on images (N, C, H, W) or
volumes (N, C, D, H, W): convolution and transposed convolution, pooling, BatchNorm,
GroupNorm and InstanceNorm, activations (PReLU too), elementwise arithmetic, channel
concatenation, integer upsampling; only its last node's value is used after it.
`apply` replaces each chosen chain by one call of `row_split_ops.tiled_chain`, which
never holds the chain's intermediates whole: forward and backward run tiles with
halos along one spatial axis, D, H or W (`passes/row_split_ops.py`). The chain's
external inputs are kept for the backward (they are what each tile is recomputed
from); its output is made whole. `tiling` picks the axis: the one that allows the
most tiles, then the one with the least halo recompute (W pays on wide, short maps).

Granularities: "block" closes a chain where a module call ends once it holds two
convolutions or poolings (a U-Net's double convolution with the pooling before it or
the upsampling and 1x1 convolution before it, a ResNet block's body); "joined" joins
block chains in pairs, from the network's end back, where the second alone reads the
first's output (a U-Net's last two decoder stages: the upsampled map between them and
its gradient are then never whole), within the limits on nodes and normalisations;
"whole" runs as far as local ops reach (a fully convolutional network end to end: one
chain, its only kept tensors the input).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from rewriter.passes import row_split_ops
from rewriter.cost_models.node_costs import BATCH
from rewriter.passes.names import fresh_name
from rewriter.passes.layers import computes_as
from rewriter.cost_models.in_place import mutates_an_input as _mutates_an_input
from rewriter.passes.recompute import _ends_scope
from rewriter.passes.registry import Candidate, Decision, Pricing
from rewriter.passes.row_split_ops import rows_computed

__all__ = ["Chain", "Tilings", "AXES", "GRANULARITIES", "TILES", "MODES", "KEY", "MIN_TILE_ROWS", "chains", "candidates",
           "apply", "rewrite", "chain_over", "steps_of", "tiles_for", "tiling"]

GRANULARITIES = ("block", "joined", "whole")
TILES = (4, 16, 32)  # the tile counts offered per chain
MODES = {f"rows{t}": t for t in TILES}  # a chain's options, by name: its tile count
KEY = "rows:"  # a chain's candidate key: this prefix and the chain's output
MAX_NORMS = 8  # normalisations per chain: each costs a sweep over the nodes before it
MAX_NODES = 48  # nodes per chain: planning profiles every tile's ops
MIN_TILE_ROWS = 8  # rows (or columns) of an image chain's output per tile, at least: thinner tiles are mostly halo
MIN_SLAB_ROWS = 2  # slices of a volume chain's output per tile, at least: a slab of a 48³ map is 2 x 48 x 48
AXES = {"D": -3, "H": -2, "W": -1}  # the axes a chain can be tiled along, by name, and their dimension
RANKS = (4, 5)  # images and volumes

_ACTIVATION_MODULES = {
    nn.ReLU: lambda m: ("relu",), nn.ReLU6: lambda m: ("relu6",), nn.LeakyReLU: lambda m: ("leaky_relu", m.negative_slope),
    nn.Hardtanh: lambda m: ("hardtanh", m.min_val, m.max_val), nn.ELU: lambda m: ("elu", m.alpha),
    nn.GELU: lambda m: ("gelu", m.approximate), nn.SiLU: lambda m: ("silu",), nn.Sigmoid: lambda m: ("sigmoid",),
    nn.Tanh: lambda m: ("tanh",), nn.Hardswish: lambda m: ("hardswish",), nn.Identity: lambda m: ("identity",),
}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.silu: "silu",
                         torch.sigmoid: "sigmoid", torch.tanh: "tanh", F.leaky_relu: "leaky_relu"}
_BINARY = {operator.add: "add", torch.add: "add", operator.iadd: "add", operator.sub: "sub", torch.sub: "sub",
           operator.mul: "mul", torch.mul: "mul", operator.imul: "mul"}


def tiles_for(rows: int, tiles: int, rank: int = 4) -> int:
    """The tile count used for `tiles` on a chain whose output (of `rank` dimensions) has `rows` rows."""
    return max(1, min(tiles, rows // (MIN_SLAB_ROWS if rank == 5 else MIN_TILE_ROWS)))


def axes_of(rank: int) -> dict[str, int]:
    """The axes a chain of `rank`-dimensional tensors can be tiled along (H, W; D too for volumes)."""
    return {name: dim for name, dim in AXES.items() if dim >= 2 - rank}


def tiling(shape: tuple[int, ...], tiles: int, halo: Callable[[int, str], float]) -> tuple[int, str]:
    """(tiles, axis name) for a request of `tiles` on a chain whose output has `shape`
    (N, C, H, W or N, C, D, H, W): the axis that allows the most tiles (the lowest
    peak), then the one whose halo recompute `halo(tiles, axis)` is the least, then H,
    then D. A 64x2048 map is cut into 16 tiles of 128 columns rather than 8 of 8 rows."""
    options = [(tiles_for(shape[dim], tiles, len(shape)), axis) for axis, dim in axes_of(len(shape)).items()]
    return min(options, key=lambda option: (-option[0], halo(*option), option[1] != "H", option[1] != "D"))


@dataclass(frozen=True)
class Chain:
    """Graph nodes `nodes` (graph order) reading the outside values `inputs`; only the
    last node's value is used after it."""

    nodes: tuple[str, ...]
    inputs: tuple[str, ...]

    @property
    def output(self) -> str:
        return self.nodes[-1]


def _integer_factor(scale) -> int | None:
    factors = set(scale) if isinstance(scale, (tuple, list)) else {scale}
    if len(factors) != 1:
        return None
    factor = factors.pop()
    return int(factor) if isinstance(factor, (int, float)) and float(factor).is_integer() and factor >= 1 else None


def _upsample(scale, size, mode, align_corners) -> tuple | None:
    factor = _integer_factor(scale) if size is None and scale is not None else None
    if factor is None or mode not in ("nearest", "bilinear", "trilinear") or (mode != "nearest" and align_corners):
        return None
    return ("upsample", None, (factor, mode))


_CONVS = (nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCE_NORMS = (nn.InstanceNorm2d, nn.InstanceNorm3d)
_MAX_POOLS = {nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_WINDOWED = {"conv", "conv_t", "max_pool", "avg_pool"}  # the ops that make a chain worth tiling
_AVG_POOLS = {nn.AvgPool2d: 2, nn.AvgPool3d: 3}


def _local(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(op, module or None, config) of a spatially local node, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = computes_as(module)
        if kind in _CONVS and module.padding_mode in ("zeros", "reflect", "replicate"):
            return ("conv", module, ())
        if kind in _TRANSPOSED and module.padding_mode == "zeros":
            return ("conv_t", module, ())
        if kind in _BATCH_NORMS:
            return ("bn", module, ())
        if kind in _INSTANCE_NORMS and not module.track_running_stats:
            return ("gn", module, (module.num_features, module.eps))
        if kind is nn.GroupNorm:
            return ("gn", module, (module.num_groups, module.eps))
        if kind is nn.PReLU:
            return ("prelu", module, ())
        if kind in _MAX_POOLS and not module.ceil_mode and not module.return_indices:
            n = _MAX_POOLS[kind]
            stride = module.stride or module.kernel_size
            return ("max_pool", None, tuple(row_split_ops._tuple(v, n) for v in
                                            (module.kernel_size, stride, module.padding, module.dilation)))
        if kind in _AVG_POOLS and not module.ceil_mode:
            n = _AVG_POOLS[kind]
            padding = row_split_ops._tuple(module.padding, n)
            if not module.count_include_pad and any(padding):
                return None
            stride = module.stride or module.kernel_size
            return ("avg_pool", None, (row_split_ops._tuple(module.kernel_size, n), row_split_ops._tuple(stride, n),
                                       padding, module.divisor_override))
        if kind in _ACTIVATION_MODULES:
            return ("act", None, _ACTIVATION_MODULES[kind](module))
        if kind in _DROPOUTS and module.p == 0:  # MONAI's blocks hold one with p = 0: the identity
            return ("act", None, ("identity",))
        if kind is nn.Upsample:
            return _upsample(module.scale_factor, module.size, module.mode, module.align_corners)
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return ("act", None, ("relu",))
    if node.op != "call_function":
        return None
    if node.target in _ACTIVATION_FUNCTIONS:
        name = _ACTIVATION_FUNCTIONS[node.target]
        if name == "leaky_relu":
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return ("act", None, ("leaky_relu", slope)) if isinstance(slope, float) else None
        return ("act", None, (name,)) if len(node.args) == 1 else None
    if node.target in _BINARY and len(node.args) == 2 and not node.kwargs:
        left, right = node.args
        tensors = [isinstance(a, fx.Node) for a in (left, right)]
        if all(tensors):
            return (_BINARY[node.target], None, ())
        number = right if tensors[0] else left
        if isinstance(number, (int, float)) and not isinstance(number, bool) and any(tensors):
            return (_BINARY[node.target], None, (number, tensors[0]))
        return None
    if node.target is torch.cat:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return ("cat", None, ()) if dim == 1 and isinstance(node.args[0], (list, tuple)) else None
    if node.target is F.interpolate:
        names = ("input", "size", "scale_factor", "mode", "align_corners")
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        return _upsample(bound.get("scale_factor"), bound.get("size"), bound.get("mode", "nearest"), bound.get("align_corners"))
    return None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    if node.op == "call_function" and node.target is torch.cat:
        return list(node.args[0])
    return [a for a in node.args if isinstance(a, fx.Node)]


def chains(gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]], opaque: tuple[str, ...] = (),
           granularity: str = "block") -> list[Chain]:
    """Candidate chains, disjoint, in graph order, of at least two nodes with a
    convolution or pooling among them, at most `MAX_NODES` nodes and `MAX_NORMS`
    normalisations, and an output of at least two tiles of `MIN_TILE_ROWS` rows along
    some axis (`MIN_SLAB_ROWS` for volumes). `shapes[name]` is each node's output shape (an image's or a volume's, or
    else anything); a chain's tensors are all images or all volumes. A node that
    changes its input in place joins only where nothing reads that input after it;
    two-tensor arithmetic needs equal shapes."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    position = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)
    local = {n: _local(gm, n) for n in nodes}

    def fits(node: fx.Node) -> bool:
        found = local[node]
        if found is None or node.op == "call_module" and node.target in opaque:
            return False
        args = _tensor_args(node)
        rank = len(shapes.get(node.name, ()))
        if rank not in RANKS or not args or any(len(shapes.get(a.name, ())) != rank for a in args):
            return False
        if found[0] in ("add", "sub", "mul") and len(args) == 2 and shapes[args[0].name] != shapes[args[1].name]:
            return False
        if _mutates_an_input(gm, node):
            later = [position.get(u, end) for u in args[0].users if u is not node]
            return not any(p > position[node] for p in later)
        return True

    walk = "block" if granularity == "joined" else granularity  # joined: block chains, then paired
    found: list[Chain] = []
    i = 0
    while i < end:
        if not fits(nodes[i]):
            i += 1
            continue
        j, closed, norms = i, None, 0
        while j < end and fits(nodes[j]) and j - i < MAX_NODES:
            norms += local[nodes[j]][0] in row_split_ops.NORMS
            if norms > MAX_NORMS:
                break
            run = set(nodes[i:j + 1])
            escaping = {m for m in run if any(u not in run for u in m.users)}
            following = nodes[j + 1] if j + 1 < end else None
            if escaping == {nodes[j]} and (walk == "whole" or _ends_scope(nodes[j], following)):
                closed = j
                windows = sum(local[m][0] in _WINDOWED for m in nodes[i:j + 1])
                if walk == "block" and windows >= 2:
                    break  # the first module call's end after two convolutions or poolings
            j += 1
        if closed is None:
            i += 1
            continue
        run = nodes[i:closed + 1]
        kinds = {local[m][0] for m in run}
        out = shapes[run[-1].name]
        if len(run) >= 2 and kinds & _WINDOWED and max(tiles_for(out[d], 2, len(out)) for d in axes_of(len(out)).values()) == 2:
            found.append(Chain(tuple(m.name for m in run), _outside(run)))
        i = closed + 1
    return _joined(found, nodes, position, local) if granularity == "joined" else found


def _joined(blocks: list[Chain], nodes: list[fx.Node], position: dict[fx.Node, int],
            local: dict[fx.Node, tuple | None]) -> list[Chain]:
    """`blocks` (block chains, graph order) joined in pairs from the last back: a chain
    joins the chain right after it where that one is no pair yet, alone reads its
    output, and the two keep within `MAX_NODES` and `MAX_NORMS`. (Longer runs hold less
    still between them, but each tile then recomputes a wider cone of the earlier
    stages: MONAI's 3-D UNet at 96³ reaches 0.222x of its eager peak with pairs, 0.254x
    with every decoder stage and the bottom in one chain.)"""
    by_name = {n.name: n for n in nodes}

    def norms(chain: Chain) -> int:
        return sum(local[by_name[n]][0] in row_split_ops.NORMS for n in chain.nodes)

    joined: list[Chain] = []
    paired = True  # whether joined[-1] (the chain a chain may join) is a pair already, or none is there
    for chain in reversed(blocks):
        after = joined[-1] if joined else None
        if (not paired and position[by_name[after.nodes[0]]] == position[by_name[chain.output]] + 1
                and all(u.name in after.nodes for u in by_name[chain.output].users)
                and len(chain.nodes) + len(after.nodes) <= MAX_NODES and norms(chain) + norms(after) <= MAX_NORMS):
            run = [by_name[n] for n in chain.nodes + after.nodes]
            joined[-1], paired = Chain(chain.nodes + after.nodes, _outside(run)), True
        else:
            joined.append(chain)
            paired = False
    return joined[::-1]


def steps_of(gm: fx.GraphModule, chain: Chain) -> tuple[tuple, list[str]]:
    """The chain as `row_split_ops` steps, and the module paths they index."""
    by_name = {n.name: n for n in gm.graph.nodes}
    index = {name: i for i, name in enumerate(chain.nodes)}
    external = {name: -1 - i for i, name in enumerate(chain.inputs)}
    steps, paths = [], []
    for name in chain.nodes:
        node = by_name[name]
        op, module, config = _local(gm, node)
        refs = tuple(index[a.name] if a.name in index else external[a.name] for a in _tensor_args(node))
        slot = None
        if module is not None:
            paths.append(node.target)
            slot = len(paths) - 1
        steps.append((op, refs, slot, config))
    return tuple(steps), paths


class Tilings:
    """The chains found in one graph, with what each mode does to each of them, worked
    out once per chain: its tiling (tile count and axis) and its halo's cost."""

    def __init__(self, pricing: Pricing, gm: fx.GraphModule, found: list[Chain]):
        self.pricing, self.gm, self.chains = pricing, gm, found
        self._steps: dict[Chain, tuple[tuple, list[str]]] = {}
        self._tilings: dict[tuple[Chain, str], tuple[int, str]] = {}

    def tiling(self, chain: Chain, mode: str) -> tuple[int, str]:
        """(tiles, axis) a mode ("rows16") gives the chain: fewer tiles on small maps,
        along the axis `tiling` picks."""
        key = (chain, mode)
        if key not in self._tilings:
            self._tilings[key] = tiling(self.pricing.shapes[chain.output], MODES[mode],
                                        lambda tiles, axis: self.halo_share(chain, tiles, axis))
        return self._tilings[key]

    def steps(self, chain: Chain) -> tuple[tuple, list[str]]:
        if chain not in self._steps:
            self._steps[chain] = steps_of(self.gm, chain)
        return self._steps[chain]

    def halo(self, chain: Chain, tiles: int, axis: str) -> tuple[list[float], list[float]]:
        """Per chain node: its forward FLOPs, and the rows a tiled forward computes over its rows."""
        steps, paths = self.steps(chain)
        modules = [self.gm.get_submodule(p) for p in paths]
        dim = AXES[axis]
        shapes = self.pricing.shapes
        computed, rows = rows_computed(steps, modules, [shapes[n][dim] for n in chain.inputs], tiles, dim,
                                       len(shapes[chain.output]))
        base = self.pricing.base
        flops = [float(base.by_name[n].fwd_flops.xreplace({BATCH: base.example_batch})) for n in chain.nodes]
        return flops, [c / r for c, r in zip(computed, rows)]

    def halo_share(self, chain: Chain, tiles: int, axis: str) -> float:
        """FLOPs of a tiled forward's halo rows, as a fraction of the chain's forward FLOPs."""
        flops, factor = self.halo(chain, tiles, axis)
        return sum(f * (k - 1) for f, k in zip(flops, factor)) / max(sum(flops), 1.0)

    def seconds(self, chain: Chain, tiles: int, axis: str) -> float:
        """Seconds a tiled chain adds: its halo rows in forward; the whole chain again in
        backward; per normalisation one more sweep of the nodes before it for its
        statistics, and in backward their recompute and backward (about 3x)."""
        flops, factor = self.halo(chain, tiles, axis)
        steps, _ = self.steps(chain)
        norms = [i for i, step in enumerate(steps) if step[0] in row_split_ops.NORMS]
        # eager: forward 1, backward 2 (x FLOPs); tiled: each x the halo factor, and 4 per later normalisation
        times = [4 * f - 3 + 4 * f * sum(1 for j in norms if j > i) for i, f in enumerate(factor)]
        return sum(self.pricing.rerun_seconds([n], times=t, move=t) for n, t in zip(chain.nodes, times))


def candidates(pricing: Pricing, found: Tilings, modes: tuple[str, ...]) -> list[Candidate]:
    """Each chain at each tile count of `modes`: the seconds `Tilings.seconds` prices,
    and every byte its members save (a tiled chain keeps only its inputs)."""
    offered = []
    for chain in found.chains if modes else ():
        tilings = [found.tiling(chain, mode) for mode in modes]
        seconds = tuple(found.seconds(chain, tiles, axis) for tiles, axis in tilings)
        details = tuple((tiles, axis, round(found.halo_share(chain, tiles, axis), 4)) for tiles, axis in tilings)
        saved = pricing.saved(chain.nodes)
        offered.append(Candidate("row_split", KEY + chain.output, chain.nodes, chain.output, tuple(modes), seconds,
                                 (saved,) * len(modes), details))
    return offered


def chain_over(gm: fx.GraphModule, nodes: tuple[str, ...]) -> Chain:
    """The chain of `gm` over `nodes` (graph order, as a plan stores them); ValueError
    where one is not in `gm` or is no spatially local op, or where a value made inside
    other than the last node's is used after them."""
    by_name = {n.name: n for n in gm.graph.nodes}
    wrong = [n for n in nodes if n not in by_name or _local(gm, by_name[n]) is None]
    if wrong:
        raise ValueError(f"row-split chain over {nodes[0]!r}..{nodes[-1]!r}: nodes {wrong[:4]} are not spatially local "
                         "ops of this graph")
    run = [by_name[n] for n in nodes]
    members = set(run)
    escaping = sorted(m.name for m in run[:-1] if any(u not in members for u in m.users))
    if escaping:
        raise ValueError(f"row-split chain over {nodes[0]!r}..{nodes[-1]!r}: values {escaping[:4]} made inside it are "
                         "used after it")
    return Chain(tuple(nodes), _outside(run))


def _outside(run: list[fx.Node]) -> tuple[str, ...]:
    """The values a run of nodes reads from outside it, in order of first use."""
    members = set(run)
    return tuple(a.name for a in dict.fromkeys(a for m in run for a in _tensor_args(m) if a not in members))


def apply(gm: fx.GraphModule, decisions: list[Decision]) -> fx.GraphModule:
    """`rewrite` as `decisions` say: each chain over its nodes, at its detail's tiles and
    axis."""
    picked = [chain_over(gm, d.nodes) for d in decisions]
    return rewrite(gm, {d.output: (d.detail[0], d.detail[1]) for d in decisions}, picked)


def rewrite(gm: fx.GraphModule, chosen: dict[str, tuple[int, str]], all_chains: list[Chain]) -> fx.GraphModule:
    """A new GraphModule where each chain named in `chosen` (output node -> (tiles,
    axis name "H" or "W")) runs as `row_split_ops.tiled_chain`. `gm` is not modified;
    parameters are shared."""
    from rewriter.passes.recompute import replace_runs

    by_output = {c.output: c for c in all_chains if c.output in chosen}
    unknown = [name for name in chosen if name not in by_output]
    if unknown:
        raise ValueError(f"row_split: {unknown} are not outputs of this graph's chains")
    for name, choice in chosen.items():
        if not (isinstance(choice, tuple) and len(choice) == 2 and isinstance(choice[0], int) and choice[0] >= 1
                and choice[1] in AXES):
            raise ValueError(f"row_split: chain {name!r} is given {choice!r}; give (tiles >= 1, axis), axis one of {tuple(AXES)}")
    taken = {n.name for n in gm.graph.nodes}

    def call(new: fx.GraphModule, graph: fx.Graph, chain: Chain, value) -> fx.Node:
        steps, paths = steps_of(gm, chain)
        modules = []
        for k, path in enumerate(paths):  # each module handed over whole (get_attr), as compress does
            modules.append(graph.create_node("get_attr", path, name=fresh_name(f"{chain.output}_module{k}", taken)))
            taken.add(modules[-1].name)
        inputs = tuple(value(n) for n in chain.inputs)
        tiles, axis = chosen[chain.output]
        node = graph.create_node("call_function", row_split_ops.tiled_chain,
                                 (steps, tiles, inputs, tuple(modules), AXES[axis]), name=chain.output)
        node.meta["rewriter"] = {"strategy": "row_split", "tiles": tiles, "axis": axis, "nodes": chain.nodes}
        return node

    return replace_runs(gm, list(by_output.values()), call)
