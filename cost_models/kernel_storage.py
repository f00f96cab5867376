"""Storages a real kernel returns that are larger than its output's own elements.

A fake tensor's storage holds exactly its elements. Some real kernels return their
output on a larger storage: on CPU (torch 2.13) `mse_loss`, `smooth_l1_loss`,
`soft_margin_loss` and `binary_cross_entropy` with a mean or sum reduction return the
0-dim loss on the storage of the unreduced loss, as large as their input, which lives
as long as the loss tensor (through the whole backward). And a 3-D transposed
convolution that runs on the `SlowTranspose3d` backend (CPU, float32 at batch 1, float64
at any batch) returns its output on a storage made like its input and then resized:
as large as the larger of the two. `storage_bytes` says so for such an op, probing
the real kernel once per op (or backend), device and dtype on a few elements rather
than assuming it of every version and device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

__all__ = ["storage_bytes"]

aten = torch.ops.aten
_REDUCED_LOSSES = {aten.mse_loss.default, aten.smooth_l1_loss.default, aten.soft_margin_loss.default,
                   aten.binary_cross_entropy.default}
_PROBE = 8  # elements of the probe's input
_unreduced: dict[tuple, bool] = {}  # (op, device type, dtype) -> returns the loss on the unreduced loss's storage
_SLOW_TRANSPOSE_3D = getattr(torch._C, "_ConvBackend", None) and torch._C._ConvBackend.SlowTranspose3d
_resized: dict[tuple, bool] = {}  # (device type, dtype) -> SlowTranspose3d's output on its input's storage, resized


def storage_bytes(func, args: tuple, kwargs: dict, output: torch.Tensor) -> Any | None:
    """The bytes of the storage the real kernel of `func` returns `output` on, where
    that is not `output`'s own (an expression in the input's possibly symbolic
    size); None where they agree, or for any other op."""
    if func is aten.convolution.default:
        return _transposed_3d_bytes(args, output)
    if func not in _REDUCED_LOSSES or output.dim() != 0 or not args or not isinstance(args[0], torch.Tensor):
        return None
    source = args[0]
    same_shape = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if any(a.shape != source.shape for a in same_shape):
        return None  # a broadcast weight or target: not probed
    key = (func, source.device.type, source.dtype)
    if key not in _unreduced:
        _unreduced[key] = _probe(func, args, kwargs, source)
    return source.numel() * source.element_size() if _unreduced[key] else None


def _probe(func, args: tuple, kwargs: dict, source: torch.Tensor) -> bool:
    def real(leaf):  # 0.5 everywhere: inside every loss's domain (binary cross entropy's too)
        if isinstance(leaf, torch.Tensor):
            return torch.full((_PROBE,), 0.5, dtype=leaf.dtype, device=leaf.device.type)
        return leaf

    with unset_fake_temporarily(), torch.no_grad():
        out = func(*[real(a) for a in args], **{k: real(v) for k, v in kwargs.items()})
        return out.untyped_storage().nbytes() == _PROBE * source.element_size()


def _transposed_3d_bytes(args: tuple, output: torch.Tensor) -> int | None:
    """A 3-D transposed convolution on the SlowTranspose3d backend: the bytes of the
    larger of its input and output, where the probe shows the kernel does so."""
    if len(args) < 9 or not args[6] or _SLOW_TRANSPOSE_3D is None:
        return None
    source, weight = args[0], args[1]
    if not isinstance(source, torch.Tensor) or not isinstance(weight, torch.Tensor) or weight.dim() != 5:
        return None
    if _backend(*args[:9]) != _SLOW_TRANSPOSE_3D:
        return None
    key = (source.device.type, source.dtype)
    if key not in _resized:
        _resized[key] = _probe_transposed(source)
    larger = max(source.numel(), output.numel()) * output.element_size()
    return larger if _resized[key] and source.numel() > output.numel() else None


def _backend(source, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    return torch._C._select_conv_backend(source, weight, bias, stride, padding, dilation, transposed,
                                         output_padding, groups, None)


def _probe_transposed(source: torch.Tensor) -> bool:
    """Whether the real SlowTranspose3d kernel returns a 1-element output of an
    8-channel input on a storage of 8 elements (its input's size)."""
    with unset_fake_temporarily(), torch.no_grad():
        probe = torch.ones((1, _PROBE, 1, 1, 1), dtype=source.dtype, device=source.device.type)
        weight = torch.ones((_PROBE, 1, 1, 1, 1), dtype=source.dtype, device=source.device.type)
        args = (probe, weight, None, [1] * 3, [0] * 3, [1] * 3, True, [0] * 3, 1)
        if _backend(*args) != _SLOW_TRANSPOSE_3D:
            return False  # cannot probe it at this size on this device and dtype
        out = aten.convolution.default(*args)
        return out.untyped_storage().nbytes() == _PROBE * source.element_size()
