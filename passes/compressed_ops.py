"""The compressed ops: autograd Functions whose forward is the op itself, exact, and
whose saved state for the backward is smaller.

Lossless (gradients bit-for-bit equal to eager):
  relu, leaky_relu   a 1-bit mask of where the input passed (packed 8 per byte)
  dropout            its mask, 1 bit per element (eager CPU keeps a float noise tensor)
  max_pool2d         the argmax as an offset within its window, one byte per output
                     element (eager keeps int64 indices into the whole plane)
  avg_pool2d         nothing but the input's shape (eager keeps the input)
Lossy, opt-in (`bits` in 8, 4, 2; the forward stays exact):
  conv, linear, batch_norm   the activation input quantized per group of `GROUP`
                     values to `bits` with stochastic (unbiased) rounding, min and
                     scale per group in float32; the backward runs PyTorch's backward
                     kernels on the dequantized input.

Stochastic rounding draws from a generator of its own, so the model's random stream
(dropout masks) is the same as eager's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

__all__ = ["GROUP", "BITS", "pack_bits", "unpack_bits", "grouped", "quantize", "dequantize",
           "relu", "leaky_relu", "dropout", "max_pool2d", "avg_pool2d",
           "conv", "linear", "batch_norm", "module_call"]

GROUP = 64  # values per quantization group: min and scale (8 bytes) per group
BITS = (8, 4, 2)

_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    if device not in _GENERATORS:
        _GENERATORS[device] = torch.Generator(device=device).manual_seed(0)
    return _GENERATORS[device]


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
    flat = mask.reshape(-1).view(torch.uint8)
    return _pack(F.pad(flat, (0, (-flat.numel()) % 8)), 1)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    numel = shape.numel()
    return _unpack(packed, 1)[:numel].view(torch.bool).view(shape)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, per-group low, per-group scale): each value stochastically rounded
    to one of 2**bits levels between its group's min and max (unbiased)."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    scaled = grouped(x.detach())  # a copy
    low = scaled.amin(1, keepdim=True)
    levels = 2**bits - 1
    scale = (scaled.amax(1, keepdim=True) - low) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled.sub_(low).div_(scale).mul_(256).floor_()
    # + u in [0, 1) with u = k / 256: floor(v + u) for v in 1/256 steps, in integers
    noise = torch.empty(scaled.shape, dtype=torch.uint8, device=x.device).random_(0, 256, generator=_generator(x.device))
    codes = scaled.add_(noise).div_(256).floor_().clamp_(0, levels).to(torch.uint8)
    return _pack(codes.view(-1), bits), low, scale


def grouped(x: torch.Tensor) -> torch.Tensor:
    """A float copy of `x` as rows of GROUP values, each row from one channel (dim 1)."""
    moved = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 1) if x.dim() > 1 else x.view(1, 1, -1)
    length = moved.shape[1] * moved.shape[2]
    rows = torch.zeros((moved.shape[0], length + (-length) % GROUP), dtype=torch.float32, device=x.device)
    rows[:, :length].view(moved.shape).copy_(moved)
    return rows.view(-1, GROUP)


def dequantize(packed: torch.Tensor, low: torch.Tensor, scale: torch.Tensor, bits: int,
               shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    channels = shape[1] if len(shape) > 1 else 1
    values = _unpack(packed, bits).view(-1, GROUP).float().mul_(scale).add_(low).view(channels, -1)
    per_channel = values[:, : shape.numel() // channels]
    if len(shape) == 1:
        return per_channel.reshape(shape).to(dtype)
    moved = (shape[1], shape[0], *shape[2:])
    return per_channel.reshape(moved).movedim(0, 1).to(dtype, memory_format=torch.contiguous_format)


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


def _pair(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * 2


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


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> torch.Tensor:
    kernel = _pair(kernel_size)
    if kernel[0] * kernel[1] > 256:
        raise ValueError(f"max_pool2d: kernel_size={kernel_size} has more than 256 positions; offsets need one byte")
    stride = kernel if stride is None or stride == [] else _pair(stride)
    return _MaxPool2d.apply(x, kernel, stride, _pair(padding), _pair(dilation), bool(ceil_mode))


class _AvgPool2d(Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        ctx.args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        ctx.shape = x.shape
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def backward(ctx, grad):
        grad_in = torch.ops.aten.avg_pool2d_backward(grad, _stand_in(ctx.shape, grad), *ctx.args)
        return grad_in, None, None, None, None, None, None


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    kernel = _pair(kernel_size)
    stride = kernel if stride is None or stride == [] else _pair(stride)
    return _AvgPool2d.apply(x, kernel, stride, _pair(padding), bool(ceil_mode), bool(count_include_pad), divisor_override)


# ---- lossy -----------------------------------------------------------------------------
def _save_quantized(ctx, x: torch.Tensor, bits: int, *others) -> None:
    ctx.save_for_backward(*quantize(x, bits), *others)
    ctx.bits, ctx.shape, ctx.dtype = bits, x.shape, x.dtype


def _restored(ctx) -> tuple[torch.Tensor, tuple]:
    packed, low, scale, *others = ctx.saved_tensors
    return dequantize(packed, low, scale, ctx.bits, ctx.shape, ctx.dtype), others


class _Conv(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, bits):
        dims = weight.dim() - 2
        ctx.args = (stride, padding, dilation, groups, dims, bias is not None)
        _save_quantized(ctx, x, bits, weight)
        return (F.conv1d, F.conv2d, F.conv3d)[dims - 1](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, (weight,) = _restored(ctx)
        stride, padding, dilation, groups, dims, has_bias = ctx.args
        needs = ctx.needs_input_grad
        grad_in, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
            False, [0] * dims, groups, [needs[0], needs[1], has_bias and needs[2]])
        return grad_in, grad_weight, grad_bias, None, None, None, None, None


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1, bits: int = 4):
    """conv1d/2d/3d (by the weight's rank) keeping `x` quantized to `bits` for the backward."""
    dims = weight.dim() - 2

    def many(v):
        return [int(e) for e in v] if isinstance(v, (tuple, list)) else [int(v)] * dims

    return _Conv.apply(x, weight, bias, many(stride), many(padding), many(dilation), int(groups), bits)


class _Linear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bits):
        ctx.has_bias = bias is not None
        _save_quantized(ctx, x, bits, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, (weight,) = _restored(ctx)
        needs = ctx.needs_input_grad
        grad_in = grad @ weight if needs[0] else None
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_weight = flat_grad.t() @ x.reshape(-1, x.shape[-1]) if needs[1] else None
        grad_bias = flat_grad.sum(0) if ctx.has_bias and needs[2] else None
        return grad_in, grad_weight, grad_bias, None


def linear(x, weight, bias=None, bits: int = 4):
    return _Linear.apply(x, weight, bias, bits)


class _BatchNorm(Function):
    """Training-mode batch norm: batch statistics, running statistics updated once."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, bits):
        factor = 0.0 if momentum is None else momentum
        if running_mean is not None and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative moving average
                factor = 1.0 / float(num_batches_tracked)
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)
        _save_quantized(ctx, x, bits, mean, invstd, weight)
        ctx.eps, ctx.has_weight, ctx.has_bias = eps, weight is not None, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, (mean, invstd, weight) = _restored(ctx)
        needs = ctx.needs_input_grad
        grad_in, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight if ctx.has_weight else None, None, None, mean, invstd, True, ctx.eps,
            [needs[0], ctx.has_weight and needs[1], ctx.has_bias and needs[2]])
        return grad_in, grad_weight, grad_bias, None, None, None, None, None, None


def batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, bits: int = 4):
    """BatchNorm in training mode as nn.BatchNorm does it, keeping `x` quantized."""
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, bits)


def module_call(module: nn.Module, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    """`module(x)` with what its backward needs compressed, as far as the module's
    state allows (a Dropout or BatchNorm in eval mode, or no autograd, runs as is)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))):
        return module(x)
    if isinstance(module, nn.ReLU):
        return relu(x, module.inplace)
    if isinstance(module, nn.LeakyReLU):
        return leaky_relu(x, module.negative_slope, module.inplace)
    if isinstance(module, nn.Dropout):
        return dropout(x, module.p) if module.training else x
    if isinstance(module, nn.MaxPool2d):
        return max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if isinstance(module, nn.AvgPool2d):
        return avg_pool2d(x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                          module.count_include_pad, module.divisor_override)
    if bits is None:
        raise ValueError(f"module_call: a {type(module).__name__} is compressed lossy only; pass bits")
    if isinstance(module, nn.modules.conv._ConvNd):
        return conv(x, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups, bits)
    if isinstance(module, nn.Linear):
        return linear(x, module.weight, module.bias, bits)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.training and module.track_running_stats:
            return module(x)
        momentum = module.momentum if module.training else 0.0
        tracked = module.num_batches_tracked if module.training else None
        return batch_norm(x, module.weight, module.bias, module.running_mean if module.training else None,
                          module.running_var if module.training else None, tracked, momentum, module.eps, bits)
    raise ValueError(f"module_call: no compressed form for {type(module).__name__}")
