"""The compressed ops: autograd Functions whose forward is the op itself, exact, and
whose saved state for the backward is smaller.

Lossless (gradients bit-for-bit equal to eager):
  relu, leaky_relu   a 1-bit mask of where the input passed (packed 8 per byte)
  dropout            its mask, 1 bit per element (eager CPU keeps a float noise tensor)
  max_pool2d/3d      the argmax as an offset within its window, one byte per output
                     element (eager keeps int64 indices into the whole plane or volume)
  avg_pool2d/3d      nothing but the input's shape (eager keeps the input)
Lossy, opt-in (`bits` in 8, 4, 2; the forward stays exact):
  conv, linear, batch_norm, group_norm, instance_norm, layer_norm
                     the activation input quantized per group of `GROUP`
                     values to `bits` with stochastic (unbiased) rounding, min and
                     scale per group in bfloat16 (min rounded down, scale up, so
                     the levels still span the group); the backward runs PyTorch's
                     backward kernels on the dequantized input.
  prelu              a 1-bit mask of where the input was positive (the input gradient,
                     exact) and the input quantized so (the slope's gradient)
  norm_relu_call     BatchNorm, ReLU and the convolution or Linear that alone reads
                     the ReLU: one copy of the BatchNorm input, quantized with a range
                     per group on each side of the ReLU's threshold, and the exact mask
                     (apart: two copies and the mask).
Quantizing and the backward of conv and BatchNorm work a block of channels at a time,
so neither a float working copy nor the dequantized input exists whole.

Stochastic rounding draws from a generator of its own, so the model's random stream
(dropout masks) is the same as eager's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from rewriter.errors import InputError

__all__ = ["GROUP", "BITS", "CHUNKS", "pack_bits", "unpack_bits", "grouped", "group_range", "quantize", "dequantize", "shared_copy",
           "manual_seed", "relu", "leaky_relu", "dropout", "max_pool2d", "avg_pool2d", "max_pool3d", "avg_pool3d",
           "conv", "linear", "batch_norm", "group_norm", "instance_norm", "layer_norm", "prelu", "module_call",
           "norm_relu_call"]

GROUP = 64  # values per quantization group: min and scale (4 bytes: bfloat16) per group
BITS = (8, 4, 2)

_GENERATORS: dict[torch.device, torch.Generator] = {}


_SEED = [0]


def _generator(device: torch.device) -> torch.Generator:
    if device not in _GENERATORS:
        _GENERATORS[device] = torch.Generator(device=device).manual_seed(_SEED[0])
    return _GENERATORS[device]


def manual_seed(seed: int) -> None:
    """Restart the stochastic rounding's own random stream (every device) from `seed`:
    lossy compression then draws the same roundings as a fresh process seeded so."""
    _SEED[0] = int(seed)
    _GENERATORS.clear()


# ---- packing ---------------------------------------------------------------------------
def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values below 2**bits, `8 // bits` per byte; numel a multiple of 8."""
    if bits == 8:
        return values
    slots = values.view(-1, 8 // bits)
    packed = slots[:, 0].clone()
    for j in range(1, 8 // bits):  # scalar shifts: no broadcast (symbolic sizes stay symbolic)
        packed.bitwise_or_(slots[:, j] << (bits * j))
    return packed


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    mask = 2**bits - 1
    return torch.stack([(packed >> (bits * j)) & mask for j in range(8 // bits)], 1).view(-1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, 8 per uint8 (padded to a multiple of 8)."""
    flat = mask.reshape(-1)
    padded = torch.zeros(flat.numel() + (-flat.numel()) % 8, dtype=torch.uint8, device=mask.device)
    # padded by copying in (F.pad needs a concrete width); the bool bytes read as uint8
    # (inductor's C++ code cannot reinterpret bool vectors: compiled, it converts them)
    padded[: flat.numel()] = flat if torch.compiler.is_compiling() else flat.view(torch.uint8)
    return _pack(padded, 1)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    numel = shape.numel()
    bits = _unpack(packed, 1)[:numel]
    return (bits.bool() if torch.compiler.is_compiling() else bits.view(torch.bool)).view(shape)


CHUNKS = 16  # quantize and dequantize a large tensor in at most this many channel blocks


SAMPLE_VALUES_PER_BLOCK = 2**15  # a block per this many values of one sample (small tensors: one block)


def _count(shape, most: int) -> int:
    """How many channel blocks a tensor of `shape` is worked in: more for larger samples,
    at most `most`. It depends on the size of one sample only, not on the batch, so a
    profile's costs stay affine in the batch."""
    per_sample = math.prod(int(size) for size in shape[1:])
    return max(1, min(most, per_sample // SAMPLE_VALUES_PER_BLOCK)) if len(shape) > 1 else 1


def _channel_blocks(channels: int, count: int) -> list[tuple[int, int]]:
    """At most `count` (start, stop) channel ranges covering `channels`: the working
    copies exist one block at a time."""
    step = -(-channels // count)
    return [(c, min(c + step, channels)) for c in range(0, channels, step)]


def _as_channels(x: torch.Tensor) -> torch.Tensor:
    """`x` as (channels, batch, rest): dim 1 holds the channels (a 1-D tensor: one)."""
    if x.dim() > 1:
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 1)
    return x.view(1, 1, -1)


def _to_bfloat16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 `x` rounded to bfloat16 toward +inf (`up`) or -inf: its top 16 bits,
    one unit more in magnitude where bits were cut from a value on the rounding side."""
    bits = x.contiguous().view(torch.int32)
    cut = bits & -65536  # toward zero
    away = ((bits & 65535) != 0) & ((bits >= 0) if up else (bits < 0))
    return cut.add_(away.to(torch.int32) * 65536).view(torch.float32).to(torch.bfloat16)


def group_range(lowest: torch.Tensor, highest: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, scale) in bfloat16 with low <= lowest and low + levels x scale >= highest
    (within float32 rounding, which the codes' clamp absorbs); scale 1 for an empty or
    constant group."""
    low = _to_bfloat16(torch.where(lowest.isfinite(), lowest, 0.0), up=False)
    spread = (highest - low.float()).div_(levels)
    scale = _to_bfloat16(torch.where(spread > 0, spread, 1.0), up=True)
    return low, scale


def quantize(x: torch.Tensor, bits: int, split: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, per-group low, per-group scale): each value stochastically rounded
    to one of 2**bits levels between its group's min and max (unbiased). Groups are
    rows of GROUP values of one channel (see `grouped`); the work is done a block of
    channels at a time, so the float working copy is a fraction of `x`.

    With `split` (a bool tensor shaped as `x`), each group has two ranges, one for the
    values where `split` is False and one where it is True (low and scale are then
    (groups, 2)): values on either side of a ReLU's threshold get levels of their own."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    moved = _as_channels(x.detach())
    sides = None if split is None else _as_channels(split)
    channels, length = moved.shape[0], moved.shape[1] * moved.shape[2]
    rows_per_channel = (length + (-length) % GROUP) // GROUP
    packed = torch.empty(channels * rows_per_channel * GROUP * bits // 8, dtype=torch.uint8, device=x.device)
    low = torch.empty((channels * rows_per_channel, 1 if split is None else 2), dtype=torch.bfloat16, device=x.device)
    scale = torch.empty_like(low)
    levels = 2**bits - 1
    for start, stop in _channel_blocks(channels, _count(x.shape, CHUNKS)):
        rows = grouped(moved[start:stop], channels_first=True)
        row_slice = slice(start * rows_per_channel, stop * rows_per_channel)
        block_low, block_scale = low[row_slice], scale[row_slice]
        if sides is None:
            found_low, found_scale = group_range(rows.amin(1), rows.amax(1), levels)
            block_low[:, 0], block_scale[:, 0] = found_low, found_scale
            rows.sub_(found_low.float()[:, None]).div_(found_scale.float()[:, None])
        else:
            chosen = grouped(sides[start:stop], channels_first=True, dtype=torch.bool)
            for column, side in enumerate((~chosen, chosen)):
                block_low[:, column], block_scale[:, column] = group_range(
                    rows.masked_fill(~side, float("inf")).amin(1), rows.masked_fill(~side, float("-inf")).amax(1), levels)
            rows.sub_(torch.where(chosen, block_low[:, 1:].float(), block_low[:, :1].float()))
            rows.div_(torch.where(chosen, block_scale[:, 1:].float(), block_scale[:, :1].float()))
            del chosen
        rows.mul_(256).floor_()
        # + u in [0, 1) with u = k / 256: floor(v + u) for v in 1/256 steps, in integers
        noise = torch.empty(rows.shape, dtype=torch.uint8, device=x.device).random_(0, 256, generator=_generator(x.device))
        codes = rows.add_(noise).div_(256).floor_().clamp_(0, levels).to(torch.uint8)
        per_byte = 8 // bits
        packed[start * rows_per_channel * GROUP // per_byte: stop * rows_per_channel * GROUP // per_byte].copy_(
            _pack(codes.view(-1), bits))
    return packed, low, scale


def grouped(x: torch.Tensor, channels_first: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A copy of `x` in `dtype` as rows of GROUP values, each row from one channel (dim
    1; dim 0 with `channels_first`, for an (channels, batch, rest) view), each channel
    padded to whole rows with copies of its last value (so padding widens no group's
    range: a channel of 16 values is one row, quantized over those 16 alone)."""
    moved = x if channels_first else _as_channels(x)
    length = moved.shape[1] * moved.shape[2]
    rows = torch.empty((moved.shape[0], length + (-length) % GROUP), dtype=dtype, device=x.device)
    rows[:, :length].view(moved.shape).copy_(moved)
    if rows.shape[1] > length:
        rows[:, length:].copy_(rows[:, length - 1:length].expand(-1, rows.shape[1] - length))
    return rows.view(-1, GROUP)


def dequantize(packed: torch.Tensor, low: torch.Tensor, scale: torch.Tensor, bits: int,
               shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The tensor `quantize` was given, to within one level per value, built a block of
    channels at a time into its final (contiguous) layout."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    moved = _as_channels(out)
    for start, stop in _channel_blocks(moved.shape[0], _count(shape, CHUNKS)):
        _dequantize_into(moved[start:stop], packed, low, scale, bits, moved.shape[0], start)
    return out


def _dequantize_into(target: torch.Tensor, packed, low, scale, bits: int, channels: int, start: int,
                     split: torch.Tensor | None = None) -> None:
    """Write channels start, start + 1, ... of a quantized tensor of `channels` channels
    into `target`, their (channels, batch, rest) view. `split`: the same channels of
    the mask it was quantized with (see `quantize`), in the same view."""
    stop = start + target.shape[0]
    rows_per_channel = low.shape[0] // channels
    width = rows_per_channel * GROUP * bits // 8
    rows = slice(start * rows_per_channel, stop * rows_per_channel)
    values = _unpack(packed[start * width: stop * width], bits).view(-1, GROUP).float()
    if split is None:
        values.mul_(scale[rows].float()).add_(low[rows].float())
    else:
        chosen = grouped(split, channels_first=True, dtype=torch.bool)
        values.mul_(torch.where(chosen, scale[rows][:, 1:].float(), scale[rows][:, :1].float()))
        values.add_(torch.where(chosen, low[rows][:, 1:].float(), low[rows][:, :1].float()))
        del chosen
    length = target.shape[1] * target.shape[2]
    target.copy_(values.view(stop - start, -1)[:, :length].view(target.shape))


# ---- lossless --------------------------------------------------------------------------
class _Mask(Function):
    """relu / leaky_relu: the backward needs only where the input was positive."""

    @staticmethod
    def forward(ctx, x, slope: float, inplace: bool):
        if slope == 0.0:
            out = x.relu_() if inplace else x.relu()
            passed = ~(out <= 0)  # eager's threshold_backward: zero where the result is <= 0
        else:
            passed = x > 0  # eager's leaky_relu_backward: grad where the input is > 0
            out = F.leaky_relu(x, slope, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(pack_bits(passed))
        ctx.shape, ctx.slope = x.shape, slope
        return out

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        passed = unpack_bits(packed, ctx.shape)
        other = grad.new_zeros(()) if ctx.slope == 0.0 else grad * ctx.slope
        return torch.where(passed, grad, other), None, None


def relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _Mask.apply(x, 0.0, inplace)


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    return _Mask.apply(x, float(negative_slope), inplace)


class _Clamp(Function):
    """hardtanh / relu6: the backward needs only where the input was strictly inside
    (min_val, max_val)."""

    @staticmethod
    def forward(ctx, x, low: float, high: float, inplace: bool):
        out = F.hardtanh(x, low, high, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        # eager's hardtanh_backward: zero where the value is <= min_val or >= max_val (the
        # output is on the same side of both as the input; NaN passes)
        ctx.save_for_backward(pack_bits(~((out <= low) | (out >= high))))
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return torch.where(unpack_bits(packed, ctx.shape), grad, grad.new_zeros(())), None, None, None


def hardtanh(x: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> torch.Tensor:
    return _Clamp.apply(x, float(min_val), float(max_val), inplace)


def relu6(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _Clamp.apply(x, 0.0, 6.0, inplace)


class _Dropout(Function):
    @staticmethod
    def forward(ctx, x, p: float):
        ctx.p, ctx.shape = p, x.shape
        if x.device.type in ("cuda", "xpu"):  # eager's fused kernel there
            out, mask = torch.native_dropout(x, p, True)
        else:  # eager's CPU path: a Bernoulli noise tensor, scaled, multiplied in
            noise = torch.empty_like(x).bernoulli_(1 - p)
            mask = noise != 0
            out = x * noise.div_(1 - p)
        ctx.save_for_backward(pack_bits(mask))
        return out

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape)
        if grad.device.type in ("cuda", "xpu"):
            return torch.ops.aten.native_dropout_backward(grad, mask, 1 / (1 - ctx.p)), None
        return grad * mask.to(grad.dtype).div_(1 - ctx.p), None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout, 0 < p < 1, drawing the same mask as eager."""
    return _Dropout.apply(x, p)


def _ntuple(value, n: int) -> list[int]:
    """A pooling argument per spatial axis (`n` of them)."""
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * n


def _stand_in(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A tensor of `shape` that holds no memory, for backward kernels that read only sizes."""
    return like.new_zeros(()).expand(shape)


def _window_origins(out_h: int, out_w: int, stride: list[int], padding: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = (torch.arange(out_h, device=device) * stride[0] - padding[0]).view(-1, 1)
    cols = (torch.arange(out_w, device=device) * stride[1] - padding[1]).view(1, -1)
    return rows, cols


class _MaxPool2d(Function):
    @staticmethod
    def forward(ctx, x, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool):
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        width = x.shape[-1]
        rows, cols = _window_origins(out.shape[-2], out.shape[-1], stride, padding, x.device)
        row = torch.div(indices, width, rounding_mode="floor")
        col = indices.remainder_(width)
        row.sub_(rows).div_(dilation[0], rounding_mode="floor").mul_(kernel[1])
        col.sub_(cols).div_(dilation[1], rounding_mode="floor")
        offsets = row.add_(col).to(torch.uint8)
        ctx.save_for_backward(offsets)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode = ctx.args
        width = ctx.shape[-1]
        rows, cols = _window_origins(offsets.shape[-2], offsets.shape[-1], stride, padding, grad.device)
        offsets = offsets.long()
        row = torch.div(offsets, kernel[1], rounding_mode="floor")
        col = offsets.sub_(row * kernel[1]).mul_(dilation[1]).add_(cols)
        indices = row.mul_(dilation[0]).add_(rows).mul_(width).add_(col)
        grad_in = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, _stand_in(ctx.shape, grad), kernel, stride, padding, dilation, ceil_mode, indices)
        return grad_in, None, None, None, None, None


def _max_pool_args(n: int, kernel_size, stride, padding, dilation) -> tuple[list[int], ...]:
    """Kernel, stride, padding and dilation of an `n`-D max pooling, per axis; the
    window must have at most 256 positions (offsets in one byte)."""
    kernel = _ntuple(kernel_size, n)
    if math.prod(kernel) > 256:
        raise ValueError(f"max_pool{n}d: kernel_size={kernel_size} has more than 256 positions; offsets need one byte")
    stride = kernel if stride is None or stride == [] else _ntuple(stride, n)
    return kernel, stride, _ntuple(padding, n), _ntuple(dilation, n)


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> torch.Tensor:
    return _MaxPool2d.apply(x, *_max_pool_args(2, kernel_size, stride, padding, dilation), bool(ceil_mode))


class _AvgPool(Function):
    """Average pooling (2-D or 3-D, by the kernel's length) keeping only its input's shape."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        ctx.args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        ctx.shape = x.shape
        pool = F.avg_pool2d if len(kernel) == 2 else F.avg_pool3d
        return pool(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def backward(ctx, grad):
        backward = torch.ops.aten.avg_pool2d_backward if len(ctx.args[0]) == 2 else torch.ops.aten.avg_pool3d_backward
        grad_in = backward(grad, _stand_in(ctx.shape, grad), *ctx.args)
        return grad_in, None, None, None, None, None, None


def _avg_pool(n: int, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override) -> torch.Tensor:
    kernel = _ntuple(kernel_size, n)
    stride = kernel if stride is None or stride == [] else _ntuple(stride, n)
    return _AvgPool.apply(x, kernel, stride, _ntuple(padding, n), bool(ceil_mode), bool(count_include_pad), divisor_override)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    return _avg_pool(2, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


class _MaxPool3d(Function):
    """`_MaxPool2d` for volumes: the argmax as one byte, its offset within a window of at
    most 256 positions (depth, then row, then column)."""

    @staticmethod
    def forward(ctx, x, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool):
        out, indices = torch.ops.aten.max_pool3d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        height, width = x.shape[-2:]
        depths, rows, cols = _volume_origins(out.shape[-3:], stride, padding, x.device)
        depth = torch.div(indices, height * width, rounding_mode="floor")
        rest = indices.remainder_(height * width)
        row = torch.div(rest, width, rounding_mode="floor")
        col = rest.remainder_(width)
        depth.sub_(depths).div_(dilation[0], rounding_mode="floor").mul_(kernel[1] * kernel[2])
        row.sub_(rows).div_(dilation[1], rounding_mode="floor").mul_(kernel[2])
        col.sub_(cols).div_(dilation[2], rounding_mode="floor")
        offsets = depth.add_(row).add_(col).to(torch.uint8)
        ctx.save_for_backward(offsets)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode = ctx.args
        height, width = ctx.shape[-2:]
        depths, rows, cols = _volume_origins(offsets.shape[-3:], stride, padding, grad.device)
        offsets = offsets.long()
        depth = torch.div(offsets, kernel[1] * kernel[2], rounding_mode="floor")
        rest = offsets.sub_(depth * (kernel[1] * kernel[2]))
        row = torch.div(rest, kernel[2], rounding_mode="floor")
        col = rest.sub_(row * kernel[2]).mul_(dilation[2]).add_(cols)
        indices = depth.mul_(dilation[0]).add_(depths).mul_(height * width)
        indices.add_(row.mul_(dilation[1]).add_(rows).mul_(width)).add_(col)
        grad_in = torch.ops.aten.max_pool3d_with_indices_backward(
            grad, _stand_in(ctx.shape, grad), kernel, stride, padding, dilation, ceil_mode, indices)
        return grad_in, None, None, None, None, None


def _volume_origins(shape, stride: list[int], padding: list[int], device) -> tuple[torch.Tensor, ...]:
    """Each output position's window origin along depth, rows and columns, shaped to broadcast."""
    views = ((-1, 1, 1), (1, -1, 1), (1, 1, -1))
    return tuple((torch.arange(size, device=device) * s - p).view(view)
                 for size, s, p, view in zip(shape, stride, padding, views))


def max_pool3d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> torch.Tensor:
    return _MaxPool3d.apply(x, *_max_pool_args(3, kernel_size, stride, padding, dilation), bool(ceil_mode))


def avg_pool3d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    return _avg_pool(3, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


# ---- lossy -----------------------------------------------------------------------------
# The backward of a lossy op works a block of channels at a time (BatchNorm is per
# channel; a convolution is a sum over its input channels, or over its groups), so the
# dequantized input exists one block at a time, not whole beside the input gradient.
BACKWARD_BLOCKS = 8  # at most this many blocks in a backward


class _Copy:
    """A tensor quantized for the backward: its channels are dequantized a block at a time."""

    def __init__(self, x: torch.Tensor, bits: int):
        self.bits, self.shape, self.dtype = bits, x.shape, x.dtype

    def channels(self, packed, low, scale, start: int, stop: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Channels [start, stop) of the quantized tensor, dequantized, contiguous;
        `mask`: the split it was quantized with (see `quantize`), as `_pack_channels` keeps it."""
        shape = self.shape
        block = (shape[0], stop - start, *shape[2:]) if len(shape) > 1 else shape
        out = torch.empty(block, dtype=self.dtype, device=packed.device)
        split = None if mask is None else _as_channels(_unpack_channels(mask, shape, start, stop))
        _dequantize_into(_as_channels(out), packed, low, scale, self.bits, shape[1] if len(shape) > 1 else 1, start, split)
        return out


def _pack_channels(mask: torch.Tensor) -> torch.Tensor:
    """A bool (N, C, ...) tensor as bits, each channel's bytes apart: (C, bytes)."""
    moved = _as_channels(mask).reshape(mask.shape[1] if mask.dim() > 1 else 1, -1).view(torch.uint8)
    padded = torch.zeros((moved.shape[0], moved.shape[1] + (-moved.shape[1]) % 8), dtype=torch.uint8, device=mask.device)
    padded[:, : moved.shape[1]] = moved  # padded by copying in (F.pad needs a concrete width)
    return _pack(padded.view(-1), 1).view(moved.shape[0], -1)


def _unpack_channels(packed: torch.Tensor, shape: torch.Size, start: int, stop: int) -> torch.Tensor:
    """Channels [start, stop) of a `_pack_channels` mask, as a bool (N, stop - start, ...) tensor."""
    per_channel = shape.numel() // (shape[1] if len(shape) > 1 else 1)
    bits = _unpack(packed[start:stop].reshape(-1), 1).view(stop - start, -1)[:, :per_channel]
    block = (stop - start, shape[0], *shape[2:]) if len(shape) > 1 else (1, *shape)
    return bits.view(torch.bool).reshape(block).movedim(0, 1) if len(shape) > 1 else bits.view(torch.bool).view(shape)


def _conv_block_count(shape, weight_shape) -> int:
    """How many blocks the backward of a convolution with input `shape` and weight
    `weight_shape` works in: a block's weight slice and its weight gradient are working
    copies too, so a large weight asks for as many blocks as a large sample does (both
    independent of the batch)."""
    return max(_count(shape, BACKWARD_BLOCKS), _count((1, *weight_shape), BACKWARD_BLOCKS))


def _conv_blocks(shape, weight_shape, groups: int) -> list[tuple[slice, slice]]:
    """(input channels, output channels) of each block the backward of a convolution
    with input `shape` and weight `weight_shape` takes apart (`_conv_block_count` of
    them): input-channel blocks over all outputs (groups == 1), or blocks of whole groups."""
    out_channels, channels, count = weight_shape[0], shape[1], _conv_block_count(shape, weight_shape)
    if groups == 1:
        return [(slice(a, b), slice(0, out_channels)) for a, b in _channel_blocks(channels, count)]
    per_in, per_out = channels // groups, out_channels // groups
    return [(slice(a * per_in, b * per_in), slice(a * per_out, b * per_out)) for a, b in _channel_blocks(groups, count)]


def _conv_forward(x, weight, bias, conv_args) -> torch.Tensor:
    """conv1d/2d/3d (by the weight's rank) with `conv_args` = (stride, padding, dilation, groups)."""
    return (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3](x, weight, bias, *conv_args)


def _module_conv_args(module: nn.Module) -> tuple:
    """A convolution module's (stride, padding, dilation, groups), as plain ints."""
    return ([int(v) for v in module.stride], [int(v) for v in module.padding],
            [int(v) for v in module.dilation], int(module.groups))


def _conv_backward_block(grad, x, weight, conv_args, inputs: slice, outputs: slice, needs) -> tuple:
    """Input and weight gradients of one block of `_conv_blocks`: (input gradient of
    channels `inputs`, weight gradient of its slice (or None))."""
    stride, padding, dilation, groups = conv_args
    if groups == 1:
        w, g, blocks = weight[:, inputs], grad, 1
    else:
        w, g, blocks = weight[outputs], grad[:, outputs], (inputs.stop - inputs.start) // (weight.shape[1])
    dims = weight.dim() - 2
    grad_in, grad_weight, _ = torch.ops.aten.convolution_backward(
        g.contiguous(), x, w.contiguous(), None, stride, padding, dilation, False, [0] * dims, blocks, [needs[0], needs[1], False])
    return grad_in, grad_weight


def _conv_backward(grad, copy: _Copy, saved, weight, conv_args, has_bias: bool, needs, rebuild=None, mask=None) -> tuple:
    """(input, weight, bias) gradients of a convolution whose input is `copy`, a block
    of channels at a time (`saved`: packed, low, scale; `mask`: the split it was
    quantized with); `rebuild(block, channels)` maps a dequantized block to the
    convolution's actual input (identity if None)."""
    blocks = _conv_blocks(copy.shape, weight.shape, conv_args[3])
    whole = len(blocks) == 1  # the block's gradients are the gradients: no buffers to copy them into
    grad_in = grad.new_empty(copy.shape) if needs[0] and not whole else None
    grad_weight = torch.empty_like(weight) if needs[1] and not whole else None
    for inputs, outputs in blocks:
        block = copy.channels(*saved, inputs.start, inputs.stop, mask)
        if rebuild is not None:
            block = rebuild(block, inputs)
        gi, gw = _conv_backward_block(grad, block, weight, conv_args, inputs, outputs, needs)
        del block
        if whole:
            grad_in, grad_weight = gi, gw
            continue
        if gi is not None:
            grad_in[:, inputs] = gi
        if gw is not None:
            if conv_args[3] == 1:
                grad_weight[:, inputs] = gw
            else:
                grad_weight[outputs] = gw
    grad_bias = grad.sum([0, *range(2, grad.dim())]) if has_bias and needs[2] else None
    return grad_in, grad_weight, grad_bias


def _refuse_autocast(x: torch.Tensor) -> None:
    """Lossy copies are dequantized to float32 for PyTorch's backward kernels, which
    under autocast take the lower precision the forward ran in: refused, by name."""
    if torch.is_autocast_enabled(x.device.type):
        raise InputError("a lossy-compressed op (compress_bits / compress_error) ran under torch.autocast, which it "
                         "does not support; plan without lossy compression to train in mixed precision")


def _quantized(x: torch.Tensor, bits: int, packed, low, scale) -> tuple:
    """`x` quantized to `bits`, or the copy of it another op made (`shared_copy`)."""
    return quantize(x, bits) if packed is None else (packed, low, scale)


def shared_copy(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One quantized copy of `x` (see `quantize`) for every lossy op that reads `x` at
    `bits` (their `copy` argument): they keep it once between them. None without
    autograd (the ops then run as they are)."""
    _refuse_autocast(x)
    return quantize(x, bits) if torch.is_grad_enabled() else None


class _Conv(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, bits, packed, low, scale):
        ctx.conv_args, ctx.has_bias = (stride, padding, dilation, groups), bias is not None
        ctx.copy = _Copy(x, bits)
        ctx.save_for_backward(*_quantized(x, bits, packed, low, scale), weight)
        return _conv_forward(x, weight, bias, ctx.conv_args)

    @staticmethod
    def backward(ctx, grad):
        packed, low, scale, weight = ctx.saved_tensors
        grads = _conv_backward(grad, ctx.copy, (packed, low, scale), weight, ctx.conv_args, ctx.has_bias,
                               ctx.needs_input_grad)
        return (*grads, None, None, None, None, None, None, None, None)


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1, bits: int = 4, copy=None):
    """conv1d/2d/3d (by the weight's rank) keeping `x` quantized to `bits` for the
    backward (`copy`: a `shared_copy` of `x` at `bits` to keep instead)."""
    dims = weight.dim() - 2

    def many(v):
        return [int(e) for e in v] if isinstance(v, (tuple, list)) else [int(v)] * dims

    return _Conv.apply(x, weight, bias, many(stride), many(padding), many(dilation), int(groups), bits, *(copy or (None,) * 3))


class _Convs(Function):
    """Convolutions (groups == 1) of one input, keeping one quantized copy of it. The
    backward dequantizes each block of input channels once and sums every convolution's
    input gradient into one buffer, where apart each would allocate its own and autograd
    would add them."""

    @staticmethod
    def forward(ctx, x, bits, conv_args, *params):
        weights, biases = params[0::2], params[1::2]
        ctx.copy, ctx.conv_args = _Copy(x, bits), conv_args
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(*quantize(x, bits), *weights)
        return tuple(_conv_forward(x, w, b, args) for w, b, args in zip(weights, biases, conv_args))

    @staticmethod
    def backward(ctx, *grads):
        packed, low, scale, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        shape = ctx.copy.shape
        count = max(_conv_block_count(shape, w.shape) for w in weights)
        grad_in = grads[0].new_zeros(shape) if needs[0] else None
        grad_weights = [torch.empty_like(w) if needs[3 + 2 * k] else None for k, w in enumerate(weights)]
        for start, stop in _channel_blocks(shape[1], count):
            inputs = slice(start, stop)
            block = ctx.copy.channels(packed, low, scale, start, stop)
            for k, (grad, weight, args) in enumerate(zip(grads, weights, ctx.conv_args)):
                gi, gw = _conv_backward_block(grad, block, weight, args, inputs, slice(None),
                                              [needs[0], grad_weights[k] is not None])
                if gi is not None:
                    grad_in[:, inputs] += gi
                if gw is not None:
                    grad_weights[k][:, inputs] = gw
                del gi, gw
            del block
        out = [grad_in, None, None]
        for k, grad in enumerate(grads):
            bias_needed = ctx.has_bias[k] and needs[4 + 2 * k]
            out += [grad_weights[k], grad.sum([0, *range(2, grad.dim())]) if bias_needed else None]
        return tuple(out)


def convs(modules, x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, ...]:
    """`tuple(m(x) for m in modules)` for convolutions `modules` (groups 1, zero
    padding), keeping one quantized copy of `x` for all of their backwards and summing
    their input gradients in place (see `_Convs`); as the modules run it where nothing
    needs a gradient."""
    if not _needs_autograd(x, *modules):
        return tuple(m(x) for m in modules)
    for m in modules:
        if not isinstance(m, nn.modules.conv._ConvNd) or m.groups != 1 or m.transposed or m.padding_mode != "zeros":
            raise ValueError(f"convs: {m!r} is not a zero-padded convolution with groups=1")
    _refuse_autocast(x)
    conv_args = tuple(_module_conv_args(m) for m in modules)
    return _Convs.apply(x, bits, conv_args, *(t for m in modules for t in (m.weight, m.bias)))


def _linear_backward(grad, x, weight, has_bias: bool, needs) -> tuple:
    flat_grad = grad.reshape(-1, grad.shape[-1])
    grad_in = grad @ weight if needs[0] else None
    grad_weight = flat_grad.t() @ x.reshape(-1, x.shape[-1]) if needs[1] else None
    return grad_in, grad_weight, flat_grad.sum(0) if has_bias and needs[2] else None


class _Linear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bits, packed, low, scale):
        ctx.has_bias = bias is not None
        ctx.copy = _Copy(x, bits)
        ctx.save_for_backward(*_quantized(x, bits, packed, low, scale), weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        packed, low, scale, weight = ctx.saved_tensors
        x = dequantize(packed, low, scale, ctx.copy.bits, ctx.copy.shape, ctx.copy.dtype)
        return (*_linear_backward(grad, x, weight, ctx.has_bias, ctx.needs_input_grad), None, None, None, None)


def linear(x, weight, bias=None, bits: int = 4, copy=None):
    return _Linear.apply(x, weight, bias, bits, *(copy or (None,) * 3))


def _running_factor(running_mean, num_batches_tracked, momentum) -> float:
    """The running statistics' update factor of this step, as nn.BatchNorm takes it,
    with `num_batches_tracked` counted once."""
    factor = 0.0 if momentum is None else momentum
    if running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:  # a cumulative moving average
            factor = 1.0 / float(num_batches_tracked)
    return factor


def _batch_norm_forward(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    """Training-mode batch norm as nn.BatchNorm runs it: (output, mean, invstd), the
    running statistics and `num_batches_tracked` updated once."""
    factor = _running_factor(running_mean, num_batches_tracked, momentum)
    return torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)


def _batch_norm_forward_into(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    """`_batch_norm_forward` with the output written over `x`, a block of channels at a
    time (each block's statistics are its channels' own, so output, statistics and
    running statistics equal the whole op's): (x, mean, invstd)."""
    factor = _running_factor(running_mean, num_batches_tracked, momentum)
    means, invstds = [], []
    for start, stop in _channel_blocks(x.shape[1], _count(x.shape, CHUNKS)):
        channels = slice(start, stop)
        out, mean, invstd = torch.native_batch_norm(
            x[:, channels].contiguous(), *(None if t is None else t[channels] for t in (weight, bias, running_mean, running_var)),
            True, factor, eps)
        x[:, channels] = out
        means.append(mean)
        invstds.append(invstd)
    return x, torch.cat(means), torch.cat(invstds)


def _batch_norm_backward_block(grad, x, weight, mean, invstd, eps, channels: slice, needs) -> tuple:
    """BatchNorm's (input, weight, bias) gradients for `channels`, from their input `x`."""
    return torch.ops.aten.native_batch_norm_backward(
        grad, x, None if weight is None else weight[channels], None, None, mean[channels], invstd[channels],
        True, eps, [needs[0], weight is not None and needs[1], needs[2]])


def _batch_norm_backward(grad, grad_of, copy: _Copy, saved, weight, mean, invstd, eps, needs, blocks,
                         mask=None) -> tuple:
    """BatchNorm's (input, weight, bias) gradients from its quantized input `copy`, a
    block of channels at a time (`blocks`: (start, stop) ranges); `grad_of(channels)`
    gives those channels of its output gradient `grad`, contiguous."""
    shape = copy.shape
    if len(blocks) == 1:  # the block's gradients are the gradients: no buffers to copy them into
        x = copy.channels(*saved, 0, shape[1] if len(shape) > 1 else 1, mask)
        return _batch_norm_backward_block(grad_of(slice(None)), x, weight, mean, invstd, eps, slice(None), needs)
    grad_in = grad.new_empty(shape) if needs[0] else None
    grad_weight = torch.empty_like(weight) if needs[1] else None
    grad_bias = grad.new_empty(shape[1]) if needs[2] else None
    for start, stop in blocks:
        channels = slice(start, stop)
        g = grad_of(channels)
        x = copy.channels(*saved, start, stop, mask)
        gi, gw, gb = _batch_norm_backward_block(g, x, weight, mean, invstd, eps, channels, needs)
        del x, g
        if grad_in is not None:
            grad_in[:, channels] = gi
        if grad_weight is not None:
            grad_weight[channels] = gw
        if grad_bias is not None:
            grad_bias[channels] = gb
    return grad_in, grad_weight, grad_bias


def _per_channel(values: torch.Tensor, dims: int) -> torch.Tensor:
    return values.view((1, -1) + (1,) * (dims - 2))


class _BatchNorm(Function):
    """Training-mode batch norm: batch statistics, running statistics updated once.
    With `overwrite`, the output is written over the input once its copy is made (for
    an input nothing else reads or keeps)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, bits,
                overwrite, packed, low, scale):
        ctx.copy = _Copy(x, bits)
        copy = _quantized(x, bits, packed, low, scale)
        overwrite = overwrite and _count(x.shape, CHUNKS) > 1  # whole, the output would exist beside x anyway
        norm = _batch_norm_forward_into if overwrite else _batch_norm_forward
        out, mean, invstd = norm(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
        if overwrite:
            ctx.mark_dirty(x)
        ctx.save_for_backward(*copy, mean, invstd, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        packed, low, scale, mean, invstd, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        shape = ctx.copy.shape
        grads = _batch_norm_backward(
            grad, lambda channels: grad[:, channels].contiguous(), ctx.copy, (packed, low, scale), weight, mean, invstd,
            ctx.eps, [needs[0], weight is not None and needs[1], ctx.has_bias and needs[2]],
            _channel_blocks(shape[1], _count(shape, BACKWARD_BLOCKS)))
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, bits: int = 4, copy=None,
               overwrite: bool = False):
    """BatchNorm in training mode as nn.BatchNorm does it, keeping `x` quantized (`copy`:
    a `shared_copy` of `x` at `bits` to keep instead). `overwrite`: write the output over
    `x`, which must then be a tensor nothing else reads afterwards or keeps for its
    backward (a convolution's output read only by this BatchNorm): the forward then never
    holds input and output whole at once."""
    if overwrite and copy is not None:
        raise ValueError("batch_norm: overwrite=True with a shared copy: other ops read x; pass one or the other")
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, bits,
                            overwrite, *(copy or (None,) * 3))


class _PerSampleNorm(Function):
    """GroupNorm, or InstanceNorm (a group per channel), statistics per sample: the
    forward exactly as the module's, the backward PyTorch's group-norm backward kernel
    on the dequantized input with the statistics of the exact one."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, forward, bits, packed, low, scale):
        ctx.copy = _Copy(x, bits)
        copy = _quantized(x, bits, packed, low, scale)
        n = x.shape[0]
        var, mean = torch.var_mean(x.reshape(n, groups, -1), dim=2, correction=0)
        ctx.save_for_backward(*copy, mean, (var + eps).rsqrt(), weight)
        ctx.groups, ctx.has_bias = groups, bias is not None
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        packed, low, scale, mean, rstd, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        shape = ctx.copy.shape
        x = dequantize(packed, low, scale, ctx.copy.bits, shape, ctx.copy.dtype)
        mask = [needs[0], weight is not None and needs[1], ctx.has_bias and needs[2]]
        grads = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), x, mean, rstd, weight, shape[0], shape[1], math.prod(shape[2:]), ctx.groups, mask)
        return (*(g if m else None for g, m in zip(grads, mask)), None, None, None, None, None, None, None)


def group_norm(x, groups: int, weight=None, bias=None, eps: float = 1e-5, bits: int = 4, copy=None) -> torch.Tensor:
    """F.group_norm keeping `x` quantized to `bits` for the backward (`copy`: a
    `shared_copy` of `x` at `bits` to keep instead). The dequantized input exists whole
    in the backward, beside the input gradient."""
    return _PerSampleNorm.apply(x, weight, bias, int(groups), eps, lambda t: F.group_norm(t, groups, weight, bias, eps),
                                bits, *(copy or (None,) * 3))


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, momentum: float = 0.1,
                  eps: float = 1e-5, bits: int = 4, copy=None) -> torch.Tensor:
    """F.instance_norm with input statistics (training mode, or no running statistics;
    running statistics, if given, updated once), keeping `x` quantized to `bits` for the
    backward (`copy`: a `shared_copy` of `x` at `bits` to keep instead)."""

    def forward(t):
        return F.instance_norm(t, running_mean, running_var, weight, bias, True, momentum, eps)

    return _PerSampleNorm.apply(x, weight, bias, x.shape[1], eps, forward, bits, *(copy or (None,) * 3))


class _LayerNorm(Function):
    """LayerNorm (statistics per position over the trailing `normalized_shape`: over the
    channels in a ConvNeXt block): the forward exactly as the module's, the backward
    PyTorch's layer-norm backward kernel on the dequantized input with the statistics
    of the exact one."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, bits, packed, low, scale):
        ctx.copy = _Copy(x, bits)
        copy = _quantized(x, bits, packed, low, scale)
        out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(*copy, mean, rstd, weight, bias)
        ctx.normalized_shape = normalized_shape
        return out

    @staticmethod
    def backward(ctx, grad):
        packed, low, scale, mean, rstd, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x = dequantize(packed, low, scale, ctx.copy.bits, ctx.copy.shape, ctx.copy.dtype)
        mask = [needs[0], weight is not None and needs[2], bias is not None and needs[3]]
        grads = torch.ops.aten.native_layer_norm_backward(grad, x, ctx.normalized_shape, mean, rstd, weight, bias, mask)
        return (grads[0] if mask[0] else None, None, *(g if m else None for g, m in zip(grads[1:], mask[1:])),
                None, None, None, None, None)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5, bits: int = 4, copy=None) -> torch.Tensor:
    """F.layer_norm keeping `x` quantized to `bits` for the backward (`copy`: a
    `shared_copy` of `x` at `bits` to keep instead). The dequantized input exists whole
    in the backward, beside the input gradient."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return _LayerNorm.apply(x, shape, weight, bias, eps, bits, *(copy or (None,) * 3))


class _PReLU(Function):
    """PReLU: where the input was positive as a 1-bit mask (the input gradient, exact),
    and the input quantized for the slope's gradient, the sum of the incoming gradient
    times the negative inputs."""

    @staticmethod
    def forward(ctx, x, weight, bits, packed, low, scale):
        ctx.copy = _Copy(x, bits)
        ctx.save_for_backward(pack_bits(x > 0), *_quantized(x, bits, packed, low, scale), weight)
        return F.prelu(x, weight)

    @staticmethod
    def backward(ctx, grad):
        mask, packed, low, scale, weight = ctx.saved_tensors
        shape = ctx.copy.shape
        passed = unpack_bits(mask, shape)
        dims = len(shape)
        slope = _per_channel(weight, dims) if weight.numel() > 1 and dims > 1 else weight
        grad_in = torch.where(passed, grad, grad * slope) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:  # eager's prelu backward: the slope's gradient where the input is not > 0
            x = dequantize(packed, low, scale, ctx.copy.bits, shape, ctx.copy.dtype)
            negative = (grad * x.clamp_(max=0)).masked_fill_(passed, 0)
            del x
            over = [d for d in range(dims) if not (weight.numel() > 1 and d == 1)]
            grad_weight = negative.sum(over).view_as(weight)
        return grad_in, grad_weight, None, None, None, None


def prelu(x, weight, bits: int = 4, copy=None) -> torch.Tensor:
    """F.prelu keeping a 1-bit mask of where `x` was positive (its input gradient,
    exact) and `x` quantized to `bits` (its slope's gradient; `copy`: a `shared_copy` of
    `x` at `bits` to keep instead)."""
    return _PReLU.apply(x, weight, bits, *(copy or (None,) * 3))


def add_into(a: torch.Tensor, b) -> torch.Tensor:
    """`a + b`, written over `a` where the sum has a's shape and dtype (the residual sum
    `out += identity` that tracing turns into `out + identity`); `a` must be a tensor
    that nothing else reads afterwards and no backward keeps (a lossy BatchNorm's output)."""
    if a.dtype == torch.result_type(a, b) and (
            not isinstance(b, torch.Tensor) or a.shape == torch.broadcast_shapes(a.shape, b.shape)):
        return a.add_(b)
    return a + b


class _NormReluConsumer(Function):
    """Training-mode BatchNorm, ReLU, then a convolution or linear layer reading only the
    ReLU's output, keeping for the backward one quantized copy of the BatchNorm input
    and a 1-bit mask, where apart they keep a copy of the BatchNorm input, a mask and a
    copy of the ReLU's output. The backward, a block of channels at a time: the
    consumer's backward reads relu(batch_norm(dequantized input)), rebuilt with the mask
    (exactly 0 where the ReLU passed nothing); the ReLU's backward is the exact mask;
    BatchNorm's reads the dequantized input."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                c_weight, c_bias, conv_args, bits):
        out, mean, invstd = _batch_norm_forward(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
        out = out.relu_()
        passed = ~(out <= 0)  # eager's threshold_backward: zero where the result is <= 0
        if conv_args is None:
            result = F.linear(out, c_weight, c_bias)
        else:
            result = _conv_forward(out, c_weight, c_bias, conv_args)
        ctx.copy = _Copy(x, bits)
        ctx.save_for_backward(*quantize(x, bits, passed), _pack_channels(passed), mean, invstd, weight, bias, c_weight)
        ctx.eps, ctx.conv_args, ctx.has_c_bias = eps, conv_args, c_bias is not None
        return result

    @staticmethod
    def backward(ctx, grad):
        packed, low, scale, mask, mean, invstd, weight, bias, c_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        shape, dims = ctx.copy.shape, len(ctx.copy.shape)
        gain = invstd if weight is None else invstd * weight
        shift = -mean * gain if bias is None else bias - mean * gain

        def relu_input(x, channels: slice):  # the ReLU's output, rebuilt for these channels
            passed = _unpack_channels(mask, shape, channels.start, channels.stop)
            return torch.where(passed, x * _per_channel(gain[channels], dims) + _per_channel(shift[channels], dims),
                               x.new_zeros(()))

        if ctx.conv_args is None:  # a Linear consumer: small, whole
            x = ctx.copy.channels(packed, low, scale, 0, shape[1], mask)
            grad_out, grad_c_weight, grad_c_bias = _linear_backward(
                grad, relu_input(x, slice(0, shape[1])), c_weight, ctx.has_c_bias, [True, needs[8], needs[9]])
            blocks = [(0, shape[1])]
        else:
            grad_out, grad_c_weight, grad_c_bias = _conv_backward(
                grad, ctx.copy, (packed, low, scale), c_weight, ctx.conv_args, ctx.has_c_bias,
                [True, needs[8], needs[9]], relu_input, mask)
            blocks = _channel_blocks(shape[1], _count(shape, BACKWARD_BLOCKS))

        def relu_grad(channels: slice):  # the ReLU's backward: the exact mask, over grad_out (ours alone)
            start, stop, _ = channels.indices(shape[1])
            block = grad_out[:, channels]
            return block.masked_fill_(~_unpack_channels(mask, shape, start, stop), 0).contiguous()

        grads = _batch_norm_backward(
            grad_out, relu_grad, ctx.copy, (packed, low, scale), weight, mean, invstd, ctx.eps,
            [needs[0], weight is not None and needs[1], bias is not None and needs[2]], blocks, mask)
        return (*grads, None, None, None, None, None, grad_c_weight, grad_c_bias, None, None)


def _needs_autograd(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether a call of `modules` on `x` records a backward: grad mode on, and `x` or a
    parameter requiring a gradient."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters()))


def norm_relu_call(norm: nn.Module, consumer: nn.Module, x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """`consumer(relu(norm(x)))` for a BatchNorm `norm` and a convolution or Linear
    `consumer`, keeping one quantized copy of `x` and a mask for the backward (see
    `_NormReluConsumer`); as the three modules run it where BatchNorm uses its running
    statistics or nothing needs a gradient."""
    eval_stats = not norm.training and norm.track_running_stats
    if eval_stats or not _needs_autograd(x, norm, consumer):
        return consumer(F.relu(norm(x)))
    _refuse_autocast(x)
    if isinstance(consumer, nn.modules.conv._ConvNd):
        conv_args = _module_conv_args(consumer)
    elif isinstance(consumer, nn.Linear):
        conv_args = None
    else:
        raise ValueError(f"norm_relu_call: the consumer is a {type(consumer).__name__}; a convolution or Linear is needed")
    momentum = norm.momentum if norm.training else 0.0
    tracked = norm.num_batches_tracked if norm.training else None
    return _NormReluConsumer.apply(
        x, norm.weight, norm.bias, norm.running_mean if norm.training else None,
        norm.running_var if norm.training else None, tracked, momentum, norm.eps,
        consumer.weight, consumer.bias, conv_args, bits)


def module_call(module: nn.Module, x: torch.Tensor, bits: int | None = None, copy=None,
                overwrite: bool = False) -> torch.Tensor:
    """`module(x)` with what its backward needs compressed, as far as the module's
    state allows (a Dropout or BatchNorm in eval mode, or no autograd, runs as is);
    `copy`: a `shared_copy` of `x` at `bits` for a lossy module to keep; `overwrite`: a
    training-mode BatchNorm writes its output over `x` (see `batch_norm`)."""
    if not _needs_autograd(x, module):
        return module(x)
    if isinstance(module, nn.ReLU):
        return relu(x, module.inplace)
    if isinstance(module, nn.LeakyReLU):
        return leaky_relu(x, module.negative_slope, module.inplace)
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return hardtanh(x, module.min_val, module.max_val, module.inplace)
    if isinstance(module, nn.Dropout):
        return dropout(x, module.p) if module.training else x
    if isinstance(module, nn.MaxPool2d):
        return max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if isinstance(module, nn.AvgPool2d):
        return avg_pool2d(x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                          module.count_include_pad, module.divisor_override)
    if isinstance(module, nn.MaxPool3d):
        return max_pool3d(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if isinstance(module, nn.AvgPool3d):
        return avg_pool3d(x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                          module.count_include_pad, module.divisor_override)
    if bits is None:
        raise ValueError(f"module_call: a {type(module).__name__} is compressed lossy only; pass bits")
    _refuse_autocast(x)
    if isinstance(module, nn.modules.conv._ConvNd):
        return conv(x, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups, bits, copy)
    if isinstance(module, nn.Linear):
        return linear(x, module.weight, module.bias, bits, copy)
    if isinstance(module, nn.PReLU):
        return prelu(x, module.weight, bits, copy)
    if isinstance(module, nn.GroupNorm):
        return group_norm(x, module.num_groups, module.weight, module.bias, module.eps, bits, copy)
    if isinstance(module, nn.LayerNorm):
        return layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps, bits, copy)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        if (not module.training and module.track_running_stats) or x.dim() == module._get_no_batch_dim():
            return module(x)  # running statistics (an affine map), or an unbatched input
        return instance_norm(x, module.running_mean, module.running_var, module.weight, module.bias,
                             module.momentum if module.momentum is not None else 0.0, module.eps, bits, copy)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.training and module.track_running_stats:
            return module(x)
        momentum = module.momentum if module.training else 0.0
        tracked = module.num_batches_tracked if module.training else None
        return batch_norm(x, module.weight, module.bias, module.running_mean if module.training else None,
                          module.running_var if module.training else None, tracked, momentum, module.eps, bits, copy,
                          overwrite)
    raise ValueError(f"module_call: no compressed form for {type(module).__name__}")
