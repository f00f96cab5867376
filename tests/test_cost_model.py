"""The cost model's predicted peak held against the measured peak (ARCHITECTURE.md's protocol)."""

import copy

import pytest
import torch
from torch import nn

import rewriter
from rewriter.cost_models.saved import saved_tensors
from rewriter.cost_models.simulate import simulate
from examples.zoo import ZOO
from rewriter.report import cost_model
from tests.conftest import MiB
from tests.test_measure import HAND_COUNTED_PEAK
from tests.test_optimize import assert_trains_like

TOLERANCE = 0.02  # the acceptance bound of the issue; on this zoo the error is 0 to 4 bytes


def relative_error(predicted: int, measured: int) -> float:
    return abs(predicted - measured) / measured


@pytest.mark.parametrize("factor", [1, 2])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_predicted_peak_matches_measured(name, factor):
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input(batch=factor * zoo.test_shape[0])
    plan = rewriter.explain(model, x)
    measured = rewriter.measure_peak(model, x)
    assert relative_error(plan.predicted_peak_bytes, measured) <= TOLERANCE, (plan.predicted_peak_bytes, measured)
    assert plan.budget_bytes is None and {n.strategy for n in plan.nodes} == {"keep"}  # explain rewrites nothing


LOSSES = {
    "weighted square": lambda out: (out * out).sum() / 2,  # its gradient is a new tensor, not ones expanded
    "mse to a target made inside": lambda out: nn.functional.mse_loss(out, torch.ones_like(out)),
    "smooth l1": lambda out: nn.functional.smooth_l1_loss(out, torch.zeros_like(out)),
    "cross entropy of pooled maps": lambda out: nn.functional.cross_entropy(
        out.flatten(2).mean(2), torch.zeros(out.shape[0], dtype=torch.long)),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("name", ["unet", "highres_fcn"])
def test_predicted_peak_is_measured_under_other_losses(name, loss):
    """To the byte: the loss's gradient dies with its consumer, what the loss made for
    its backward (a target) lives until then, and a reduced MSE or smooth L1 loss on
    CPU sits on a storage as large as its input (kernel_storage probes the kernel)."""
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    predicted = simulate(cost_model(model, x, LOSSES[loss])).peak_bytes
    assert predicted == rewriter.measure_peak(model, x, LOSSES[loss])


@pytest.mark.parametrize("name", ["resnet18", "densenet_bc", "unet", "data_dependent"])
def test_two_traces_predict_other_batch_sizes(name):
    """Byte counts are expressions of the batch: two traces answer for every batch."""
    zoo = ZOO[name]
    model = zoo.test_model()
    costs = cost_model(model, zoo.test_input(), over_batch=True)
    for batch in (1, 3, 3 * zoo.test_shape[0]):
        measured = rewriter.measure_peak(model, zoo.test_input(batch=batch))
        assert relative_error(simulate(costs, batch).peak_bytes, measured) <= TOLERANCE, batch


def test_largest_batch_is_the_last_that_fits_when_measured():
    zoo = ZOO["resnet18"]
    model = zoo.test_model()
    budget = 24 * MiB
    batch = rewriter.largest_batch(model, zoo.test_input(), budget)
    assert batch > 1
    assert rewriter.measure_peak(model, zoo.test_input(batch=batch)) <= budget
    assert rewriter.measure_peak(model, zoo.test_input(batch=batch + 1)) > budget


def test_largest_batch_rejects_a_non_positive_budget():
    zoo = ZOO["vgg"]
    with pytest.raises(rewriter.InputError, match="budget_bytes=0"):
        rewriter.largest_batch(zoo.test_model(), zoo.test_input(), 0)


class TwoConsumersAndAView(nn.Module):
    """y (1 MiB) is saved by two convs; a flattened view of y is saved by a linear."""

    def __init__(self):
        super().__init__()
        self.make = nn.Conv2d(1, 1, 1, bias=False)
        self.left = nn.Conv2d(1, 1, 1, bias=False)
        self.right = nn.Conv2d(1, 1, 1, bias=False)
        self.head = nn.Linear(512 * 512, 1, bias=False)

    def forward(self, x):
        y = self.make(x)
        return self.left(y).sum() + self.right(y).sum() + self.head(y.flatten(1)).sum()


def test_saved_tensor_counts_once_and_views_count_zero():
    model, x = TwoConsumersAndAView().train(), torch.randn(1, 1, 512, 512)
    plan = rewriter.explain(model, x)
    assert plan["make"].saved_bytes == 1 * MiB
    assert set(plan["make"].held_by) == {"left", "right", "head"}
    assert plan["flatten"].saved_bytes == 0  # the view owns no memory
    costs = cost_model(model, x)
    owners = [t.owner for t in saved_tensors(costs)]
    assert owners.count("make") == 1
    assert relative_error(plan.predicted_peak_bytes, rewriter.measure_peak(model, x)) <= TOLERANCE


def test_hand_counted_prediction_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU()).train()
    plan = rewriter.explain(model, torch.randn(1, 1, 512, 512))
    assert plan.predicted_peak_bytes == HAND_COUNTED_PEAK
    assert plan["_1"].saved_bytes == 1 * MiB  # the ReLU output, kept by the ReLU itself
    assert plan["_0"].saved_bytes == 0  # the conv keeps its input, which is the step's input


