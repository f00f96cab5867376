"""Row-split's runtime: a chain of spatially local ops run tile by tile along one axis.

A chain is described by `steps`, plain tuples so that it prints in exported code:
`(op, inputs, module, config)`, where `inputs` index earlier steps (>= 0) or the
chain's external inputs (-1 - i), `module` indexes the modules handed to
`tiled_chain` (or is None) and `config` holds the op's constants:

  ("conv", (i,), m, ())                    Conv2d/3d module (zeros, reflect or replicate padding)
  ("conv_t", (i,), m, ())                  ConvTranspose2d/3d module (zeros padding)
  ("max_pool", (i,), None, (k, s, p, d))   max pooling; one entry per spatial axis, ceil_mode off
  ("avg_pool", (i,), None, (k, s, p, divisor))  average pooling counting the padding
  ("bn", (i,), m, ())                      BatchNorm2d/3d module
  ("gn", (i,), m, (groups, eps))           GroupNorm, or InstanceNorm (groups = channels) without
                                           running statistics: per-sample statistics
  ("act", (i,), None, (name, *args))       an elementwise activation (see `_ACTIVATIONS`)
  ("prelu", (i,), m, ())                   PReLU module
  ("add" | "sub" | "mul", (i, j), None, ())          two tensors of one shape
  ("add" | "sub" | "mul", (i,), None, (scalar, first))  a tensor and a number (first: the tensor is the left operand)
  ("cat", (i, j, ...), None, ())           concatenation along channels
  ("upsample", (i,), None, (factor, mode)) integer factor, "nearest", "bilinear" or "trilinear"
                                           (align_corners off)

The last step is the chain's output. Tensors are N, C and two or three spatial axes
(images: H, W; volumes: D, H, W). The chain is tiled along one spatial axis, `axis`
(2: H of an image, the default, or D of a volume; negative: from the end, -1 is W);
"rows" below are slices along that axis. Every op maps a range of output rows to the
range of input rows it reads (its receptive field along the axis, stride and
dilation included; a transposed convolution's follows from its kernel and stride);
a tile evaluates each step on exactly the rows it needs, padding (zeros, reflection,
replication, -inf for max pooling) only at the true border along the axis and whole
along the others, so each tile's rows equal the whole tensor's.

Normalisations need statistics over the whole tensor (BatchNorm per channel over the
batch; GroupNorm and InstanceNorm per sample and group): the forward sweeps the tiles
once per normalisation to sum its input (float64), BatchNorm's running statistics are
updated once, and the normalisation is elementwise with those statistics. The
backward splits the output's gradient into disjoint row tiles, recomputes each tile's
chain and backpropagates through it (the statistics as leaves), summing the input
gradient's overlapping halo rows; then, last normalisation first, it sweeps each
one's statistics gradient back through the rows before it (the two reductions of
mean and variance). All of it is one autograd Function whose gradients are summed in
place in its own buffers: nothing but the chain's inputs and the statistics is kept
between forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["tiled_chain", "TiledPlan", "NORMS", "output_rows", "rows_computed", "tile_bounds"]

NORMS = ("bn", "gn")  # the steps that normalise with statistics over the whole tensor

_ACTIVATIONS = {
    "relu": F.relu, "relu6": F.relu6, "leaky_relu": F.leaky_relu, "hardtanh": F.hardtanh, "elu": F.elu,
    "gelu": lambda x, approximate="none": F.gelu(x, approximate=approximate), "silu": F.silu,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardswish": F.hardswish, "identity": lambda x: x,
}
_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by the number of spatial axes
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


def tile_bounds(rows: int, tiles: int) -> list[tuple[int, int]]:
    """`rows` cut into `tiles` disjoint ranges of near-equal size (fewer if rows are few)."""
    tiles = max(1, min(tiles, rows))
    cuts = [round(i * rows / tiles) for i in range(tiles + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _sweep_bounds(plan: "TiledPlan", target: int, tiles: int, tensors) -> list[tuple[int, int]]:
    """The tiles of `target`'s rows to run. On fake tensors (the cost model's profile)
    one tile per distinct set of row counts: tiles alike in every step's rows allocate
    and free alike, so the rest would only repeat their memory events."""
    bounds = tile_bounds(plan.height(target), tiles)
    if not any(isinstance(t, FakeTensor) for t in tensors):
        return bounds
    seen, kept = set(), []
    for a, b in bounds:
        shape = tuple(sorted((ref, hi - lo) for ref, (lo, hi) in plan.needs(target, a, b).items()))
        if shape not in seen:
            seen.add(shape)
            kept.append((a, b))
    return kept


def _narrow(tensor: torch.Tensor, axis: int, start: int, length: int) -> torch.Tensor:
    """`tensor.narrow(axis, start, length)`, or `tensor` itself where that is all of it,
    as indexing does: a slice in the autograd graph allocates a zero-filled tensor of
    its input's size in backward, one tile of a step's output more at the peak."""
    return tensor if start == 0 and length == tensor.shape[axis] else tensor.narrow(axis, start, length)


def _tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _pair(value) -> tuple[int, int]:
    return _tuple(value, 2)


def _conv_geometry(conv: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Kernel and dilation of a conv per spatial axis, and its padding (before, after) per spatial axis."""
    n = conv.weight.dim() - 2
    kernel, dilation = _tuple(conv.kernel_size, n), _tuple(conv.dilation, n)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return kernel, dilation, ((0, 0),) * n
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return kernel, dilation, tuple((t // 2, t - t // 2) for t in totals)
    return kernel, dilation, tuple((p, p) for p in _tuple(conv.padding, n))


def _axis_of(axis: int, ndim: int) -> int:
    """`axis` as a dimension of an `ndim`-dimensional N, C, spatial... tensor (negative
    counts from the end); ValueError where it is not a spatial one."""
    dim = axis + ndim if isinstance(axis, int) and axis < 0 else axis
    if not isinstance(axis, int) or not 2 <= dim < ndim:
        raise ValueError(f"axis={axis!r} is not a spatial axis of a {ndim}-dimensional N, C, ... tensor; use one of "
                         f"{tuple(range(2, ndim))} (or {tuple(range(2 - ndim, 0))} from the end)")
    return dim


def _window(step: tuple, modules, axis: int = 2) -> tuple[int, int, int, int, int] | None:
    """(kernel, stride, dilation, pad before, pad after) along `axis` of a windowed op, else None."""
    op, _, module, config = step
    i = axis - 2
    if op == "conv":
        conv = modules[module]
        kernel, dilation, pad = _conv_geometry(conv)
        return kernel[i], _tuple(conv.stride, len(kernel))[i], dilation[i], *pad[i]
    if op == "max_pool":
        k, s, p, d = config
        return k[i], s[i], d[i], p[i], p[i]
    if op == "avg_pool":
        k, s, p, _ = config
        return k[i], s[i], 1, p[i], p[i]
    return None


def _transposed(conv: nn.Module, axis: int) -> tuple[int, int, int, int, int]:
    """(kernel, stride, dilation, padding, output padding) of a transposed conv along `axis`."""
    n, i = conv.weight.dim() - 2, axis - 2
    return tuple(_tuple(v, n)[i] for v in (conv.kernel_size, conv.stride, conv.dilation, conv.padding, conv.output_padding))


def output_rows(steps, modules, heights: list[int], axis: int = 2, ndim: int = 4) -> list[int]:
    """Each step's output size along `axis`, from the external inputs' sizes along it."""
    axis = _axis_of(axis, ndim)
    rows: list[int] = []
    for step in steps:
        first = step[1][0]
        h = heights[-1 - first] if first < 0 else rows[first]
        window = _window(step, modules, axis)
        if window is not None:
            k, s, d, top, bottom = window
            h = (h + top + bottom - d * (k - 1) - 1) // s + 1
        elif step[0] == "conv_t":
            k, s, d, p, extra = _transposed(modules[step[2]], axis)
            h = (h - 1) * s - 2 * p + d * (k - 1) + extra + 1
        elif step[0] == "upsample":
            h = h * step[3][0]
        rows.append(h)
    return rows


class TiledPlan:
    """The chain's steps with its modules and its inputs' sizes along the tiled `axis`:
    which rows each step needs for a range of another step's rows, and the evaluation
    of a step on a range of rows."""

    def __init__(self, steps, modules, heights: list[int], axis: int = 2, ndim: int = 4):
        self.axis = _axis_of(axis, ndim)
        self.steps, self.modules, self.heights, self.ndim = steps, modules, heights, ndim
        self.rows = output_rows(steps, modules, heights, self.axis, ndim)
        self.norms = [i for i, step in enumerate(steps) if step[0] in NORMS]

    def height(self, ref: int) -> int:
        return self.heights[-1 - ref] if ref < 0 else self.rows[ref]

    def _reads(self, index: int, a: int, b: int) -> list[tuple[int, int, int]]:
        """(input ref, lo, hi): the rows of each input step `index` reads for its rows [a, b);
        lo and hi may pass the input's border (padding), by at most its padding."""
        op, inputs, module, config = self.steps[index]
        window = _window(self.steps[index], self.modules, self.axis)
        if window is not None:
            k, s, d, top, bottom = window
            lo, hi = a * s - top, (b - 1) * s - top + d * (k - 1) + 1
            size = self.height(inputs[0])
            if op == "conv" and self.modules[module].padding_mode == "reflect":
                hi = max(hi, min(-lo + 1, size)) if lo < 0 else hi  # reflection needs pad + 1 rows
                if hi > size:
                    lo = min(lo, max(lo - s * math.ceil((lo - (2 * size - hi - 1)) / s), -top))
            return [(inputs[0], lo, hi)]
        if op == "conv_t":  # output row o = i * s - p + j * d: the inputs i whose kernel reaches [a, b)
            k, s, d, p, _ = _transposed(self.modules[module], self.axis)
            return [(inputs[0], -((d * (k - 1) - a - p) // s), (b - 1 + p) // s + 1)]
        if op == "upsample":
            factor, mode = config
            size = self.height(inputs[0])
            if mode == "nearest":
                return [(inputs[0], a // factor, (b - 1) // factor + 1)]
            source = lambda o: max((o + 0.5) / factor - 0.5, 0.0)  # noqa: E731 - PyTorch's align_corners=False
            return [(inputs[0], math.floor(source(a)), min(math.floor(source(b - 1)) + 2, size))]
        return [(ref, a, b) for ref in inputs]

    def needs(self, target: int, a: int, b: int) -> dict[int, tuple[int, int]]:
        """The rows of every step and external input (keys < 0) that rows [a, b) of step
        `target` depend on, clipped to each one's height."""
        needed = {target: (a, b)}
        for index in range(target, -1, -1):
            if index not in needed:
                continue
            for ref, lo, hi in self._reads(index, *needed[index]):
                lo, hi = max(lo, 0), min(hi, self.height(ref))
                if ref in needed:
                    lo, hi = min(lo, needed[ref][0]), max(hi, needed[ref][1])
                needed[ref] = (lo, hi)
        return needed

    def evaluate(self, target: int, a: int, b: int, inputs, stats, weights) -> torch.Tensor:
        """Rows [a, b) of step `target`. `inputs[i]`: (tensor, first row it holds) per
        external input; `stats[j]`: (mean, var) of the j-th normalisation; `weights[m]`:
        (weight, bias) of module m."""
        needed = self.needs(target, a, b)
        values = {-1 - i: inputs[i] for i in range(len(inputs)) if -1 - i in needed}
        last_use = {}
        for index in range(target + 1):
            if index in needed:
                for ref in self.steps[index][1]:
                    last_use[ref] = index
        for index in range(target + 1):
            if index not in needed:
                continue
            values[index] = (self._step(index, *needed[index], values, stats, weights), needed[index][0])
            for ref in self.steps[index][1]:
                if last_use.get(ref) == index and ref != target:
                    values.pop(ref, None)
        return values[target][0]

    def _rows(self, values, ref: int, lo: int, hi: int) -> torch.Tensor:
        tensor, start = values[ref]
        return _narrow(tensor, self.axis, lo - start, hi - lo)

    def _padding(self, border: tuple[int, int], whole: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
        """F.pad's pairs (last axis first) from the padding along the tiled axis
        (`border`, at the tensor's edges only) and along every other spatial axis
        (`whole[i]` for spatial axis i)."""
        pairs = [border if 2 + i == self.axis else pair for i, pair in enumerate(whole)]
        return tuple(p for pair in reversed(pairs) for p in pair)

    def _step(self, index: int, a: int, b: int, values, stats, weights) -> torch.Tensor:
        op, inputs, module, config = self.steps[index]
        reads = self._reads(index, a, b)
        window = _window(self.steps[index], self.modules, self.axis)
        n = self.ndim - 2
        if window is not None:
            ref, lo, hi = reads[0]
            size = self.height(ref)
            x = self._rows(values, ref, max(lo, 0), min(hi, size))
            border = (max(0, -lo), max(0, hi - size))
            if op == "conv":
                conv = self.modules[module]
                _, dilation, pad = _conv_geometry(conv)
                x = F.pad(x, self._padding(border, pad), mode=_PAD_MODES[conv.padding_mode])
                out = _CONV[n](x, *weights[module], _tuple(conv.stride, n), 0, dilation, conv.groups)
            elif op == "max_pool":
                k, s, p, d = config
                x = F.pad(x, self._padding(border, tuple((q, q) for q in p)), value=-math.inf)
                out = _MAX_POOL[n](x, k, s, 0, d)
            else:
                k, s, p, divisor = config
                x = F.pad(x, self._padding(border, tuple((q, q) for q in p)))
                out = _AVG_POOL[n](x, k, s, 0, False, True, divisor)
            skip = (a * window[1] - window[3] - lo) // window[1]  # rows before a (reflection reads more)
            return _narrow(out, self.axis, skip, b - a)
        if op == "conv_t":
            return self._transposed_rows(reads[0], a, b, values, self.modules[module], *weights[module])
        if op == "upsample":
            ref, lo, hi = reads[0]
            factor, mode = config
            x = self._rows(values, ref, lo, hi)
            out = F.interpolate(x, scale_factor=factor, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
            return _narrow(out, self.axis, a - lo * factor, b - a)
        xs = [self._rows(values, ref, lo, hi) for ref, lo, hi in reads]
        if op in NORMS:
            mean, var = (per_channel(t, self.steps[index], xs[0]) for t in stats[self.norms.index(index)])
            out = (xs[0] - mean) * torch.rsqrt(var + _eps(self.steps[index], self.modules))
            weight, bias = weights[module]
            if weight is not None:
                shape = (1, -1) + (1,) * n
                out = out * weight.view(shape) + bias.view(shape)
            return out
        if op == "act":
            return _ACTIVATIONS[config[0]](xs[0], *config[1:])
        if op == "prelu":
            return F.prelu(xs[0], weights[module][0])
        if op == "cat":
            return torch.cat(xs, dim=1)
        if len(xs) == 2:
            return _BINARY[op](*xs)
        scalar, first = config
        return _BINARY[op](xs[0], scalar) if first else _BINARY[op](torch.as_tensor(scalar, dtype=xs[0].dtype), xs[0])

    def _transposed_rows(self, read: tuple[int, int, int], a: int, b: int, values, conv: nn.Module, weight, bias):
        """Rows [a, b) of a transposed conv: the input rows that reach them (clipped to
        the input), transposed without padding along the axis (whole along the others),
        the rows before a dropped, rows no input reaches (past the last, output padding)
        zeros, then the bias."""
        ref, lo, hi = read
        lo, hi = max(lo, 0), min(hi, self.height(ref))
        n = self.ndim - 2
        i = self.axis - 2
        k, s, d, p, _ = _transposed(conv, self.axis)
        padding = list(_tuple(conv.padding, n))
        padding[i] = 0
        extra = list(_tuple(conv.output_padding, n))
        extra[i] = 0
        x = self._rows(values, ref, lo, hi)
        out = _CONV_T[n](x, weight, None, _tuple(conv.stride, n), tuple(padding), tuple(extra), conv.groups,
                         _tuple(conv.dilation, n))
        first = lo * s - p  # the output row of `out`'s first row
        start, stop = max(a - first, 0), min(b - first, out.shape[self.axis])
        out = _narrow(out, self.axis, start, max(stop - start, 0))
        before, after = first + start - a, b - (first + max(stop, start))
        if before or after:
            pad = [0, 0] * n
            pad[2 * (n - 1 - i):2 * (n - i)] = [before, after]
            out = F.pad(out, pad)
        return out if bias is None else out + bias.view((1, -1) + (1,) * n)

    def flops_rows(self, target: int, bounds: list[tuple[int, int]]) -> list[int]:
        """Rows of each step computed over all tiles of `target` (halos counted each time)."""
        computed = [0] * len(self.steps)
        for a, b in bounds:
            for ref, (lo, hi) in self.needs(target, a, b).items():
                if ref >= 0:
                    computed[ref] += hi - lo
        return computed


def rows_computed(steps, modules, heights: list[int], tiles: int, axis: int = 2, ndim: int = 4) -> tuple[list[int], list[int]]:
    """Per step: rows (along `axis`) computed by one tiled forward of the whole chain, and its size along `axis`."""
    plan = TiledPlan(steps, modules, heights, axis, ndim)
    return plan.flops_rows(len(steps) - 1, tile_bounds(plan.rows[-1], tiles)), plan.rows


def _weights(plan: TiledPlan) -> tuple[list, list[torch.Tensor]]:
    """(weight, bias) per module index, and the flat list of those that are tensors."""
    pairs, flat = [], []
    for module in plan.modules:
        pair = (getattr(module, "weight", None), getattr(module, "bias", None))
        pairs.append(pair)
        flat += [t for t in pair if t is not None]
    return pairs, flat


def _rebuild(pairs, flat) -> list:
    """`pairs` with their tensors replaced, in order, by those of `flat`."""
    it = iter(flat)
    return [tuple(None if t is None else next(it) for t in pair) for pair in pairs]


class _Sweep:
    """The tiles of one target step, evaluated without grad in forward and recomputed
    with grad in backward."""

    @staticmethod
    def forward_tiles(plan: TiledPlan, target: int, tiles: int, inputs, stats, weights):
        """(a, b, rows [a, b) of `target`) for each tile, without grad."""
        pairs, _ = _weights(plan)
        for a, b in _sweep_bounds(plan, target, tiles, inputs):
            yield a, b, plan.evaluate(target, a, b, _Sweep.pieces(plan, target, a, b, inputs), stats, _rebuild(pairs, weights))

    @staticmethod
    def pieces(plan: TiledPlan, target: int, a: int, b: int, inputs) -> list[tuple[torch.Tensor, int]]:
        """(the rows of each input that rows [a, b) of `target` read, the first of those rows)."""
        needed = plan.needs(target, a, b)
        spans = [needed.get(-1 - i, (0, 0)) for i in range(len(inputs))]
        return [(x.narrow(plan.axis, lo, hi - lo), lo) for (lo, hi), x in zip(spans, inputs)]

    @staticmethod
    def backward_tiles(plan: TiledPlan, target: int, tiles: int, inputs, stats, weights, pairs, grad_of_tile,
                       grads_in, totals) -> None:
        """Add the input, statistics and weight gradients of `target`'s rows into
        `grads_in` and `totals` (statistics, then weights), over disjoint tiles of those
        rows; `grad_of_tile(out, a, b)` gives the gradient of rows [a, b). Nothing of one
        tile is referenced once it is summed: every tile allocates and frees alike, which
        the profile's one tile per shape (`_sweep_bounds`) relies on."""
        for a, b in _sweep_bounds(plan, target, tiles, inputs):
            if not _Sweep.add_tile(plan, target, a, b, inputs, stats, weights, pairs, grad_of_tile, grads_in, totals):
                break

    @staticmethod
    def add_tile(plan: TiledPlan, target: int, a: int, b: int, inputs, stats, weights, pairs, grad_of_tile,
                 grads_in, totals) -> bool:
        """Recompute rows [a, b) of `target` with grad and add their gradients into
        `grads_in` (at the rows each input piece came from) and `totals` (statistics,
        then weights); False if the tile has no gradient (a BatchNorm at the start of
        the chain, on an input without grad)."""
        with torch.enable_grad():
            pieces = [(piece.detach().requires_grad_(x.requires_grad), lo)
                      for (piece, lo), x in zip(_Sweep.pieces(plan, target, a, b, inputs), inputs)]
            leaf_stats = [tuple(s.detach().requires_grad_(s.requires_grad) for s in pair) for pair in stats]
            leaf_weights = [w.detach().requires_grad_(w.requires_grad) for w in weights]
            out = plan.evaluate(target, a, b, pieces, leaf_stats, _rebuild(pairs, leaf_weights))
            if not out.requires_grad:
                return False
            leaves = [p for p, _ in pieces] + [s for pair in leaf_stats for s in pair] + leaf_weights
            found = iter(torch.autograd.grad(out, [leaf for leaf in leaves if leaf.requires_grad],
                                             grad_of_tile(out, a, b), allow_unused=True))
        for i, (piece, lo) in enumerate(pieces):
            if piece.requires_grad:
                g = next(found)
                if g is not None:
                    grads_in[i].narrow(plan.axis, lo, piece.shape[plan.axis]).add_(g)
        for total in totals:
            if total is not None:
                g = next(found)
                if g is not None:
                    total += g
        return True


def _eps(step: tuple, modules) -> float:
    return step[3][1] if step[0] == "gn" else modules[step[2]].eps


def _sums(step: tuple, z: torch.Tensor) -> torch.Tensor:
    """`z` summed per statistic: per channel over the batch and space (BatchNorm), or per
    sample and group over the group's channels and space (GroupNorm, InstanceNorm)."""
    if step[0] == "bn":
        return z.sum([0, *range(2, z.dim())])
    return z.reshape(z.shape[0], step[3][0], -1).sum(2)


def per_channel(stat: torch.Tensor, step: tuple, like: torch.Tensor) -> torch.Tensor:
    """A statistic of normalisation `step` shaped to broadcast over `like` (N, C, ...)."""
    space = (1,) * (like.dim() - 2)
    if step[0] == "bn":
        return stat.view(1, -1, *space)
    return stat.repeat_interleave(like.shape[1] // step[3][0], dim=1).view(*stat.shape[:1], -1, *space)


def _statistics(plan: TiledPlan, norm: int, tiles: int, inputs, stats, weights) -> tuple:
    """(mean, biased variance, values per statistic) of normalisation step `norm`'s
    input, summed over tiles in float64 (`stats`: those of the normalisations before
    it); for a BatchNorm in training mode with running statistics, those are updated
    here, once."""
    step = plan.steps[norm]
    target = step[1][0]
    total = squares = None
    for _, _, z in _Sweep.forward_tiles(plan, target, tiles, inputs, stats, weights):
        z = z.double()
        total = _sums(step, z) if total is None else total + _sums(step, z)
        squares = _sums(step, z * z) if squares is None else squares + _sums(step, z * z)
        shape = list(z.shape)  # every axis but the tiled one whole in every tile
        del z  # not alive while the next tile is computed (see `backward_tiles`)
    shape[plan.axis] = plan.height(target)
    count = math.prod(shape) // total.numel()  # values per statistic
    mean = total / count
    var = (squares / count - mean * mean).clamp_min(0)
    module = plan.modules[step[2]]
    dtype = inputs[0].dtype
    if step[0] == "bn" and module.training and module.running_mean is not None:
        _update_running(module, mean.to(dtype), var.to(dtype), count)
    return mean.to(dtype), var.to(dtype), count


class _TiledChain(torch.autograd.Function):
    """The whole chain, its BatchNorms' batch statistics included, as one Function: its
    backward sums every gradient into buffers of its own, in place (through separate
    Functions, autograd would hold each one's input gradients and sum them)."""

    @staticmethod
    def forward(ctx, plan: TiledPlan, tiles: int, inputs_n: int, *tensors):
        inputs, weights = list(tensors[:inputs_n]), list(tensors[inputs_n:])
        stats, counts = [], []
        for index in plan.norms:
            module = plan.modules[plan.steps[index][2]]
            if plan.steps[index][0] == "gn" or module.training or module.running_mean is None:
                mean, var, count = _statistics(plan, index, tiles, inputs, stats, weights)
            else:  # a BatchNorm in eval mode: the running statistics, constants
                mean, var, count = module.running_mean, module.running_var, None
            stats.append((mean, var))
            counts.append(count)
        target = len(plan.steps) - 1
        out = None
        for a, b, tile in _Sweep.forward_tiles(plan, target, tiles, inputs, stats, weights):
            if out is None:
                shape = list(tile.shape)
                shape[plan.axis] = plan.rows[target]
                out = tile.new_empty(shape)
            out.narrow(plan.axis, a, b - a).copy_(tile)
            del tile  # not alive while the next tile is computed (see `backward_tiles`)
        ctx.save_for_backward(*tensors, *[t for pair in stats for t in pair])
        ctx.plan, ctx.tiles, ctx.inputs_n, ctx.counts = plan, tiles, inputs_n, counts
        return out

    @staticmethod
    def backward(ctx, grad):
        """The output's gradient swept over the output's row tiles; then, last
        normalisation first, each one's statistics gradient (complete once every later
        step has added to it) swept over its input's row tiles, through d mean / dz =
        1/N and d var / dz = 2 (z - mean) / N (N: the values per statistic)."""
        plan, tiles, counts = ctx.plan, ctx.tiles, ctx.counts
        saved = ctx.saved_tensors
        split = len(saved) - 2 * len(counts)
        inputs, weights, flat = list(saved[:ctx.inputs_n]), list(saved[ctx.inputs_n:split]), saved[split:]
        stats = [tuple(t.detach().requires_grad_(count is not None) for t in flat[2 * j:2 * j + 2])
                 for j, count in enumerate(counts)]
        pairs, _ = _weights(plan)
        grads_in = [torch.zeros_like(x) if x.requires_grad else None for x in inputs]
        grads_stats = [torch.zeros_like(t) if t.requires_grad else None for pair in stats for t in pair]
        grads_w = [torch.zeros_like(w) if w.requires_grad else None for w in weights]
        _Sweep.backward_tiles(plan, len(plan.steps) - 1, tiles, inputs, stats, weights, pairs,
                              lambda out, a, b: grad.narrow(plan.axis, a, b - a), grads_in, grads_stats + grads_w)
        for j in reversed(range(len(counts))):
            if counts[j] is None:
                continue
            gm, gv, mean, count = grads_stats[2 * j], grads_stats[2 * j + 1], stats[j][0].detach(), counts[j]
            step = plan.steps[plan.norms[j]]

            def grad_of_tile(z, a, b, gm=gm, gv=gv, mean=mean, count=count, step=step):
                at = lambda t: per_channel(t, step, z)  # noqa: E731
                return (at(gm) + 2 * at(gv) * (z.detach() - at(mean))) / count

            _Sweep.backward_tiles(plan, plan.steps[plan.norms[j]][1][0], tiles, inputs, stats[:j], weights, pairs,
                                  grad_of_tile, grads_in, grads_stats[:2 * j] + grads_w)
            grads_stats[2 * j] = grads_stats[2 * j + 1] = None
        return (None, None, None, *grads_in, *grads_w)


def tiled_chain(steps: tuple, tiles: int, inputs: tuple, modules: tuple, axis: int = 2) -> torch.Tensor:
    """The chain's output, computed `tiles` tiles at a time along spatial `axis` (a
    dimension of the inputs: 2 is H of an image, D of a volume; -1 is W; see the module
    doc)."""
    ndim = inputs[0].dim()
    axis = _axis_of(axis, ndim)
    plan = TiledPlan(steps, modules, [x.shape[axis] for x in inputs], axis, ndim)
    _, weights = _weights(plan)
    return _TiledChain.apply(plan, tiles, len(inputs), *inputs, *weights)


def _update_running(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, count) -> None:
    """Running statistics as BatchNorm's own training forward updates them, once."""
    with torch.no_grad():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        bn.running_var.mul_(1 - factor).add_(var * (count / (count - 1)), alpha=factor)
