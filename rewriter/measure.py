"""measure_peak: the activation memory one training step really takes, in bytes.

The protocol of ARCHITECTURE.md: parameters, buffers and zeroed parameter gradients
exist before the step; the step is `out = model(*inputs); loss = loss_fn(out);
loss.backward()` with `out` held by the caller until backward ends; the number is the
peak, over the step, of bytes allocated beyond what was live when it began. The model
is left as it was found: gradients, buffers and the RNG state are restored.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

from rewriter.errors import InputError
from rewriter.cost_models.storage_tracker import StorageTracker, tensors_in

__all__ = ["measure_peak", "default_loss", "as_input_tuple", "bind_inputs", "preserved_model_state", "check_trainable"]


def default_loss(output: Any) -> torch.Tensor:
    """The sum of every floating-point tensor in the model's output."""
    floats = [t for t in tensors_in(output) if t.is_floating_point()]
    if not floats:
        raise InputError(
            "the model's output holds no floating-point tensor, so the default loss "
            "(their sum) is empty; pass loss_fn= to say what to backpropagate"
        )
    loss = floats[0].sum()
    for t in floats[1:]:
        loss = loss + t.sum()
    return loss


def as_input_tuple(example_inputs: Any, model: nn.Module | None = None) -> tuple:
    """The inputs of `model.forward`, every parameter in order: from one tensor, a
    sequence of positional inputs or a dict of inputs by name; parameters not given
    take their defaults (`forward(x, mask=None)` with `x` alone: `(x, None)`)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        raise InputError(
            f"example_inputs={type(example_inputs).__name__} is neither a tensor, a tuple of positional inputs "
            "nor a dict of inputs by name; pass model inputs as a tensor, a tuple or a dict"
        )
    return args if model is None else bind_inputs(model, args, kwargs)


def bind_inputs(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Every parameter of `model.forward`, in order, from a call's `args` and `kwargs`
    (defaults for the rest); `args` alone where forward takes *args or **kwargs."""
    signature = inspect.signature(model.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        if kwargs:
            raise InputError(f"example_inputs={sorted(kwargs)} names inputs, but {type(model).__name__}.forward takes "
                             "*args or **kwargs; pass them as a tuple in forward's order")
        return args
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise InputError(f"example_inputs do not match {type(model).__name__}.forward{signature}: {error}") from None
    bound.apply_defaults()
    return tuple(bound.arguments.values())


@contextlib.contextmanager
def preserved_model_state(model: nn.Module):
    """Restore gradients, buffers and the RNG state of `model` on exit."""
    grads = {p: p.grad for p in model.parameters()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def check_trainable(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"model={type(model).__name__} is not a torch.nn.Module")
    if not model.training:
        raise InputError(
            "the model is in eval mode; a training step's memory is measured in train "
            "mode: call model.train() first"
        )


def measure_peak(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> int:
    """Bytes of peak activation memory of one training step of `model` on `example_inputs`.

    On CPU this counts tensor storages with a dispatch mode (deterministic, exact; a
    torch.compile'd module runs and is counted as compiled, its compiling is not);
    on CUDA it reads the caching allocator's peak over a step after a warm-up step.
    The model's gradients, buffers and RNG state are as they were afterwards.
    """
    check_trainable(model)
    inputs = as_input_tuple(example_inputs, model)
    loss_fn = loss_fn or default_loss
    on_cuda = any(t.is_cuda for t in tensors_in(inputs))
    with preserved_model_state(model):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        if on_cuda:
            return _measure_cuda(model, inputs, loss_fn)
        tracker = StorageTracker()
        with tracker:
            output = model(*inputs)
            loss_fn(output).backward()
            tracker.poll()
        del output
        return int(tracker.peak)


def _measure_cuda(model: nn.Module, inputs: Sequence, loss_fn: Callable) -> int:
    # a warm-up step first: the first step also allocates what cuBLAS and cuDNN keep
    # for good (handles, workspaces), which is not a training step's activation memory
    loss_fn(model(*inputs)).backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    output = model(*inputs)
    loss_fn(output).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del output
    return int(peak)
