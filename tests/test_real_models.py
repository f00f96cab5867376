"""Models nobody here wrote (MONAI's networks): planned, fitting when measured, training like eager."""

import pytest
import torch

import rewriter
from tests.test_optimize import assert_trains_like, optimized_within

nets = pytest.importorskip("monai.networks.nets")


def dynunet() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.DynUNet(2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2]).train()


def test_dynunet_is_recomputed_within_its_budget_and_trains_alike():
    """DynUNet assigns a module attribute while it runs: a recomputed segment's profile
    swaps in fakes for the state of the code it runs only (the whole graph's failed)."""
    model, x = dynunet(), torch.randn(2, 1, 64, 64)
    optimized, budget = optimized_within(model, x, 0.5)
    assert optimized.plan.segments
    assert rewriter.measure_peak(optimized, x) <= budget
    assert_trains_like(dynunet(), model, optimized, x)
