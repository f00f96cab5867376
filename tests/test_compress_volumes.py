"""Compress on volumes: 3-D max and average pooling keep one byte per output (the
argmax's offset in its window) or nothing, bit for bit as eager; with `bits`, the
per-sample normalisations MONAI's networks use (InstanceNorm, GroupNorm) keep a
quantized copy of their input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter

from rewriter.cost_models.simulate import simulate
from rewriter.measure import default_loss, measure_peak
from rewriter.passes import compressed_ops
from rewriter.report import profile_model_graph
from rewriter.trace import capture
from tests.test_compress import all_groups, gradient, op_step, train_step


@pytest.mark.parametrize("eager, ours", [
    (lambda x: F.max_pool3d(x, 2), lambda x: compressed_ops.max_pool3d(x, 2)),
    (lambda x: F.max_pool3d(x, 3, 2, 1), lambda x: compressed_ops.max_pool3d(x, 3, 2, 1)),
    (lambda x: F.max_pool3d(x, 3, 2, 1, 2, True), lambda x: compressed_ops.max_pool3d(x, 3, 2, 1, 2, True)),
    (lambda x: F.max_pool3d(x, (2, 3, 3), (1, 2, 1), (1, 1, 0), (2, 1, 1)),
     lambda x: compressed_ops.max_pool3d(x, (2, 3, 3), (1, 2, 1), (1, 1, 0), (2, 1, 1))),
    (lambda x: F.avg_pool3d(x, 3, 2, 1), lambda x: compressed_ops.avg_pool3d(x, 3, 2, 1)),
    (lambda x: F.avg_pool3d(x, 2, ceil_mode=True, count_include_pad=False),
     lambda x: compressed_ops.avg_pool3d(x, 2, ceil_mode=True, count_include_pad=False)),
])
def test_3d_pooling_equals_eager_bit_for_bit(eager, ours):
    x = torch.randn(2, 3, 9, 11, 10, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0, :4] = 1.5  # ties inside a window: the first index wins in both
    out, grad = op_step(eager, x)
    out_c, grad_c = op_step(ours, x)
    assert torch.equal(out_c, out) and torch.equal(grad_c, grad)


def test_a_window_of_more_than_256_positions_is_refused():
    with pytest.raises(ValueError, match="256"):
        compressed_ops.max_pool3d(torch.randn(1, 1, 8, 8, 8), (7, 7, 7))


class Pooled3d(nn.Module):
    """A 3-D encoder: max pooling (module and function), average pooling, ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 8, 1)
        self.pool = nn.MaxPool3d(2)
        self.avg = nn.AvgPool3d(3, 1, 1)

    def forward(self, x):
        y = self.pool(torch.relu(self.a(x)))
        y = F.max_pool3d(torch.relu(self.b(y)), 3, 2, 1)
        return self.c(self.avg(y))


