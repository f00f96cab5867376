"""What a training step holds on the device besides activations: parameters, their
gradients, and the optimizer's state as the optimizer will allocate it (Adam's two
moments, SGD's momentum). A budget of device memory (`optimize(..., optimizer=opt)`)
is this plus the activation peak the plan is held to.
"""

from __future__ import annotations

from torch import nn
import torch

from rewriter.errors import InputError

__all__ = ["held_outside_activations"]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def held_outside_activations(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[tuple[str, int], ...]:
    """(("parameters", bytes), ("gradients", bytes), ("optimizer state", bytes)) on
    the parameters' device. The state is the optimizer's own where it has stepped,
    else what one step of an optimizer of its class and settings allocates, stepped on
    "meta" copies of the parameters (nothing real is allocated)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InputError(f"optimizer={type(optimizer).__name__} is not a torch.optim.Optimizer")
    params = list({id(p): p for p in model.parameters()}.values())
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not trained <= {id(p) for p in params}:
        raise InputError("the optimizer updates parameters that are not the model's; pass the optimizer made for it")
    weights = sum(_nbytes(p) for p in params)
    grads = sum(_nbytes(p) for p in params if p.requires_grad)
    return (("parameters", weights), ("gradients", grads), ("optimizer state", _state_bytes(optimizer)))


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if params and all(p in optimizer.state and optimizer.state[p] for p in params if p.requires_grad):
        return sum(_nbytes(t) for p in params for t in optimizer.state.get(p, {}).values()
                   if isinstance(t, torch.Tensor) and t.device == p.device)
    metas = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in params}
    for meta in metas.values():
        if meta.requires_grad:
            meta.grad = torch.empty_like(meta)
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [metas[id(p)] for p in group["params"]]}
              for group in optimizer.param_groups]
    try:
        copy = type(optimizer)(groups)
        copy.step()
    except Exception as error:
        raise InputError(f"cannot work out what {type(optimizer).__name__} allocates ({type(error).__name__}: {error}); "
                         "take one optimizer step first, so that its state exists") from error
    device = {id(m): p.device for p in params for m in (metas[id(p)],)}
    total = 0
    for meta in metas.values():
        for value in copy.state.get(meta, {}).values():
            # a tensor made like the parameter (on "meta") is on the parameter's device;
            # one made elsewhere (Adam's step count, on the CPU) is where it was made
            if isinstance(value, torch.Tensor) and (value.is_meta or value.device == device[id(meta)]):
                total += _nbytes(value)
    return total
