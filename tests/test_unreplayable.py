"""An op fake tensors cannot run (a custom op without a fake kernel) keeps the module
that calls it as an opaque leaf, run for real; it does not fail the call (issue 21)."""

import copy
import logging

import pytest
import torch
from torch import nn

import rewriter


@torch.library.custom_op("rewriter_tests::halve", mutates_args=())
def halve(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


halve.register_autograd(lambda ctx, grad: grad * 0.5)


class _Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return halve(self.conv(x))


class _Net(nn.Module):
    def __init__(self, top_level: bool = False):
        super().__init__()
        self.top_level = top_level
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(8))
        self.inner = _Spectral()

    def forward(self, x):
        for conv in self.convs[:4]:
            x = torch.relu(conv(x))
        x = halve(x) if self.top_level else self.inner(x)
        for conv in self.convs[4:]:
            x = torch.relu(conv(x))
        return x


def test_the_module_calling_it_is_an_opaque_leaf_predicted_as_measured(caplog):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(2, 8, 64, 64)
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="rewriter.report"):
        plan = rewriter.explain(model, x)  # before: InputError "the example inputs ... do not fit the model"
    assert plan.opaque == ("inner",)
    assert any("runs on real tensors but not on fake ones" in r.getMessage() and "'inner'" in r.getMessage()
               for r in caplog.records)
    measured = rewriter.measure_peak(model, x)
    assert plan.predicted_peak_bytes == measured
    budget = int(0.8 * measured)
    optimized = rewriter.optimize(model, budget, x, strategies="recompute")
    assert optimized.plan.segments and rewriter.measure_peak(optimized, x) <= budget
    again = rewriter.apply_plan(model, rewriter.Plan.from_json(optimized.plan.to_json()))
    assert rewriter.measure_peak(again, x) == rewriter.measure_peak(optimized, x)
    from tests.test_optimize import assert_trains_like
    assert_trains_like(reference, model, optimized, x)


def test_at_the_top_level_of_forward_it_is_an_error_that_says_what_to_do():
    model, x = _Net(top_level=True), torch.randn(2, 8, 64, 64)
    with pytest.raises(rewriter.InputError, match="runs on real tensors but not on fake ones.*inside a submodule"):
        rewriter.explain(model, x)


def test_a_timeout_while_a_node_runs_on_fake_tensors_is_no_input_error(monkeypatch):
    """An alarm that interrupts profiling (a caller's time limit) reaches the caller as
    the TimeoutError it is, not as a node that only runs on real tensors."""
    from rewriter.cost_models import profile

    def interrupted(self, node):
        raise TimeoutError("out of time")

    monkeypatch.setattr(profile._Profiler, "forward_node", interrupted)
    with pytest.raises(TimeoutError, match="out of time"):
        rewriter.explain(_Net(), torch.randn(2, 8, 64, 64))
