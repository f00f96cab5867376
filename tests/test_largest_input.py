"""largest_input: the largest square image or cubic patch whose training step fits."""

import pytest
import torch

import rewriter
from examples.zoo import ZOO
from rewriter.device_memory import held_outside_activations


def _volume_unet():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    return nets.UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1).train()


def test_the_largest_cubic_patch_is_the_one_whose_measured_step_set_the_budget():
    model = _volume_unet()
    budget = rewriter.measure_peak(model, torch.randn(1, 1, 40, 40, 40))
    edge = rewriter.largest_input(model, torch.randn(1, 1, 16, 16, 16), budget, multiple=8)
    assert edge == 40
    assert rewriter.explain(model, torch.randn(1, 1, 48, 48, 48)).predicted_peak_bytes > budget


def test_the_largest_square_image_of_a_2d_network():
    zoo = ZOO["unet"]
    model = zoo.test_model()
    budget = rewriter.measure_peak(model, torch.randn(2, 3, 96, 96))
    assert rewriter.largest_input(model, torch.randn(2, 3, 32, 32), budget, multiple=8) == 96


def test_a_device_budget_takes_the_parameters_and_state_off_first():
    model = _volume_unet()
    optimizer = torch.optim.Adam(model.parameters())
    held = sum(b for _, b in held_outside_activations(model, optimizer))
    budget = rewriter.measure_peak(model, torch.randn(1, 1, 32, 32, 32))
    x = torch.randn(1, 1, 16, 16, 16)
    assert rewriter.largest_input(model, x, held + budget, multiple=8, optimizer=optimizer) == 32
    assert rewriter.largest_input(model, x, held, multiple=8, optimizer=optimizer) == 0


def test_inputs_without_spatial_sizes_and_bad_arguments_are_refused():
    linear = torch.nn.Linear(4, 2).train()
    with pytest.raises(rewriter.InputError, match="spatial"):
        rewriter.largest_input(linear, torch.randn(2, 4), 10**6)
    model = ZOO["unet"].test_model()
    with pytest.raises(rewriter.InputError, match="multiple"):
        rewriter.largest_input(model, torch.randn(2, 3, 32, 32), 10**6, multiple=0)
    assert rewriter.largest_input(model, torch.randn(2, 3, 32, 32), 1000, multiple=8) == 0


def test_largest_batch_answers_for_volumes_too():
    model = _volume_unet()
    budget = rewriter.measure_peak(model, torch.randn(3, 1, 16, 16, 16))
    assert rewriter.largest_batch(model, torch.randn(1, 1, 16, 16, 16), budget) == 3
