"""Lossy compress of LayerNorm, statistics per position as ConvNeXt normalises over
channels: the module over the last dimension of a channels-last view, and the
functional form between two permutes (a LayerNorm2d)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from rewriter.measure import measure_peak
from rewriter.passes import compressed_ops
from tests.test_compress import all_groups, assert_gradients_close_in_direction, train_step
from tests.test_compress_volumes import _module_step, input_gradient_errors

_NORMS = [lambda: nn.LayerNorm(8), lambda: nn.LayerNorm((7, 8), elementwise_affine=False),
          lambda: nn.LayerNorm(8, bias=False)]


def _channels_last() -> torch.Tensor:
    """(2, 6, 7, 8): a (2, 8, 6, 7) map permuted to put its channels last (a strided
    view, as a ConvNeXt block hands it over), off zero mean and unit scale."""
    return (torch.randn(2, 8, 6, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1).permute(0, 2, 3, 1)


@pytest.mark.parametrize("make", _NORMS)
def test_a_layer_norm_on_its_exact_input_computes_eagers_numbers(make, monkeypatch):
    """The forward is the module's own, bit for bit; the backward, given the exact input
    where the quantized copy goes, is eager's."""
    torch.manual_seed(0)
    norm = make().train()
    x0 = _channels_last()
    monkeypatch.setattr(compressed_ops, "dequantize", lambda *args: x0.contiguous())  # as dequantize lays it out
    ours = _module_step(copy.deepcopy(norm), x0, lambda m, x: compressed_ops.module_call(m, x, bits=8))
    eager = _module_step(copy.deepcopy(norm), x0, lambda m, x: m(x))
    assert torch.equal(ours[0], eager[0])
    torch.testing.assert_close(ours[1], eager[1])
    for mine, theirs in zip(ours[2], eager[2], strict=True):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("make", _NORMS)
def test_a_layer_norm_errs_less_with_more_bits(make):
    errors = input_gradient_errors(make, _channels_last())
    # a level of 2^-bits of each group's range (groups run along the positions); the
    # statistics of 8 values per position move with each: 4 bits err about 10% here
    assert 0 < errors[8] < errors[4] / 4 and errors[4] < 0.2, errors


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map, as torchvision's and timm's
    ConvNeXt write it: permute, the functional form, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    """A stem, two ConvNeXt blocks (a 7x7 depthwise convolution, LayerNorm over the
    channels, a pointwise MLP as Linear layers on the channels-last view, a residual
    add) and a downsampling LayerNorm2d and stride-2 convolution."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 4, stride=4)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "dwconv": nn.Conv2d(channels, channels, 7, padding=3, groups=channels), "norm": nn.LayerNorm(channels),
            "up": nn.Linear(channels, 4 * channels), "act": nn.GELU(), "down": nn.Linear(4 * channels, channels),
        }) for _ in range(2))
        self.downsample = nn.Sequential(LayerNorm2d(channels), nn.Conv2d(channels, 2 * channels, 2, stride=2))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            y = block["dwconv"](x).permute(0, 2, 3, 1)
            y = block["down"](block["act"](block["up"](block["norm"](y))))
            x = x + y.permute(0, 3, 1, 2)
        return self.downsample(x)


def test_a_convnext_stage_with_every_group_compressed_at_eight_bits_trains_close_to_eager():
    """Both LayerNorm forms are lossy kinds and run as compressed ops: eager's outputs
    bit for bit, gradients pointing where eager's do (at 8 bits: at 4 the LayerNorms
    alone bring the depthwise weights' gradient to cosine 0.97 of eager's here, every
    group together to 0.96)."""
    torch.manual_seed(0)
    model, x = ConvNeXtStage().train(), torch.randn(2, 3, 64, 64)
    reference = copy.deepcopy(model)
    gm, _, _ = all_groups(model, x, bits=8)
    ops = [n for n in gm.graph.nodes if n.target is compressed_ops.layer_norm
           or n.target is compressed_ops.module_call and isinstance(gm.get_submodule(n.args[0].target), nn.LayerNorm)]
    assert len(ops) == 3  # the blocks' modules and the downsampling's functional form
    compressed_ops.manual_seed(0)
    assert torch.equal(train_step(gm, x), train_step(reference, x))
    assert_gradients_close_in_direction(model, reference)


def test_a_convnext_stage_at_its_smallest_budget_with_four_bits_fits_as_predicted():
    """With compress alone at 4 bits, the plan at the smallest budget compresses the
    blocks' LayerNorms (each holds the depthwise convolution's output alone) and fits
    when measured, as predicted."""
    torch.manual_seed(0)
    model, x = ConvNeXtStage().train(), torch.randn(2, 3, 64, 64)
    with pytest.raises(rewriter.BudgetError) as error:
        rewriter.optimize(model, measure_peak(model, x) // 100, x, strategies="compress", compress_bits=4)
    budget = error.value.minimum_bytes
    optimized = rewriter.optimize(model, budget, x, strategies="compress", compress_bits=4)
    assert {"blocks_0_norm", "blocks_1_norm"} <= {node for node, _ in optimized.plan.compressed}
    measured = measure_peak(optimized, x)
    assert measured <= budget and measured == optimized.plan.predicted_peak_bytes
