"""The parts of the per-node profile that run real code: opaque leaves (submodules
that symbolic tracing cannot follow), which run for real once at the traced batch on
copies of their state, and the gradient source that hands a node of many ops its
incoming gradients without the harness holding them.

`OpaqueLeaves` is a mixin of the profiler (`cost_models/profile.py`): it reads the
profiler's `gm`, `owner`, `_opaque_real`, `_apart_bwd_flops`,
`tracker` and `_concrete`.
"""

from __future__ import annotations

import sympy
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.func import functional_call
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from rewriter.cost_models.node_costs import NodeCost
from rewriter.cost_models.storage_tracker import storage_key, tensors_in

__all__ = ["OpaqueLeaves"]


class OpaqueLeaves:
    def _real(self, t: torch.Tensor) -> torch.Tensor:
        """A real tensor shaped as `t` (a fake), of its dtype and device: random floats, or zeros."""
        make = torch.randn if t.is_floating_point() else torch.zeros
        with unset_fake_temporarily():
            return make([self._concrete(s) for s in t.shape], dtype=t.dtype, device=t.device)

    def _prepare_opaque(self, node: fx.Node, args, kwargs):
        """Real random inputs of the right shapes and copies of an opaque leaf's state,
        made before its window opens, so that only the leaf's own work is tracked."""
        module = self.gm.get_submodule(node.target)

        def real_like(t):
            if not isinstance(t, torch.Tensor):
                return t
            real = self._real(t).requires_grad_(t.requires_grad)
            owner = self.owner.get(storage_key(t))
            if owner:
                self.owner[storage_key(real)] = owner
            return real

        with unset_fake_temporarily():
            state = {k: t.detach().clone().requires_grad_(t.requires_grad) for k, t in _state_items(module)}
        real_args, real_kwargs = tree_map(real_like, (args, kwargs))
        return module, state, real_args, real_kwargs

    def _run_opaque(self, node: fx.Node, prepared):
        """Run an opaque leaf for real, at the traced batch (fake tensors cannot branch on data)."""
        module, state, real_args, real_kwargs = prepared
        with unset_fake_temporarily():
            real_out = functional_call(module, state, real_args, real_kwargs)
        self._opaque_real[node.name] = (real_args, real_kwargs, real_out, state)
        return real_out

    def _fake_stand_in(self, real_out):
        """Fake tensors shaped like an opaque leaf's real outputs."""

        def fake_like(t):
            return torch.empty(t.shape, dtype=t.dtype, device=t.device).requires_grad_(t.requires_grad)

        return tree_map(lambda t: fake_like(t) if isinstance(t, torch.Tensor) else t, real_out)

    def _opaque_flops(self, node: fx.Node, prepared) -> tuple[sympy.Expr, sympy.Expr]:
        """Forward and backward FLOPs of an opaque leaf, from one more real step of it
        on copies, untracked."""
        module, state, real_args, real_kwargs = prepared
        with unset_fake_temporarily(), FlopCounterMode(display=False) as counter:
            copies = {k: t.detach().clone().requires_grad_(t.requires_grad) for k, t in state.items()}
            args, kwargs = tree_map(lambda t: t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t, (real_args, real_kwargs))
            out = [t for t in tensors_in(functional_call(module, copies, args, kwargs)) if t.requires_grad]
            forward = counter.get_total_flops()
            if out:
                torch.autograd.backward(out, [torch.ones_like(t) for t in out])
            backward = counter.get_total_flops() - forward
        self._apart_bwd_flops[node.name] = sympy.Integer(backward)
        return sympy.Integer(forward), self._apart_bwd_flops[node.name]

    def _opaque_source(self, cost: NodeCost, layout: dict[int, tuple | None]):
        """A scalar whose backward hands the opaque leaf fresh gradients for its outputs
        (laid out as `layout` says per output index: the incoming gradients' strides), with the harness holding
        none of them: inside the window the leaf's own graph frees its saved tensors and
        incoming gradients as eager backward does."""
        real_args, real_kwargs, real_out, state = self._opaque_real.pop(cost.name)
        with unset_fake_temporarily():
            outs = [(k, t) for k, t in enumerate(tensors_in(real_out)) if t.requires_grad]
            source = _GradientSource.apply(self.tracker, tuple(layout.get(k) for k, _ in outs), *(t for _, t in outs))
        real_inputs = [t for t in tensors_in((real_args, real_kwargs)) if t.requires_grad]
        params = [p for p in state.values() if p.requires_grad]
        with unset_fake_temporarily():
            for p in params:
                p.grad = torch.zeros_like(p)
        return source, real_inputs, params


class _GradientSource(torch.autograd.Function):
    """Backpropagates random gradients into its inputs, allocated inside backward and
    laid out as the incoming gradients are (`strides` per input, None: contiguous: a
    sum's gradient is a scalar expanded, and a kernel that needs it contiguous copies
    it); `made` lists the tracker uids of the last ones, so their events can be dropped."""

    made: list[int] = []

    @staticmethod
    def forward(ctx, tracker, strides, *outputs):
        ctx.tracker = tracker
        ctx.layouts = [(t.shape, stride, t.dtype, t.device) for t, stride in zip(outputs, strides)]
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        grads = tuple(_laid_out(*layout) for layout in ctx.layouts)
        ctx.tracker.poll()
        _GradientSource.made = [ctx.tracker.uid_of(g) for g in grads]
        return (None, None, *grads)


def _laid_out(shape, stride, dtype, device) -> torch.Tensor:
    """Random values of `shape` with `stride` (None: contiguous), on as little storage as that takes."""
    if stride is None:
        return torch.randn(shape, dtype=dtype, device=device)
    extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 0
    return torch.randn(extent, dtype=dtype, device=device).as_strided(shape, stride)


def _state_items(module: nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