def test_lifetimes_follow_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU()).train()
    simulation = simulate(cost_model(model, torch.randn(1, 1, 512, 512)))
    # the conv output dies once the ReLU has run (nothing saved it); the ReLU output is
    # the model output, held by the caller to the end of the step
    assert simulation.lifetime("_0") == [("forward 0", "forward 1")]
    assert simulation.lifetime("_1") == [("forward 1", "end of step")]


@pytest.mark.parametrize("name", ["dropout", "resnet18", "data_dependent", "shared_module"])
def test_explain_changes_nothing_in_the_model(name, unchanged):
    snapshot, assert_unchanged = unchanged
    zoo = ZOO[name]
    model = zoo.test_model()
    for p in list(model.parameters())[::3]:
        p.grad = torch.randn_like(p)
    before = snapshot(model)
    rewriter.explain(model, zoo.test_input())
    assert_unchanged(model, before)


def test_explain_names_the_opaque_leaf():
    zoo = ZOO["data_dependent"]
    plan = rewriter.explain(zoo.test_model(), zoo.test_input())
    assert plan.opaque == ("gate",)
    assert plan["gate"].saved_bytes > 0
    assert "opaque leaves (not rewritten inside): gate" in str(plan)


def test_inputs_that_do_not_fit_name_the_failing_node():
    zoo = ZOO["resnet18"]
    with pytest.raises(rewriter.InputError, match="do not fit the model: node 'conv1'"):
        rewriter.explain(zoo.test_model(), torch.randn(2, 5, 32, 32))


def test_wrong_number_of_inputs_is_an_error():
    zoo = ZOO["vgg"]
    x = zoo.test_input()
    with pytest.raises(rewriter.InputError, match=r"example_inputs do not match VGGStyle.forward\(x\): too many positional arguments"):
        rewriter.explain(zoo.test_model(), (x, x))


def test_flops_are_counted_per_node():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False)).train()
    plan = rewriter.explain(model, torch.randn(3, 2, 8, 8))
    assert plan["_0"].forward_flops == 2 * 3 * 4 * 8 * 8 * 2 * 3 * 3  # 2 x batch x out x H x W x in x kh x kw


