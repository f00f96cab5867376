"""Storages a real kernel returns that are larger than its output's own elements.

A fake tensor's storage holds exactly its elements. Some real kernels return their
output on a larger storage: on CPU (torch 2.13) `mse_loss`, `smooth_l1_loss`,
`soft_margin_loss` and `binary_cross_entropy` with a mean or sum reduction return the
0-dim loss on the storage of the unreduced loss, as large as their input, which lives
as long as the loss tensor (through the whole backward). `storage_bytes` says so for
such an op, probing the real kernel once per op, device and dtype on an 8-element
input rather than assuming it of every version and device.
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


def storage_bytes(func, args: tuple, kwargs: dict, output: torch.Tensor) -> Any | None:
    """The bytes of the storage the real kernel of `func` returns `output` on, where
    that is not `output`'s own (an expression in the input's possibly symbolic
    size); None where they agree, or for any other op."""
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
