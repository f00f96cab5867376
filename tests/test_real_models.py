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
    assert optimized.plan.segments or optimized.plan.spans
    assert rewriter.measure_peak(optimized, x) <= budget
    assert_trains_like(dynunet(), model, optimized, x)


def deep_dynunet() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.DynUNet(2, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2]).train()


def basic_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8)).train()


def highresnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.HighResNet(spatial_dims=2, in_channels=1, out_channels=2).train()


def efficientnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=1, num_classes=2).train()


def segresnet_ds() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.SegResNetDS(spatial_dims=2, init_filters=8, in_channels=1, out_channels=2).train()


@pytest.mark.parametrize("make", [deep_dynunet, basic_unet, highresnet, efficientnet, segresnet_ds])
def test_monai_networks_are_predicted_as_measured(make):
    """Issue 21: DynUNet's in-place LeakyReLU on InstanceNorm's views was predicted 9%
    low; BasicUNet's skip connections were traced out (torch.jit.isinstance of a
    traced value) and its profile failed. BasicUNet's UpCats branch on sizes (padding
    odd edges) and len(x.shape): traced on the inputs' sizes, not opaque leaves.
    HighResNet wraps each block's output in torch.as_tensor, which symbolic tracing
    could not follow: every block was an opaque leaf, and the network itself could not
    be captured. EfficientNet's drop connect reads `x.shape[0]` after a convolution: a
    run of nodes ending in that int was taken for a segment, and planning failed
    (KeyError). SegResNetDS checks its input's sizes with a loop over `x.shape[2:]`,
    which symbolic tracing could not iterate: the network could not be captured."""
    model, x = make(), torch.randn(2, 1, 64, 64)
    measured = rewriter.measure_peak(model, x)
    plan = rewriter.explain(model, x)
    assert plan.predicted_peak_bytes == measured and plan.opaque == ()
    optimized, budget = optimized_within(model, x, 0.5)
    assert rewriter.measure_peak(optimized, x) <= budget
    assert_trains_like(make(), model, optimized, x)


def segresnet_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.SegResNetVAE(input_image_size=(32, 32), spatial_dims=2, in_channels=1, out_channels=2,
                             init_filters=8).train()


def test_a_vae_branch_that_calls_the_decoder_again_is_planned_within_its_budget():
    """SegResNetVAE's VAE branch calls the decoder's modules again: autograd holds their
    weight gradients from that branch's backward until the decoder's, which the cost
    model did not count (the plan at half the peak measured 7% over it)."""
    model, x = segresnet_vae(), torch.randn(2, 1, 32, 32)
    budget = rewriter.measure_peak(model, x) // 2
    optimized = rewriter.optimize(model, budget, x)
    assert rewriter.measure_peak(optimized, x) == optimized.plan.predicted_peak_bytes <= budget
    assert_trains_like(segresnet_vae(), model, optimized, x)


def _monai(name: str, dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "UNet":
        return nets.UNet(dims, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    if name == "BasicUNet":
        return nets.BasicUNet(spatial_dims=dims, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8))
    if name == "SegResNet":
        return nets.SegResNet(spatial_dims=dims, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 2, 2),
                              blocks_up=(1, 1))
    if name == "DynUNet":
        return nets.DynUNet(dims, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2])
    if name == "AttentionUnet":
        return nets.AttentionUnet(dims, 1, 2, channels=(8, 16, 32), strides=(2, 2))
    return nets.DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2)


MONAI = ["UNet", "BasicUNet", "SegResNet", "DynUNet", "AttentionUnet", "DenseNet121"]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", MONAI)
def test_monai_matrix(name, dims):
    """Issue 21's CI matrix: predicted as measured, optimized at 0.5 of eager fitting
    when measured (or the honest minimum's plan), two training steps with an optimizer
    step between like eager's, and `.eval()` inference the model's own."""
    model = _monai(name, dims).train()
    x = torch.randn(2, 1, *((64, 64) if dims == 2 else (32, 32, 32)))
    measured = rewriter.measure_peak(model, x)
    assert rewriter.explain(model, x).predicted_peak_bytes == measured
    reference = _monai(name, dims).train()
    optimized, budget = optimized_within(model, x, 0.5)
    assert rewriter.measure_peak(optimized, x) <= budget
    tolerance = {}
    if optimized.plan.row_split:
        # tiles sum in another order than eager: compared in float64 (the plan shares the
        # model's modules), with an absolute 1e-5 for the conv biases before InstanceNorm,
        # whose gradients are zero up to rounding (7e-7 in float64 where the other
        # gradients reach 3e7 after the SGD step)
        model.double()
        reference.double()
        x = x.double()
        tolerance = {"rtol": 1e-7, "atol": 1e-5}
    for step in range(2):
        if step:
            for module in (reference, model):
                torch.optim.SGD(module.parameters(), lr=0.1).step()
                module.zero_grad()
        assert_trains_like(reference, model, optimized, x, **tolerance)
    optimized.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), reference(x))
