"""A model whose own forward branches on sizes is traced on the example inputs' sizes,
asserts the branches it took, and is optimized like any other."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from rewriter import CaptureError
from rewriter.trace import capture
from tests.test_optimize import assert_trains_like


class PaddedToSixteen(nn.Module):
    """Pads its input to a multiple of 16 where it is not one, and crops back to the
    input's size: a branch on sizes in its own forward, which symbolic tracing cannot
    follow, and sizes read at the start and used at the end."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*(layer for c_in in (3, 8, 8, 8) for layer in
                                    (nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x, mask=None):
        h, w = x.shape[-2:]
        if h % 16 or w % 16:
            x = F.pad(x, (0, -w % 16, 0, -h % 16))
        y = self.body(x)
        if mask is not None:
            y = y * mask
        return self.head(y)[..., :h, :w]


def test_a_forward_branching_on_sizes_is_traced_on_the_inputs_sizes(unchanged):
    torch.manual_seed(0)
    model, x = PaddedToSixteen().train(), torch.randn(2, 3, 30, 30)
    snapshot, assert_unchanged = unchanged
    before = snapshot(model)
    with pytest.raises(CaptureError, match="PaddedToSixteen"):
        capture(model)  # without example inputs: refused, as before
    captured = capture(model, absent=("mask",), inputs=(x, None))
    assert_unchanged(model, before)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(captured.gm(x), expected)
    # 32x32 needs no padding: the other branch, which the graph did not trace
    with pytest.raises(AssertionError, match="captured for inputs on which .* is True"):
        captured.gm(torch.randn(2, 3, 32, 32))


def _fits_and_trains_like_eager(model: nn.Module, x: torch.Tensor, fraction: float) -> nn.Module:
    """`model` optimized with recompute alone at `fraction` of its eager peak: something
    rewritten, fitting as predicted to the byte, one step like eager's."""
    reference = copy.deepcopy(model)
    eager = rewriter.measure_peak(model, x)
    optimized = rewriter.optimize(model, int(fraction * eager), x, strategies="recompute")
    assert any(n.strategy != "keep" for n in optimized.plan.nodes)
    assert rewriter.measure_peak(optimized, x) == optimized.plan.predicted_peak_bytes <= fraction * eager
    assert_trains_like(reference, model, optimized, x)
    return optimized


def test_a_forward_branching_on_sizes_is_optimized_exactly():
    torch.manual_seed(0)
    model, x = PaddedToSixteen().train(), torch.randn(2, 3, 30, 30)
    optimized = _fits_and_trains_like_eager(model, x, 0.6)
    again = rewriter.apply_plan(model, optimized.plan)  # retraced at the plan's input shapes
    for p in model.parameters():
        p.grad = None
    reference = copy.deepcopy(model)
    assert_trains_like(reference, model, again, x)


class UpsampledToInput(nn.Module):
    """torchvision's segmentation models: the input's size read first, the logits
    upsampled to it last."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(*(layer for c_in in (3, 8, 8, 8) for layer in
                                        (nn.Conv2d(c_in, 8, 3, stride=2 if c_in == 3 else 1, padding=1),
                                         nn.BatchNorm2d(8), nn.ReLU())))
        self.classifier = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        size = x.shape[-2:]
        return F.interpolate(self.classifier(self.backbone(x)), size=size, mode="bilinear", align_corners=False)


def test_sizes_of_the_input_used_at_the_end_leave_recompute_its_segments():
    torch.manual_seed(0)
    _fits_and_trains_like_eager(UpsampledToInput().train(), torch.randn(2, 3, 32, 32), 0.5)


class ScaledIfEnabled(nn.Module):
    """Branches on a buffer of its own (a tensor attribute in a condition) and counts its
    calls in place, as a module may."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("enabled", torch.tensor(True))
        self.register_buffer("calls", torch.tensor(0))

    def forward(self, x):
        self.calls.add_(1)
        y = torch.relu(self.conv(x))
        if self.enabled:
            y = y * 2
        return y


def test_a_forward_branching_on_its_own_state_is_traced_on_that_state(unchanged):
    torch.manual_seed(0)
    model, x = ScaledIfEnabled().train(), torch.randn(2, 3, 16, 16)
    snapshot, assert_unchanged = unchanged
    before = snapshot(model)
    captured = capture(model, inputs=(x,))
    assert_unchanged(model, before)  # the count was not run for real while tracing
    reference = copy.deepcopy(model)
    torch.testing.assert_close(captured.gm(x), reference(x))
    assert model.calls == reference.calls == 1  # the graph counts as the model does
    # the profile runs the graph on fake state, where the guard's truth is unknown: it skips it
    assert rewriter.explain(model, x).predicted_peak_bytes == rewriter.measure_peak(model, x)
    model.enabled.fill_(False)
    with pytest.raises(AssertionError, match="captured for inputs on which `enabled` is True"):
        captured.gm(x)


class FlattenedByCount(nn.Module):
    """Counts its features with int(), as code written for eager does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        y = self.conv(x)
        features = int(y.shape[1] * y.shape[2] * y.shape[3])
        return self.fc(y.reshape(-1, features))


def test_a_number_taken_from_sizes_is_asserted():
    torch.manual_seed(0)
    model, x = FlattenedByCount().train(), torch.randn(2, 3, 8, 8)
    captured = capture(model, inputs=(x,))
    other_batch = torch.randn(5, 3, 8, 8)  # the count holds for any batch
    torch.testing.assert_close(captured.gm(other_batch), model(other_batch))
    with pytest.raises(AssertionError, match="is 256"):
        captured.gm(torch.randn(2, 3, 9, 9))
