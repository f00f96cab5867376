"""What holds the predicted peak: the plan and the BudgetError say it, in bytes that add
up to the peak."""

import json

import pytest
import torch
from torch import nn

import rewriter
from examples.zoo import ZOO
from rewriter.pipeline import STRATEGIES


@pytest.mark.parametrize("name", ["resnet18", "densenet_bc", "unet", "mobilenet_v2", "revnet", "highres_fcn"])
def test_what_holds_the_peak_adds_up_to_it(name):
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    plan = rewriter.explain(model, x)
    assert sum(nbytes for _, _, nbytes in plan.peak_held_by) == plan.predicted_peak_bytes
    labels = {n.label for n in plan.nodes}
    assert all(label in labels for _, label, _ in plan.peak_held_by)
    sizes = [nbytes for _, _, nbytes in plan.peak_held_by]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) > 0


def test_a_nested_plan_says_what_holds_its_peak():
    zoo = ZOO["highres_fcn"]
    model, x = zoo.test_model(), zoo.test_input()
    optimized = rewriter.optimize(model, int(0.6 * rewriter.measure_peak(model, x)), x, strategies="recompute")
    plan = optimized.plan
    assert plan.spans
    assert sum(nbytes for _, _, nbytes in plan.peak_held_by) == plan.predicted_peak_bytes
    assert rewriter.Plan.from_json(plan.to_json()).peak_held_by == plan.peak_held_by


class _WideHead(nn.Module):
    """A small convolution before a Linear of 2,048 x 1,024 weights: the weight's
    gradient (8 MiB), made in the Linear's backward before it is added into `.grad`,
    holds the peak."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16 * 16, 1024)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_a_peak_held_by_a_parameter_gradient_is_named_in_the_plan_and_the_error():
    model, x = _WideHead(), torch.randn(2, 3, 16, 16)
    plan = rewriter.explain(model, x)
    assert plan.peak_at == "backward fc"
    assert plan.peak_held_by[0] == ("parameter gradient", "fc", (2048 * 1024 + 1024) * 4)  # weight and bias
    assert "held at the peak: parameter gradient 8.00 MiB" in str(plan)
    without = tuple(s for s in STRATEGIES if s != "accumulate")
    with pytest.raises(rewriter.BudgetError) as caught:
        rewriter.optimize(model, plan.predicted_peak_bytes // 2, x, strategies=without)
    assert "are gradients, which no strategy rewrites (the largest: parameter gradient of fc, 8.00 MiB)" in str(caught.value)
    assert "allow strategies ['accumulate']" in str(caught.value)


def test_plans_written_before_peak_holders_still_load():
    zoo = ZOO["vgg"]
    plan = rewriter.explain(zoo.test_model(), zoo.test_input())
    written = json.loads(plan.to_json())
    del written["peak_held_by"]
    older = rewriter.Plan.from_json(json.dumps(written))
    assert older.peak_held_by == () and older.unrewritable_at_peak() == ""
    assert "held at the peak" not in str(older)