class _LayerScaled(nn.Module):
    """A parameter read in forward, not through a module call (ConvNeXt's and timm's
    layer scale, `gamma * x`): the graph reads it with a get_attr node."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((8, 1, 1), 0.5))

    def forward(self, x):
        y = torch.relu(self.bn(self.conv1(x)))
        return y + self.gamma * self.conv2(y)


def test_a_layer_scale_parameter_is_profiled_and_trained_like_eager():
    # issue 21: explain raised "Boolean value of Tensor with more than one value is ambiguous"
    torch.manual_seed(0)
    model, x = _LayerScaled().train(), torch.randn(2, 3, 16, 16)
    reference = copy.deepcopy(model)
    measured = rewriter.measure_peak(model, x)
    assert rewriter.explain(model, x).predicted_peak_bytes == measured
    optimized = rewriter.optimize(model, int(0.9 * measured), x, strategies="recompute")
    assert rewriter.measure_peak(optimized, x) <= int(0.9 * measured)
    assert_trains_like(reference, model, optimized, x)


def _norms_then_in_place(norm: type, dropout: bool = False) -> nn.Module:
    layers = [nn.Conv2d(32, 32, 3, padding=1)]
    for _ in range(4):
        layers += [norm(32, affine=True), *([nn.Dropout(0.0)] if dropout else []), nn.LeakyReLU(0.01, inplace=True),
                   nn.Conv2d(32, 32, 3, padding=1)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("norm", ["instance", "batch", "instance, dropout"])
def test_an_in_place_op_on_a_view_is_predicted_to_the_byte(norm):
    # issue 21: InstanceNorm's output is a view of a batch norm over (1, N*C, H, W); an
    # in-place LeakyReLU after it backpropagates through CopySlices (a gradient of the
    # base and a copy of the slice), which MONAI's DynUNet does at every block: it was
    # predicted 2 MiB (two 1 MiB maps) under the measured peak, 9% low on DynUNet. With a
    # p=0 dropout between them (MONAI's ADN blocks, BasicUNet), which hands the view on,
    # the profile's own run had made the dropout's input a copy: 2 MiB low again
    torch.manual_seed(0)
    model = _norms_then_in_place(nn.BatchNorm2d if norm == "batch" else nn.InstanceNorm2d, "dropout" in norm)
    x = torch.randn(2, 32, 64, 64)  # each map 1 MiB
    measured = rewriter.measure_peak(model, x)
    assert rewriter.explain(model, x).predicted_peak_bytes == measured
    reference = copy.deepcopy(model)
    budget = int(0.6 * measured)
    optimized = rewriter.optimize(model, budget, x, strategies="recompute")
    measured = rewriter.measure_peak(optimized, x)
    assert measured <= budget
    assert 0 <= rewriter.explain(optimized, x).predicted_peak_bytes - measured <= 4  # the checkpoint's own scalar
    assert_trains_like(reference, model, optimized, x)


@pytest.mark.parametrize("activation", [nn.SiLU, nn.Mish, lambda: nn.SiLU(inplace=True)], ids=["silu", "mish", "silu_"])
def test_activations_whose_backward_the_flop_counter_decomposes_are_predicted_to_the_byte(activation):
    # issue 21: FlopCounterMode runs SiLU's and Mish's backward as pointwise ops where the
    # kernel allocates its result alone; seen below it, the profile counted each of them
    # (SiLU +80-100% of its nodes' bytes, Mish +120-140%)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), activation(), nn.Conv2d(8, 8, 3, padding=1), activation(),
                          nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 8, 32, 32)
    assert rewriter.explain(model, x).predicted_peak_bytes == rewriter.measure_peak(model, x)
    flops = cost_model(model, x).by_name["_0"].fwd_flops
    assert flops == 2 * 2 * 8 * 8 * 9 * 32 * 32  # the FLOP counter still counts (the first conv: 2 x MACs)


def test_selective_segments_profile_as_composed_without_a_saved_tensors_hooks_warning():
    """The profiler counts what a selective checkpoint keeps as the checkpoint's own, which
    needs those tensors to bypass its saved-tensor hooks: torch 2.14 warns unless that is
    asked for explicitly (older versions have no such keyword and always bypass)."""
    import warnings

    from rewriter.measure import default_loss
    from rewriter.pipeline import _Planner

    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    planner = _Planner(model, (x,), default_loss, ("recompute",))
    planner.profile_modes()
    modes = planner.extreme("selective")
    assert "selective" in modes.values()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm, plan = planner.plan(modes, None, {})
    assert not [w for w in caught if "saved_tensors_hooks" in str(w.message)]
    assert 0 <= plan.predicted_peak_bytes - simulate(planner.composed(modes)).peak_bytes <= 4
    assert plan.predicted_peak_bytes - rewriter.measure_peak(gm, x) in (0, 4)


class _TransposedNarrowing(nn.Module):
    """A 3-D transposed convolution from 8 channels to 2, its output saved by the next
    convolution: on CPU at batch 1 in float32 (any batch in float64) it runs the
    SlowTranspose3d kernel, which returns its output on a storage as large as its input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ConvTranspose3d(8, 2, 3, padding=1),
                                  nn.Conv3d(2, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 1, 1))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_narrowing_3d_transposed_convolution_is_predicted_to_the_byte_at_every_batch(dtype):
    """Its larger storage at batch 1 is counted (kernel_storage probes the kernel), and
    the costs over the batch from a batch-1 example hold at batch 1 and past it (the
    line through batches 2 and 3; batch 1 as traced, where float32 runs another kernel)."""
    torch.manual_seed(0)
    model = _TransposedNarrowing().to(dtype).train()
    x = torch.randn(1, 1, 12, 12, 12, dtype=dtype)
    layer = model.body[1]
    output = layer(torch.randn(1, 8, 12, 12, 12, dtype=dtype))
    assert output.untyped_storage().nbytes() == 4 * output.numel() * output.element_size()  # what is modelled
    costs = cost_model(model, x, over_batch=True)
    for batch in (1, 2, 3, 5):
        measured = rewriter.measure_peak(model, torch.randn(batch, 1, 12, 12, 12, dtype=dtype))
        assert simulate(costs, batch).peak_bytes == measured, batch
    assert simulate(cost_model(model, x)).peak_bytes == rewriter.measure_peak(model, x)


