"""Step timing shared by the benchmarks: the variants take turns, so drift hits all alike."""

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
