"""Linear and convolution layers whose weight gradient is added into `.grad` in place.

Autograd computes a weight's gradient as a new tensor the size of the weight, and its
AccumulateGrad then adds it into `.grad`: for one step, a second copy of the weight
exists (VGG-11's 25088x4096 Linear: 392 MiB). These ops compute it straight into
`.grad`: a Linear with one `addmm_`, a convolution in `chunks` slices of its output
channels (one slice of the weight's gradient at a time). They hand AccumulateGrad a
zero (sparse, no entries) in its place, so its hooks (a post-accumulate hook,
DistributedDataParallel's reducer) still run, on a `.grad` that already holds the sum.

They write into `.grad` only where autograd will accumulate into it
(`torch._C._will_engine_execute_node`: never for `torch.autograd.grad`, or a backward
whose `inputs=` leave the weight out), where no hook is registered on the weight
itself (it would see the gradient before accumulation) and no graph of the backward
is built (`create_graph=True`); else they return the gradient as autograd would.
Under `torch.compile` or autocast they run the plain op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear", "conv", "slices", "KINDS"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
KINDS = (nn.Linear, *_CONVS, *TRANSPOSED)


def _into_grad(weight: torch.Tensor) -> bool:
    """Whether this backward may add the weight's gradient into `.grad` itself."""
    if torch.is_grad_enabled() or not weight.is_leaf or weight._backward_hooks:
        return False
    grad = weight.grad
    if grad is not None and (grad.is_sparse or grad.dtype != weight.dtype or grad.requires_grad):
        return False
    node = torch.autograd.graph.get_gradient_edge(weight).node
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # torch.autograd.grad(): it accumulates into no `.grad` (and says so only thus)
        return False


def _handed_over(weight: torch.Tensor) -> torch.Tensor:
    """What AccumulateGrad gets for a gradient already added into `.grad`: a sparse zero
    (a dense `.grad` plus a sparse gradient is allowed, as for a sparse Embedding's, and
    costs nothing at no entries, where an expanded dense zero costs a pass over `.grad`);
    an expanded dense zero on devices without sparse tensors, or where deterministic
    algorithms are asked for (CUDA's sum of a sparse tensor into a dense one is not)."""
    if weight.device.type not in ("cpu", "cuda") or torch.are_deterministic_algorithms_enabled():
        return torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
    indices = torch.empty((weight.dim(), 0), dtype=torch.long, device=weight.device)
    values = torch.empty((0,), dtype=weight.dtype, device=weight.device)
    return torch.sparse_coo_tensor(indices, values, weight.shape, check_invariants=False)


def _plain() -> bool:
    return torch.compiler.is_compiling() or torch.is_autocast_enabled()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x)
        ctx.weight = weight  # a leaf (a parameter): its .grad is written in backward
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight)
        if ctx.needs_input_grad[1]:
            rows, columns = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            if weight.grad is not None and _into_grad(weight):
                weight.grad.addmm_(rows.t(), columns)
                grad_w = _handed_over(weight)
            else:  # AccumulateGrad makes it `.grad` (where that is None) or adds it
                grad_w = rows.t().mm(columns)
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    """`module(x)`, its weight's gradient added into `.grad` in place."""
    if _plain() or not module.weight.requires_grad:
        return module(x)
    return _Linear.apply(x, module.weight, module.bias)


def slices(out_channels: int, in_channels: int, groups: int, chunks: int) -> list[tuple[int, int, int, int, int]]:
    """About `chunks` slices of a convolution's output channels, each (first and last
    output channel + 1, first and last input channel + 1 it reads, its groups): whole
    groups where there are at least `chunks`, else parts of each group's outputs."""
    per_out, per_in = out_channels // groups, in_channels // groups
    if groups >= chunks:
        step = -(-groups // chunks)
        return [(g * per_out, min(g + step, groups) * per_out, g * per_in, min(g + step, groups) * per_in,
                 min(step, groups - g)) for g in range(0, groups, step)]
    step = -(-per_out // -(-chunks // groups))
    return [(g * per_out + a, g * per_out + min(a + step, per_out), g * per_in, (g + 1) * per_in, 1)
            for g in range(groups) for a in range(0, per_out, step)]


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, chunks):
        ctx.save_for_backward(x)
        ctx.weight = weight
        ctx.config = (stride, padding, dilation, transposed, output_padding, groups, chunks)
        if transposed:
            conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[weight.dim() - 3]
            return conv(x, weight, bias, stride, padding, output_padding, groups, dilation)
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        stride, padding, dilation, transposed, output_padding, groups, chunks = ctx.config
        grad_x = None

        def backward_of(g, w, mask, inputs=x, groups=groups):
            return torch.ops.aten.convolution_backward(g, inputs, w, [g.shape[1]], stride, padding, dilation, transposed,
                                                       output_padding, groups, mask)

        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        if not (needs_w and weight.grad is not None and _into_grad(weight)):  # as autograd computes them
            grad_x, grad_w, grad_b = backward_of(grad, weight, [needs_x, needs_w, needs_b])
            return grad_x, grad_w, grad_b, *[None] * 7
        if needs_x:
            grad_x = backward_of(grad, weight, [True, False, False])[0]
        # slices of the weight's first dimension: a convolution's output channels (each
        # reads its groups' inputs), a transposed one's input channels (one group: each
        # reads the whole output gradient); the bias's gradient with the weight's (asked
        # alone, CPU's kernel takes a weight-sized buffer for it): a convolution's slice
        # by slice, a transposed one's whole, from its first slice
        cuts = ([(start, stop, start, stop, 1) for start, stop, *_ in slices(weight.shape[0], x.shape[1], 1, chunks)]
                if transposed else slices(weight.shape[0], x.shape[1], groups, chunks))
        biases = []
        for start, stop, first, last, count in cuts:
            inputs = x if last - first == x.shape[1] else x[:, first:last]
            wanted = needs_b and not (transposed and start > 0)
            _, part, bias = backward_of(grad if transposed else grad[:, start:stop], weight[start:stop],
                                        [False, True, wanted], inputs, count)
            weight.grad[start:stop].add_(part)
            del part
            biases.append(bias)
        grad_b = None if not needs_b else biases[0] if transposed else torch.cat(biases)
        return grad_x, _handed_over(weight), grad_b, *[None] * 7


def conv(x: torch.Tensor, module: nn.Module, chunks: int) -> torch.Tensor:
    """`module(x)` (a Conv1d/2d/3d with zero padding, or a ConvTranspose1d/2d/3d of one
    group), its weight's gradient added into `.grad` in place, in about `chunks` slices
    of output channels (`slices`; a transposed convolution's: of input channels)."""
    if _plain() or not module.weight.requires_grad:
        return module(x)
    transposed = isinstance(module, TRANSPOSED)
    return _Conv.apply(x, module.weight, module.bias, module.stride, module.padding, module.dilation, transposed,
                       module.output_padding if transposed else [0] * (module.weight.dim() - 2), module.groups, chunks)
