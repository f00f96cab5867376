"""Weight gradients added into `.grad` in place (passes.accumulate): the same gradients,
no weight-sized temporary, predicted to the byte, and autograd's other paths intact."""

import pytest
import torch
from torch import nn

import rewriter
from examples.zoo.plain import VGGStyle
from examples.zoo.resnet import resnet18_style
from rewriter.cost_models.storage_tracker import StorageTracker
from rewriter.measure import default_loss
from rewriter.passes import accumulate, accumulate_ops
from rewriter.report import captured_and_profiled
from rewriter.trace import capture
from tests.test_optimize import assert_trains_like, train_step


class WideHead(nn.Module):
    """A convolution of 256 x 256 x 3 x 3 weights (2.25 MiB) at 4 x 4, and a Linear of
    4,096 x 1,024 (16 MiB): their weight gradients, not the activations, hold the peak."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 256, 3, padding=1)
        self.conv = nn.Conv2d(256, 256, 3, padding=1)
        self.bn = nn.BatchNorm2d(256)
        self.fc = nn.Linear(256 * 4 * 4, 1024)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(torch.relu(self.stem(x))))).flatten(1))


def _twins(build, *shape: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Two models `build()` makes with the same weights, and an input of `shape` (seeded)."""
    torch.manual_seed(0)
    model, reference, x = build(), build(), torch.randn(shape)
    reference.load_state_dict(model.state_dict())
    return model, reference, x


