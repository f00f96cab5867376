"""Step timing and gradient error shared by the benchmarks: the variants take turns, so
drift hits all alike."""

import copy
import statistics
import time

import torch
from torch import nn


def step_seconds(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 9, loss_fn=torch.sum) -> dict[str, float]:
    """Median seconds of a training step (`loss_fn(model(x)).backward()`) of each model,
    the models taking turns each round (so that the machine's drift hits all alike),
    after a warm-up step of each."""
    def step(model):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_fn(model(x)).backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for model in models.values():
        step(model)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(step(model))
    return {name: statistics.median(t) for name, t in times.items()}


def gradient_error(model: nn.Module, optimized: nn.Module, x: torch.Tensor) -> float:
    """||g - g_eager|| / ||g_eager|| over all parameter gradients together, after one
    step from equal states (`optimized` runs `model`'s parameters; per parameter it would
    be noise over noise for a conv bias before a normalisation, whose gradient is zero
    up to rounding)."""
    eager = copy.deepcopy(model)
    for m in (eager, model):
        m.zero_grad(set_to_none=True)
    eager(x).sum().backward()
    optimized(x).sum().backward()
    ours = torch.cat([q.grad.flatten() for q in model.parameters()])
    reference = torch.cat([p.grad.flatten() for p in eager.parameters()])
    return float((ours - reference).norm() / reference.norm())