def test_a_3d_network_with_every_group_compressed_trains_bit_for_bit_and_keeps_less():
    torch.manual_seed(0)
    model, reference = Pooled3d(), Pooled3d()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 16, 14, 12)
    gm, groups, _ = all_groups(model, x)
    assert {"max_pool3d", "avg_pool3d", "relu"} <= {k for g in groups for k in g.kinds}
    assert torch.equal(train_step(gm, x), train_step(reference, x))
    for (label, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(q.grad, p.grad), label
    measured = measure_peak(gm, x)
    assert measured < measure_peak(model, x)
    assert simulate(profile_model_graph(model, gm, (x,), default_loss, (), {})).peak_bytes == measured


_NORMS = [
    lambda: nn.GroupNorm(4, 8), lambda: nn.GroupNorm(2, 8, affine=False), lambda: nn.InstanceNorm3d(8),
    lambda: nn.InstanceNorm3d(8, affine=True), lambda: nn.InstanceNorm3d(8, affine=True, track_running_stats=True),
    lambda: nn.InstanceNorm2d(8, affine=True),
]


def _module_step(module: nn.Module, x0: torch.Tensor, step) -> tuple:
    """Output, input gradient, parameter gradients and buffers of `step(module, x)` on a
    copy of `x0`."""
    x = x0.clone().requires_grad_()
    y = step(module, x * 1.0)
    y.backward(torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin())
    return y.detach(), x.grad, [p.grad for p in module.parameters()], [b.clone() for b in module.buffers()]


def _norm_input(norm: nn.Module) -> torch.Tensor:
    """A seeded input for `norm` (2-D for InstanceNorm2d, a strided slice, else 3-D), off
    zero mean and unit scale."""
    x = torch.randn(2, 8, 6, 7, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    return x[..., 0] if isinstance(norm, nn.InstanceNorm2d) else x


@pytest.mark.parametrize("make", _NORMS)
def test_a_per_sample_norm_on_its_exact_input_computes_eagers_numbers(make, monkeypatch):
    """The forward is the module's own (bit for bit, running statistics updated once);
    the backward, given the exact input where the quantized copy goes, is eager's."""
    torch.manual_seed(0)
    norm = make().train()
    reference = copy.deepcopy(norm)
    x0 = _norm_input(norm)
    monkeypatch.setattr(compressed_ops, "dequantize", lambda *args: x0.contiguous())  # as dequantize lays it out
    ours = _module_step(norm, x0, lambda m, x: compressed_ops.module_call(m, x, bits=8))
    eager = _module_step(reference, x0, lambda m, x: m(x))
    assert torch.equal(ours[0], eager[0])
    torch.testing.assert_close(ours[1], eager[1])
    for mine, theirs in zip(ours[2], eager[2], strict=True):
        torch.testing.assert_close(mine, theirs)
    for mine, theirs in zip(ours[3], eager[3], strict=True):
        assert torch.equal(mine, theirs)


def input_gradient_errors(make, x0: torch.Tensor) -> dict[int, float]:
    """||g - g_eager|| / ||g_eager|| of the input gradient of `make()`'s module run as its
    compressed op, at 8 and 4 bits, on `x0`."""
    eager = _module_step(make().train(), x0, lambda m, x: m(x))[1]
    errors = {}
    for bits in (8, 4):
        compressed_ops.manual_seed(0)
        got = _module_step(make().train(), x0, lambda m, x: compressed_ops.module_call(m, x, bits=bits))[1]
        errors[bits] = float((got - eager).norm() / eager.norm())
    return errors


@pytest.mark.parametrize("make", _NORMS)
def test_a_per_sample_norm_errs_less_with_more_bits(make):
    torch.manual_seed(0)
    errors = input_gradient_errors(make, _norm_input(make()))
    # a level of 2^-bits of each group's range: 4 bits step 17 times 8 bits' step
    assert 0 < errors[8] < errors[4] / 4 and errors[4] < 0.1, errors


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.PReLU(), (2, 8, 5, 6, 4)), (lambda: nn.PReLU(8, 0.3), (2, 8, 5, 6, 4)),
    (lambda: nn.PReLU(8), (2, 8, 7, 9)), (lambda: nn.PReLU(), (5, 7)),
])
def test_a_prelu_keeps_its_input_gradient_exact_and_its_slopes_close(make, shape):
    """Its output and input gradient bit for bit (zeros in the input take the slope, as
    eager's); the slope's gradient from the quantized input, nearer with more bits."""
    torch.manual_seed(0)
    x0 = torch.randn(*shape)
    x0.view(-1)[:5] = 0
    prelu = make()
    eager = _module_step(copy.deepcopy(prelu), x0, lambda m, x: m(x))
    errors = []
    for bits in (8, 4):
        compressed_ops.manual_seed(0)
        module = copy.deepcopy(prelu)
        out, grad, (slope,), _ = _module_step(module, x0, lambda m, x: compressed_ops.module_call(m, x, bits=bits))
        assert torch.equal(out, eager[0]) and torch.equal(grad, eager[1])
        errors.append(float((slope - eager[2][0]).norm() / eager[2][0].norm()))
    assert 0 < errors[0] < errors[1] < 0.2, errors


def test_an_instance_norm_with_running_statistics_in_eval_mode_is_no_lossy_kind():
    from rewriter.passes import compress

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.tracked, self.plain = nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, track_running_stats=True), nn.InstanceNorm3d(4)

        def forward(self, x):
            return self.plain(self.tracked(self.conv(x)))

    gm = capture(Net().eval()).gm
    assert compress.lossy_nodes(gm) == ["conv", "plain"]


def test_a_monai_volume_unet_compressed_lossy_fits_as_predicted_and_trains_close_to_eager():
    """MONAI's 3-D UNet (InstanceNorm and PReLU after each convolution): at 0.75 of its
    peak, compress alone at 8 bits needs the norms' and the PReLUs' inputs dropped too
    (the least it reaches: 0.945 of the peak with convolutions alone, 0.773 with the
    norms, 0.696 with both); the forward stays exact."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = nets.UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).train()
    reference = copy.deepcopy(model)
    x = torch.randn(1, 1, 16, 16, 16)
    eager = measure_peak(model, x)
    optimized = rewriter.optimize(model, int(0.75 * eager), x, strategies="compress", compress_bits=8)
    kinds = {type(optimized.get_submodule(n.args[0].target)) for n in optimized.graph.nodes
             if n.target is compressed_ops.module_call}
    assert {nn.InstanceNorm3d, nn.PReLU} <= kinds
    assert measure_peak(optimized, x) == optimized.plan.predicted_peak_bytes <= int(0.75 * eager)
    compressed_ops.manual_seed(0)
    assert torch.equal(train_step(optimized, x), train_step(reference, x))
    assert F.cosine_similarity(gradient(model), gradient(reference), dim=0) >= 0.999
