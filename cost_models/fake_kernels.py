"""Outputs of ops whose fake-tensor kernels are slow, made from their inputs' layouts.

The fake tensor mode has no meta kernel for BatchNorm: it runs the op's Python
decomposition, a score of ops, each dispatched on fake tensors; a shape it has not
seen before costs about 18 ms forward and 11 ms backward (torch 2.13, CPU), and a
DenseNet meets a new shape in nearly every layer. The profiler's tracker
(`StorageTracker(kernel=...)`) asks `kernel` first: for batch norm in training, where
every tensor is contiguous or channels-last, of one float dtype (32 or 64 bits), and
the incoming gradient is laid out as the input, it returns empty fake tensors of the
layouts the decomposition returns
(tests/test_fake_kernels.py holds the two to the same shapes, strides, dtypes and
storage bytes); any other call gets `NotImplemented`, and the op runs as it is. The
outputs' values are never read: a profile counts bytes.

`empty_fake` makes such a tensor without dispatching an op at all: a meta tensor
wrapped by hand. Asked from inside the profiler's tracker (these kernels), a fake
tensor's own `new_empty` dispatches through the fake tensor mode, checking its cache:
a batch norm's forward took 335 us that way in a profile of checkpointed segments,
113 us now. Repeated records' outputs and gradients are made with it too (a node's
replay took about 55 us either way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

__all__ = ["empty_fake", "kernel"]

aten = torch.ops.aten
_FLOATS = (torch.float32, torch.float64)  # their computation dtype is their own: no casts in the decomposition
_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _dense(t: Any) -> bool:
    """A float tensor laid out contiguous or channels-last."""
    return (isinstance(t, torch.Tensor) and t.dtype in _FLOATS and t.layout == torch.strided
            and (t.is_contiguous() or t.dim() in _LAST and t.is_contiguous(memory_format=_LAST[t.dim()])))


def _per_channel(t: Any, dtype: torch.dtype, channels: int) -> bool:
    return _dense(t) and t.dtype == dtype and tuple(t.shape) == (channels,)


def empty_fake(mode: FakeTensorMode, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> FakeTensor:
    """An uninitialised fake tensor of `mode` with this layout, on a storage of its own
    (what `torch.empty_strided` makes under the mode), made without dispatching."""
    with unset_fake_temporarily():
        meta = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return FakeTensor(mode, meta, device)


def _like(t: FakeTensor) -> FakeTensor:
    return empty_fake(t.fake_mode, t.shape, t.stride(), t.dtype, t.device)


def _channels(t: FakeTensor, channels: int) -> FakeTensor:
    return empty_fake(t.fake_mode, (channels,), (1,), t.dtype, t.device)


def _batch_norm(inp, weight, bias, running_mean, running_var, training, momentum, eps):
    if not training or not _dense(inp) or inp.dim() < 2:
        return NotImplemented
    channels = inp.shape[1]
    if inp.numel() <= channels:  # one value per channel: the decomposition divides by zero (eager's module refuses)
        return NotImplemented
    if not all(_per_channel(t, inp.dtype, channels) for t in (weight, bias, running_mean, running_var)):
        return NotImplemented
    return _like(inp), _channels(inp, channels), _channels(inp, channels)  # output, batch mean, inverse std


def _batch_norm_backward(grad_out, inp, weight, running_mean, running_var, save_mean, save_invstd, train, eps,
                         output_mask):
    if not train or list(output_mask) != [True, True, True] or not _dense(inp) or inp.dim() < 2:
        return NotImplemented
    channels = inp.shape[1]
    if not (_dense(grad_out) and grad_out.dtype == inp.dtype and grad_out.shape == inp.shape
            and grad_out.stride() == inp.stride()):
        return NotImplemented
    if not all(_per_channel(t, inp.dtype, channels) for t in (weight, save_mean, save_invstd)):
        return NotImplemented
    return _like(inp), _channels(weight, channels), _channels(weight, channels)  # input, weight, bias gradients


_KERNELS = {aten.native_batch_norm.default: _batch_norm, aten.native_batch_norm_backward.default: _batch_norm_backward}


def kernel(func, args: tuple, kwargs: dict) -> Any:
    """`func`'s outputs as empty fake tensors, for the calls this module answers (run
    from inside a dispatch mode, above the fake tensor mode); else `NotImplemented`."""
    found = _KERNELS.get(func)
    if found is None or kwargs or not isinstance(args[0], torch._subclasses.FakeTensor):
        return NotImplemented
    return found(*args)