class _SharedAcross(nn.Module):
    """One convolution called on two branches: backward reaches its second call first,
    and autograd holds that weight gradient until the first call's (past the large
    branch between them), then sums the two."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(32, 32, 3, padding=1)
        self.expand = nn.Conv2d(32, 256, 3, padding=1)
        self.reduce = nn.Conv2d(256, 32, 3, padding=1)
        self.pre = nn.Conv2d(32, 32, 1)

    def forward(self, x):
        h = self.reduce(torch.relu(self.expand(torch.relu(self.shared(x)))))
        return h + self.shared(torch.relu(self.pre(x)))


def test_a_parameter_read_twice_holds_its_first_gradient_until_the_last():
    torch.manual_seed(0)
    model, x = _SharedAcross().train(), torch.randn(2, 32, 8, 8)
    measured = rewriter.measure_peak(model, x)
    costs = cost_model(model, x)
    assert simulate(costs).peak_bytes == measured
    holders = {(kind, node): nbytes for kind, node, nbytes in rewriter.explain(model, x).peak_held_by}
    weight = model.shared.weight.numel() * 4
    assert holders.get(("parameter gradient", "shared")) == weight + model.shared.bias.numel() * 4
    with pytest.raises(rewriter.BudgetError) as error:  # the plan that once fit on paper, not when measured
        rewriter.optimize(model, int(0.95 * measured), x, strategies="recompute")
    assert error.value.minimum_bytes == measured  # nothing recompute does lowers its peak


class _KeepsLocals(nn.Module):
    """Keeps its features in a local list past their last use (MONAI's LocalNet, a
    UNet++): eager Python holds them until forward returns."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))

    def forward(self, x):
        features = [head(x) + 1 for head in self.heads]  # saved by nothing: dead after the stack in a graph
        mean = torch.stack(features).mean(0)
        return mean * 2


def test_values_named_by_local_variables_live_until_forward_returns():
    torch.manual_seed(0)
    model, x = _KeepsLocals().train(), torch.randn(2, 8, 16, 16)
    assert simulate(cost_model(model, x)).peak_bytes == rewriter.measure_peak(model, x)
