import copy
import os

import pytest
import torch

MiB = 2**20

# pytest-xdist's workers share the cores: each takes its share of intra-op threads.
# Two workers of two threads each on two cores made OpenMP's waiting threads spin
# against each other (MONAI's 3-D DenseNet test: 14 s alone, 87 s beside a second
# process, 14 s with one thread each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a call must leave untouched: parameters, buffers, grads, RNG, mode."""
    return {
        "state": copy.deepcopy(model.state_dict()),
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for name, grad in before["grads"].items():
        now = after["grads"][name]
        assert (grad is None) == (now is None), name
        if grad is not None:
            assert torch.equal(now, grad), name
    assert after["grad_ids"] == before["grad_ids"]
    assert torch.equal(after["rng"], before["rng"])
    assert after["training"] == before["training"]


@pytest.fixture
def unchanged():
    return snapshot, assert_unchanged
