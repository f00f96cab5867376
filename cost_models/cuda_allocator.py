"""What the CUDA caching allocator counts beyond a tensor's own bytes.

On CUDA the budget is the caching allocator's peak (ARCHITECTURE.md). The allocator
hands out blocks in multiples of 512 bytes, and cuDNN convolutions and cuBLAS matrix
products take workspace memory from it while they run. Fake tensors see neither:
`allocated_bytes` rounds a storage's bytes as the allocator does, and
`workspace_bytes` runs one such op for real at the example shapes and returns the
bytes it held beyond its outputs, read from the allocator's statistics (once per op
signature and backend setting; it resets the device's peak statistics).

Workspaces depend on the algorithm cuDNN picks: with `torch.backends.cudnn.benchmark`
on, it may pick another one at training time than here.
"""

from __future__ import annotations

from typing import Any, Callable

import sympy
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["BLOCK_BYTES", "allocated_bytes", "workspace_bytes"]

BLOCK_BYTES = 512  # the caching allocator's rounding (kMinBlockSize)

aten = torch.ops.aten
_WORKSPACE_OPS = {
    aten.convolution.default, aten.convolution_backward.default,
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
}
_measured: dict[tuple, int] = {}


def allocated_bytes(nbytes: Any, device_type: str) -> Any:
    """The bytes the allocator of `device_type` counts for a storage of `nbytes`
    (an int or a sympy expression)."""
    if device_type != "cuda":
        return nbytes
    return BLOCK_BYTES * sympy.ceiling(sympy.sympify(nbytes) / BLOCK_BYTES)


def workspace_bytes(func, args: tuple, kwargs: dict, concrete: Callable[[Any], int]) -> int | None:
    """Bytes a CUDA convolution or matrix product holds beyond its outputs while it runs,
    at the shapes of its (fake) arguments; `concrete` turns a symbolic size into the
    example's. None for any other op or device (0 for such an op that holds nothing:
    it keeps its place among the events, whose order must not change with the batch)."""
    if func not in _WORKSPACE_OPS:
        return None
    leaves = tree_flatten((args, kwargs))[0]
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].device.type != "cuda":
        return None

    def signature(leaf):
        if isinstance(leaf, torch.Tensor):
            return (tuple(map(concrete, leaf.shape)), tuple(map(concrete, leaf.stride())), leaf.dtype)
        return concrete(leaf) if isinstance(leaf, torch.SymInt) else leaf

    backends = (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    key = (func, tensors[0].device, backends, tuple(map(signature, leaves)))
    if key not in _measured:
        _measured[key] = _measure(func, args, kwargs, concrete, tensors[0].device)
    return _measured[key]


def _measure(func, args, kwargs, concrete, device) -> int:
    def real(leaf):
        if isinstance(leaf, torch.SymInt):
            return concrete(leaf)
        if not isinstance(leaf, torch.Tensor):
            return leaf
        shape, stride = tuple(map(concrete, leaf.shape)), tuple(map(concrete, leaf.stride()))
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        flat = torch.empty(extent, dtype=leaf.dtype, device=device)  # stride 0 (an expanded gradient) included
        flat = flat.normal_() if flat.is_floating_point() else flat.zero_()
        return flat.as_strided(shape, stride)

    with unset_fake_temporarily(), torch.no_grad():
        real_args, real_kwargs = tree_map(real, (args, kwargs))
        func(*real_args, **real_kwargs)  # the first call may set up handles and caches
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = func(*real_args, **real_kwargs)
        torch.cuda.synchronize(device)
        held = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
        del out, real_args, real_kwargs
    return int(held)
