"""Buffers a model updates in its own forward (timm's BatchNormAct2d counts
num_batches_tracked itself, FX traces through it): captured as graph nodes, updated
once per step under recompute, never changed by capturing (issue 21: tracing ran the
count's add_ on the real buffer and left it out of the graph, and a recomputed segment
updated the statistics of such a norm twice)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from rewriter.trace import capture
from tests.test_optimize import assert_trains_like, optimized_within


class _NormAct(nn.BatchNorm2d):
    """As timm's BatchNormAct2d: a BatchNorm2d subclass, so FX traces its forward."""

    def forward(self, x):
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor, self.eps)
        return torch.relu(x)


def _net(momentum) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(8, 8, 3, padding=1), _NormAct(8, momentum=momentum))])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_a_norm_counting_its_own_batches_trains_like_eager(momentum):
    model, x = _net(momentum), torch.randn(2, 8, 32, 32)
    reference = copy.deepcopy(model)
    captured = capture(model)
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, _NormAct))  # unchanged
    # the count is a graph node; a cumulative average reads it as a number: that norm stays an opaque leaf
    assert captured.opaque == (() if momentum else ("1", "3", "5", "7"))
    assert any(n.target == "add_" for n in captured.gm.graph.nodes) == (momentum is not None)
    measured = rewriter.measure_peak(model, x)
    assert rewriter.explain(model, x).predicted_peak_bytes - measured in (0, 4)
    optimized, budget = optimized_within(model, x, 0.7)  # all opaque (cumulative): the honest minimum's plan
    assert rewriter.measure_peak(optimized, x) <= budget
    assert bool(optimized.plan.segments) == (momentum is not None)
    for _ in range(2):  # statistics and counts as eager's, step after step
        assert_trains_like(reference, model, optimized, x)