def _zeroed(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def _rewritten(model: nn.Module) -> torch.fx.GraphModule:
    """`model` with its convolution's weight gradient added into .grad in 4 slices, its
    Linear's in one."""
    return accumulate.rewrite(capture(model).gm, {"conv": 4, "fc": 1})


def test_a_rewritten_step_adds_the_same_gradients_into_grad_without_a_weight_sized_temporary():
    model, reference, x = _twins(WideHead, 2, 3, 4, 4)
    rewritten = _rewritten(model)
    assert [n.target.__name__ for n in rewritten.graph.nodes if n.op == "call_function"
            and n.target.__module__.endswith("accumulate_ops")] == ["conv", "linear"]
    _zeroed(model), _zeroed(reference)
    for _ in range(2):  # twice: the second step adds onto the first's gradients, as accumulation does
        assert_trains_like(reference, model, rewritten, x)
    peaks = {}
    for name, module in (("eager", _zeroed(reference)), ("rewritten", _zeroed(rewritten))):
        with StorageTracker() as tracker:
            module(x).sum().backward()
        peaks[name] = tracker.peak
    fc, conv = 4096 * 1024 * 4, 256 * 256 * 9 * 4
    # eager's peak is the Linear's temporary (and a few activations); rewritten, neither
    # temporary is made whole: the convolution's comes in slices of a quarter
    assert fc < peaks["eager"] < fc + conv
    assert peaks["rewritten"] < conv / 2


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("how", ["grad is None", "autograd.grad", "hook on the weight", "inputs leave it out",
                                 "create_graph"])
def test_where_autograd_would_not_add_into_grad_the_gradient_is_returned_as_autograd_computes_it(how):
    model, reference, x = _twins(WideHead, 2, 3, 4, 4)
    rewritten = _rewritten(model)
    if how == "grad is None":
        assert_trains_like(reference, model, rewritten, x)
    elif how == "autograd.grad":
        expected = torch.autograd.grad(reference(x).sum(), list(reference.parameters()))
        for got, want in zip(torch.autograd.grad(rewritten(x).sum(), list(model.parameters())), expected):
            torch.testing.assert_close(got, want)
        assert all(p.grad is None for p in model.parameters())
    elif how == "hook on the weight":  # it sees each gradient before accumulation, and changes it
        for m in (model, reference):
            m.fc.weight.register_hook(lambda g: 2 * g)
            m.conv.weight.register_hook(lambda g: 3 * g)
            _zeroed(m)
        assert_trains_like(reference, model, rewritten, x)
    elif how == "inputs leave it out":
        _zeroed(model), _zeroed(reference)
        rewritten(x).sum().backward(inputs=[model.stem.weight])
        reference(x).sum().backward(inputs=[reference.stem.weight])
        torch.testing.assert_close(model.stem.weight.grad, reference.stem.weight.grad)
        assert not model.fc.weight.grad.any() and not model.conv.weight.grad.any()
    else:
        _zeroed(model), _zeroed(reference)
        rewritten(x).sum().backward(create_graph=True)
        reference(x).sum().backward(create_graph=True)
        for (name, p), q in zip(reference.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        assert model.fc.weight.grad.requires_grad  # a graph of the backward, as autograd builds it


def test_a_plan_takes_the_temporaries_away_before_any_other_rewrite_and_is_predicted_to_the_byte():
    model, reference, x = _twins(WideHead, 2, 3, 4, 4)
    eager = rewriter.measure_peak(model, x)
    optimized = rewriter.optimize(model, eager // 2, x)
    plan = optimized.plan
    chunks = dict(plan.accumulated)
    assert chunks.keys() == {"conv", "fc"} and chunks["fc"] == 1 and chunks["conv"] > 1  # the stem's weight is small
    assert not (plan.segments or plan.spans or plan.inverted or plan.compressed or plan.row_split)
    assert sum(n.seconds_added for n in plan.nodes) == 0.0
    assert rewriter.measure_peak(optimized, x) == plan.predicted_peak_bytes <= eager // 2
    assert_trains_like(reference, model, optimized, x)
    with pytest.raises(rewriter.BudgetError):
        rewriter.optimize(model, eager // 2, x, strategies=("recompute", "invert", "compress"))


def test_recomputed_segments_rerun_rewritten_nodes_and_are_predicted_to_the_byte():
    model, reference, x = _twins(VGGStyle, 2, 3, 32, 32)
    eager = rewriter.measure_peak(model, x)
    alone = rewriter.optimize(model, int(0.8 * eager), x, strategies="accumulate").plan.predicted_peak_bytes
    optimized = rewriter.optimize(model, int(0.5 * alone), x, strategies=("recompute", "accumulate"))
    plan = optimized.plan
    recomputed = {n for n in plan if plan[n].strategy == "recompute"}
    assert recomputed & {n for n, _ in plan.accumulated}  # a rewritten node inside a recomputed segment
    assert rewriter.measure_peak(optimized, x) == plan.predicted_peak_bytes <= int(0.5 * alone)
    _zeroed(reference)
    assert_trains_like(reference, model, _zeroed(optimized), x)


def test_a_shared_weight_is_left_as_it_is():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(512, 512)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    model, x = Twice(), torch.randn(2, 512)
    captured, costs = captured_and_profiled(model, (x,), default_loss)
    assert accumulate.eligible(captured.gm, costs, 1) == {}
    with pytest.raises(ValueError, match="no Linear or convolution"):
        accumulate.rewrite(captured.gm, {"relu": 1})


def test_a_plan_with_accumulated_weights_saves_loads_and_applies_alike(tmp_path):
    torch.manual_seed(0)
    model, x = WideHead(), torch.randn(2, 3, 4, 4)
    optimized = rewriter.optimize(model, rewriter.measure_peak(model, x) // 2, x)
    rewriter.save(optimized, tmp_path / "plan")
    loaded = rewriter.load(tmp_path / "plan")
    applied = rewriter.apply_plan(model, rewriter.Plan.from_json(optimized.plan.to_json()))
    assert loaded.plan.accumulated == applied.plan.accumulated == optimized.plan.accumulated
    for module in (loaded, applied):
        assert rewriter.measure_peak(module, x) == optimized.plan.predicted_peak_bytes
    expected = train_step(_zeroed(optimized), x)
    grads = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(train_step(_zeroed(applied), x), expected)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def _sliced_step(build, x: torch.Tensor, chunks: int) -> tuple[nn.Module, int]:
    """A convolution `build()` makes, stepped through `accumulate_ops.conv` in `chunks`
    slices into zeroed gradients, held to a twin stepped as it is (the input's, weight's
    and bias's gradients); the convolution and the step's measured peak."""
    torch.manual_seed(0)
    conv, reference = build(), build()
    reference.load_state_dict(conv.state_dict())
    for module in (conv, reference):
        _zeroed(module)
    with StorageTracker() as tracker:
        accumulate_ops.conv(x, conv, chunks).sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    reference(x).sum().backward()
    torch.testing.assert_close(grad_x, x.grad)
    for mine, theirs in ((conv.weight, reference.weight), (conv.bias, reference.bias)):
        torch.testing.assert_close(mine.grad, theirs.grad)
    return conv, tracker.peak


@pytest.mark.parametrize("groups, chunks", [(1, 3), (2, 8), (4, 4), (8, 3)])
def test_a_grouped_convolution_adds_its_gradient_slice_by_slice(groups, chunks):
    cuts = accumulate_ops.slices(64, 32, groups, chunks)
    covered = [c for start, stop, *_ in cuts for c in range(start, stop)]
    assert covered == list(range(64))  # every output channel once, in order
    for start, stop, first, last, count in cuts:  # each slice reads just its groups' inputs
        assert (first, last) == (start // (64 // groups) * (32 // groups), first + count * (32 // groups))
    torch.manual_seed(1)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    conv, peak = _sliced_step(lambda: nn.Conv2d(32, 64, 3, padding=1, groups=groups), x, chunks)
    weight = conv.weight.numel() * 4
    assert peak < 2 * 64 * 8 * 8 * 4 + x.numel() * 4 + weight / 2  # output, grad of x, a slice: never the whole


def test_under_deterministic_algorithms_autograd_is_handed_a_dense_zero():
    model, reference, x = _twins(WideHead, 2, 3, 4, 4)
    rewritten = _rewritten(model)
    _zeroed(model), _zeroed(reference)
    torch.use_deterministic_algorithms(True)
    try:
        assert accumulate_ops._handed_over(model.fc.weight).layout == torch.strided
        assert_trains_like(reference, model, rewritten, x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert accumulate_ops._handed_over(model.fc.weight).layout == torch.sparse_coo


@pytest.mark.parametrize("build", [VGGStyle, resnet18_style], ids=["vgg", "resnet18"])
def test_more_strategies_never_name_a_higher_minimum(build):
    torch.manual_seed(0)
    model, x = build(), torch.randn(2, 3, 32, 32)
    minima = []
    for strategies in (("recompute",), ("recompute", "accumulate"), None):
        with pytest.raises(rewriter.BudgetError) as caught:
            rewriter.optimize(model, 1, x, strategies=strategies)
        minima.append(caught.value.minimum_bytes)
        assert rewriter.measure_peak(rewriter.apply_plan(model, caught.value.plan), x) <= minima[-1]
    assert minima[0] > minima[1] >= minima[2]  # at these sizes the weights' gradients held recompute's floor


@pytest.mark.parametrize("dims", [1, 3])
def test_one_and_three_dimensional_convolutions_add_the_same_gradients_slice_by_slice(dims):
    kind = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    torch.manual_seed(1)
    x = torch.randn(2, 16, *(6,) * dims, requires_grad=True)
    conv, peak = _sliced_step(lambda: kind(16, 64, 3, padding=1, stride=2), x, 4)
    output = 2 * 64 * 3 ** dims * 4
    assert peak < output + x.numel() * 4 + conv.weight.numel() * 4 / 2  # a quarter of the weight at a time


@pytest.mark.parametrize("dims", [2, 3])
def test_a_transposed_convolution_adds_the_same_gradients_slice_by_slice(dims):
    kind = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    torch.manual_seed(1)
    x = torch.randn(2, 64, *(3,) * dims, requires_grad=True)
    conv, peak = _sliced_step(lambda: kind(64, 16, 3, stride=2, padding=1, output_padding=1), x, 4)
    output = 2 * 16 * 6 ** dims * 4
    assert peak < output + x.numel() * 4 * 5 / 4 + conv.weight.numel() * 4 / 2  # a slice of x and of the weight


class Decoder(nn.Module):
    """Two transposed convolutions of 512 -> 256 -> 64 channels (4 MiB and 256 KiB of
    weights) upsampling a 2 x 2 map: the first's weight gradient holds the peak."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(512, 256, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(256, 64, 2, stride=2)

    def forward(self, x):
        return self.up2(torch.relu(self.up1(x)))


def test_a_plan_over_transposed_convolutions_is_predicted_to_the_byte_and_trains_like_eager():
    model, reference, x = _twins(Decoder, 2, 512, 2, 2)
    eager = rewriter.measure_peak(model, x)
    optimized = rewriter.optimize(model, eager // 2, x)
    assert dict(optimized.plan.accumulated).keys() == {"up1", "up2"}
    assert rewriter.measure_peak(optimized, x) == optimized.plan.predicted_peak_bytes <= eager // 2
    _zeroed(reference)
    assert_trains_like(reference, model, _zeroed(optimized), x)


def test_a_monai_volume_unet_whose_peak_is_a_slow_transposed_convolution_is_predicted_to_the_byte():
    """Found on MONAI's 3-D UNet: at half its peak the plan is accumulate alone, and its
    peak sits where the last transposed convolution's output (32 to 2 channels, batch 1,
    on CPU's SlowTranspose3d kernel) lives on a storage as large as its input."""
    nets = pytest.importorskip("monai.networks.nets")

    def build():
        return nets.UNet(3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2).train()

    model, reference, x = _twins(build, 1, 1, 16, 16, 16)
    eager = rewriter.measure_peak(model, x)
    optimized = rewriter.optimize(model, eager // 2, x)
    assert [d.strategy for d in optimized.plan.decisions] == ["accumulate"]
    assert rewriter.measure_peak(optimized, x) == optimized.plan.predicted_peak_bytes <= eager // 2
    # the weight gradients summed in slices round otherwise in float32 (2e-5 apart on
    # gradients up to 39 on this machine's AVX-512 kernels): training compared in float64
    model, reference, x = _twins(lambda: build().double(), 1, 1, 16, 16, 16)
    _zeroed(reference)
    assert_trains_like(reference, model, _zeroed(rewriter.apply_plan(model, optimized.plan)), x.double())


class _MadeDifferently(nn.Conv3d):
    """A convolution subclass that changes only how it is made, as torchvision's
    Conv3DSimple does (its video ResNets)."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, padding=1, bias=False)

    @staticmethod
    def stride_of(stride: int) -> tuple[int, int, int]:
        return (stride,) * 3


class _ComputesOtherwise(_MadeDifferently):
    def forward(self, x):
        return super().forward(x) * 2


class _VideoBlock(nn.Module):
    def __init__(self, layer=_MadeDifferently):
        super().__init__()
        self.stem = nn.Conv3d(3, 64, 1)
        self.conv = layer(64)
        self.norm = nn.BatchNorm3d(64)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(self.stem(x))))


def test_a_layer_subclass_made_differently_is_one_call_and_accumulates():
    """torch.fx traced such a subclass through (`F.conv3d` on a weight attribute), which
    no strategy knew: r3d_18 at batch 1 stopped at 0.518 of eager, held by its 27 MiB
    weight gradients; it now fits half (measured)."""
    model, reference, x = _twins(_VideoBlock, 1, 3, 4, 6, 6)
    captured = capture(model)
    assert [n.target for n in captured.gm.graph.nodes if n.op == "call_module"] == ["stem", "conv", "norm"]
    eager = rewriter.measure_peak(model, x)
    optimized = rewriter.optimize(model, eager // 2, x)
    assert "conv" in dict(optimized.plan.accumulated)
    assert rewriter.measure_peak(optimized, x) == optimized.plan.predicted_peak_bytes <= eager // 2
    _zeroed(reference)
    assert_trains_like(reference, model, _zeroed(optimized), x)
    other = capture(_VideoBlock(_ComputesOtherwise))  # a subclass that computes otherwise is traced through
    assert "conv" not in [n.target for n in other.gm.graph.nodes if n.op == "call_module"]
