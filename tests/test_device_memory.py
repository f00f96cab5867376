"""A budget of device memory: parameters, gradients and the optimizer's state come off
it before the activation peak is planned."""

import copy

import pytest
import torch

import rewriter
from examples.zoo import ZOO
from rewriter.device_memory import held_outside_activations
from tests.test_optimize import assert_trains_like

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw_amsgrad": lambda params: torch.optim.AdamW(params, amsgrad=True),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "rmsprop_centered": lambda params: torch.optim.RMSprop(params, centered=True, momentum=0.5),
}


def _stepped_state_bytes(make, zoo) -> int:
    """The bytes of the state a real step allocates."""
    model = zoo.test_model()
    optimizer = make(model.parameters())
    model(zoo.test_input()).sum().backward()
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_optimizer_state_is_what_a_real_step_allocates(name):
    zoo = ZOO["resnet18"]
    model = zoo.test_model()
    split = dict(held_outside_activations(model, OPTIMIZERS[name](model.parameters())))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert split["parameters"] == split["gradients"] == weights
    assert split["optimizer state"] == _stepped_state_bytes(OPTIMIZERS[name], zoo)
    assert (split["optimizer state"] > 0) == (name != "sgd")


def test_an_optimizer_that_has_stepped_is_counted_from_its_own_state():
    zoo = ZOO["resnet18"]
    model = zoo.test_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(zoo.test_input()).sum().backward()
    optimizer.step()
    held = dict(held_outside_activations(model, optimizer))["optimizer state"]
    assert held == sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())


def test_a_device_budget_holds_the_activation_peak_to_what_is_left():
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    optimizer = torch.optim.Adam(model.parameters())
    held = sum(b for _, b in held_outside_activations(model, optimizer))
    activations = int(0.6 * rewriter.measure_peak(model, x))
    optimized = rewriter.optimize(model, held + activations, x, optimizer=optimizer, strategies="recompute")
    assert optimized.plan.budget_bytes == activations
    assert dict(optimized.plan.device_split)["optimizer state"] == _stepped_state_bytes(OPTIMIZERS["adam"], zoo)
    assert rewriter.measure_peak(optimized, x) <= activations
    assert "on the device" in optimized.plan.summary()
    assert rewriter.Plan.from_json(optimized.plan.to_json()) == optimized.plan
    assert_trains_like(zoo.test_model(), model, optimized, x)


def test_a_device_budget_below_the_parameters_and_state_names_them():
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    held = sum(b for _, b in held_outside_activations(model, optimizer))
    with pytest.raises(rewriter.BudgetError, match="below what the step holds besides activations") as caught:
        rewriter.optimize(model, held // 2, x, optimizer=optimizer, strategies="recompute")
    assert "optimizer state" in str(caught.value)
    assert caught.value.minimum_bytes > held
    assert caught.value.plan.device_split


def test_largest_batch_takes_the_parameters_and_state_off_a_device_budget():
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    optimizer = torch.optim.Adam(model.parameters())
    held = sum(b for _, b in held_outside_activations(model, optimizer))
    budget = 4 * rewriter.measure_peak(model, x)
    assert rewriter.largest_batch(model, x, held + budget, optimizer=optimizer) == rewriter.largest_batch(model, x, budget)
    assert rewriter.largest_batch(model, x, held, optimizer=optimizer) == 0


def test_an_optimizer_of_another_model_is_refused():
    model, other = ZOO["resnet18"].test_model(), copy.deepcopy(ZOO["resnet18"].test_model())
    with pytest.raises(rewriter.InputError, match="not the model's"):
        held_outside_activations(model, torch.optim.Adam(other.parameters()))
