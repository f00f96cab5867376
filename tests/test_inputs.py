"""Inputs by name: a forward with keyword or optional parameters is planned on the
inputs given, by position or by name (issue 21: keyword inputs were refused, and a
parameter left at its None default counted as a missing input)."""

import copy

import pytest
import torch
from torch import nn

import rewriter


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                                    nn.ReLU())])

    def forward(self, x, mask=None):
        y = self.convs(x)
        return y if mask is None else y * mask


def _step(module: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    out = module(x, **kwargs)
    out.sum().backward()
    return out.detach()


def _assert_steps_alike(reference, model, optimized, x, **kwargs) -> None:
    torch.testing.assert_close(_step(optimized, x, **kwargs), _step(reference, x, **kwargs))
    for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, b), (_, c) in zip(reference.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(c, b, msg=name)


@pytest.fixture
def masked():
    torch.manual_seed(0)
    return _Masked(), torch.randn(2, 8, 32, 32), (torch.rand(2, 8, 32, 32) > 0.5).float()


def test_inputs_by_name_are_planned_and_trained_alike(masked):
    model, x, mask = masked
    reference = copy.deepcopy(model)
    inputs = {"x": x, "mask": mask}
    measured = rewriter.measure_peak(model, inputs)
    assert rewriter.explain(model, inputs).predicted_peak_bytes == measured
    budget = int(0.6 * measured)
    optimized = rewriter.optimize(model, budget, inputs, strategies="recompute")
    assert optimized.plan.segments and rewriter.measure_peak(optimized, inputs) <= budget
    _assert_steps_alike(reference, model, optimized, x, mask=mask)
    lazy = rewriter.optimize(model, budget, strategies="recompute")
    model.zero_grad(), reference.zero_grad()
    _assert_steps_alike(reference, model, lazy, x, mask=mask)
    assert lazy.plan.budget_bytes == budget and lazy.plan.predicted_peak_bytes <= budget and not lazy.plan.absent


def test_a_parameter_left_at_none_takes_its_none_branch(masked):
    model, x, _ = masked
    reference = copy.deepcopy(model)
    measured = rewriter.measure_peak(model, x)
    assert rewriter.explain(model, x).predicted_peak_bytes == measured
    optimized = rewriter.optimize(model, int(0.6 * measured), x, strategies="recompute")
    assert optimized.plan.absent == ("mask",)
    _assert_steps_alike(reference, model, optimized, x)
    again = rewriter.apply_plan(model, rewriter.Plan.from_json(optimized.plan.to_json()))
    assert rewriter.measure_peak(again, x) == rewriter.measure_peak(optimized, x)


def test_inputs_named_wrong_are_an_error_naming_the_signature(masked):
    model, x, mask = masked
    with pytest.raises(rewriter.InputError, match=r"do not match _Masked.forward\(x, mask=None\)"):
        rewriter.explain(model, {"x": x, "masks": mask})
