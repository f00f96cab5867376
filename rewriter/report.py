"""explain and largest_batch: the cost model's answers for a model and its inputs."""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from rewriter.cost_models.node_costs import BATCH, Costs
from rewriter.cost_models.profile import ProfileError, UnreplayableOp, profile_graph
from rewriter.cost_models.repeated_nodes import Records
from rewriter.cost_models.saved import saved_tensors
from rewriter.cost_models.peak_holders import peak_holders
from rewriter.cost_models.simulate import Simulation, simulate
from rewriter.device_memory import held_outside_activations
from rewriter.errors import InputError
from rewriter.measure import as_input_tuple, check_trainable, default_loss, preserved_model_state
from rewriter.plan import NodePlan, Plan
from rewriter.trace import Captured, capture

__all__ = ["explain", "largest_batch", "largest_input", "largest_fitting", "cost_model", "keep_all_plan", "profile_model_graph", "captured_and_profiled", "step_timeline",
           "absent_inputs"]

log = logging.getLogger(__name__)


def cost_model(
    model: nn.Module, example_inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None,
    over_batch: bool = False,
) -> Costs:
    """Capture `model` and profile every node on fake tensors: the per-node costs of one
    training step at the example batch, or (`over_batch`, two traces) with byte counts
    as sympy expressions of the batch size."""
    check_trainable(model)
    return captured_and_profiled(model, as_input_tuple(example_inputs, model), loss_fn or default_loss, over_batch)[1]


def absent_inputs(model: nn.Module, inputs: tuple) -> tuple[str, ...]:
    """The parameters of `model.forward` that `inputs` (every parameter, in order) give as None."""
    names = list(inspect.signature(model.forward).parameters)
    return tuple(name for name, value in zip(names, inputs) if value is None)


def captured_and_profiled(model: nn.Module, inputs: tuple, loss_fn: Callable, over_batch: bool = False,
                          clock: Callable | None = None, records: Records | None = None) -> tuple[Captured, Costs]:
    """`model` captured and its graph profiled; a module that calls an op fake tensors
    cannot run (`UnreplayableOp`) is captured again as an opaque leaf (run for real),
    with a warning naming it. `clock`: a PhaseClock to time the captures on; `records`:
    node records shared with other profiles (cost_models.repeated_nodes.Records)."""
    opaque: tuple[str, ...] = ()
    absent = absent_inputs(model, inputs)
    while True:
        with clock("capture") if clock else contextlib.nullcontext():
            captured = capture(model, opaque, absent, inputs)
        try:
            return captured, profile_model_graph(model, captured.gm, inputs, loss_fn, captured.opaque,
                                                 captured.held_until, over_batch, records=records)
        except InputError as error:
            cause = error.__cause__
            if not isinstance(cause, UnreplayableOp) or cause.module is None or cause.module in captured.opaque:
                raise
            log.warning("%s; module %r is kept as an opaque leaf: its saved tensors are counted, but no strategy "
                        "rewrites inside it", cause, cause.module)
            opaque = (*captured.opaque, cause.module)


def profile_model_graph(model: nn.Module, gm, inputs: tuple, loss_fn: Callable, opaque: tuple[str, ...], held_until: dict,
                        over_batch: bool = False, flops: bool = True, records: Records | None = None) -> Costs:
    """Profile `gm` (a graph of `model`), leaving `model` as it was (opaque leaves run for
    real and draw random inputs); inputs that do not fit are an InputError. `records`:
    as `profile_graph`'s."""
    try:
        with preserved_model_state(model):
            return profile_graph(gm, inputs, loss_fn, opaque, held_until, over_batch, flops, records=records)
    except ProfileError as error:
        raise InputError(str(error)) from error


def keep_all_plan(costs: Costs, simulation: Simulation) -> Plan:
    """The plan that keeps every saved tensor, with the simulator's peak."""
    saved_by: dict[str, tuple[int, list[str]]] = {}
    for tensor in saved_tensors(costs, simulation.batch):
        total, holders = saved_by.get(tensor.owner, (0, []))
        saved_by[tensor.owner] = (total + tensor.nbytes, holders + [h for h in tensor.held_by if h not in holders])
    batch = simulation.batch

    def at_batch(shape: tuple[int, ...]) -> tuple[int, ...]:
        return (batch, *shape[1:]) if shape and shape[0] == costs.example_batch else shape

    nodes = tuple(
        NodePlan(
            node=c.name, label=c.label, op=c.op,
            shape=at_batch(c.shapes[0]) if c.shapes else (),
            saved_bytes=saved_by.get(c.name, (0, []))[0],
            held_by=tuple(saved_by.get(c.name, (0, []))[1]),
            forward_flops=int(c.fwd_flops.xreplace({BATCH: batch})),
        )
        for c in costs.nodes
    )
    shapes = tuple(at_batch(s) for s in costs.input_shapes)
    return Plan(
        nodes=nodes, predicted_peak_bytes=simulation.peak_bytes, baseline_peak_bytes=simulation.peak_bytes,
        peak_at=simulation.peak_at, batch=batch, input_shapes=shapes, opaque=costs.opaque,
        peak_held_by=tuple((h.kind, h.node, h.nbytes) for h in peak_holders(costs, batch)),
        timeline=step_timeline(simulation), baseline_timeline=step_timeline(simulation),
    )


def step_timeline(simulation: Simulation) -> tuple[tuple[str, int], ...]:
    """Each step's label and its highest live bytes."""
    return tuple((where, high) for (where, _), high in zip(simulation.timeline, simulation.highs))


def explain(
    model: nn.Module, example_inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None
) -> Plan:
    """The all-keep plan of `model` on `example_inputs`: every node's saved bytes, who
    holds them, and the predicted peak of one training step, before any real step.

    `example_inputs` is a tensor or a tuple of positional inputs; dim 0 of each is the
    batch. `loss_fn(output)` defaults to the sum of the floating outputs. Nothing real
    is allocated except by opaque leaves, and the model is left unchanged.
    """
    costs = cost_model(model, example_inputs, loss_fn)
    return keep_all_plan(costs, simulate(costs))


def largest_batch(
    model: nn.Module,
    example_inputs: Any,
    budget_bytes: int,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    limit: int = 2**20,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """The largest batch whose predicted training-step peak fits `budget_bytes`, from two
    traces (at the example batch and one more: byte counts as expressions of the
    batch; three from an example batch of 1). 0 if even a batch of 1 does not fit.
    With `optimizer`, the budget is of device memory: parameters, gradients and the
    optimizer's state are taken off it first (`device_memory.held_outside_activations`)."""
    budget_bytes = _activation_budget(model, budget_bytes, optimizer)
    if budget_bytes <= 0:
        return 0
    costs = cost_model(model, example_inputs, loss_fn, over_batch=True)
    return largest_fitting(lambda batch: simulate(costs, batch).peak_bytes <= budget_bytes, limit)


def largest_fitting(fits: Callable[[int], bool], limit: int, known: int = 0) -> int:
    """The largest n in 1..`limit` with `fits(n)`, where `fits` holds up to some n and
    not past it; 0 if it holds for none. `known`: an n known to fit, where the search
    starts (doubling, then bisecting)."""
    if known <= 0:
        if limit < 1 or not fits(1):
            return 0
        known = 1
    low, high = known, 2 * known
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low), not fits(high) (or past the limit)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _activation_budget(model: nn.Module, budget_bytes: int, optimizer: torch.optim.Optimizer | None) -> int:
    """`budget_bytes` (checked positive), less what parameters, gradients and the
    optimizer's state hold where `optimizer` makes it a budget of device memory."""
    if not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise InputError(f"budget_bytes={budget_bytes!r} must be a positive number of bytes")
    if optimizer is None:
        return budget_bytes
    return budget_bytes - sum(b for _, b in held_outside_activations(model, optimizer))


def largest_input(
    model: nn.Module,
    example_inputs: Any,
    budget_bytes: int,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    multiple: int = 16,
    limit: int = 4096,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """The largest edge s, a multiple of `multiple` up to `limit`, such that a training
    step on the example inputs with every spatial size (each dimension after the
    channels) set to s is predicted within `budget_bytes`: the largest square image,
    or cubic patch of a volume, that fits. Each size tried is one trace (a capture and
    a profile on fake tensors). 0 if even `multiple` does not fit. Pick `multiple` so
    that the network's downsampling divides it (a U-Net of four poolings: 16). With
    `optimizer`, the budget is of device memory (as in `largest_batch`)."""
    if not isinstance(multiple, int) or multiple <= 0:
        raise InputError(f"multiple={multiple!r} must be a positive int (a size the network's strides divide)")
    inputs = as_input_tuple(example_inputs, model)
    if not any(isinstance(t, torch.Tensor) and t.dim() > 2 for t in inputs):
        raise InputError("largest_input needs an input with spatial dimensions (batch, channels, then sizes)")
    budget_bytes = _activation_budget(model, budget_bytes, optimizer)
    if budget_bytes <= 0:
        return 0

    def fits(edge: int) -> bool:
        sized = tuple(t.new_zeros((*t.shape[:2], *([edge] * (t.dim() - 2)))).normal_()
                      if isinstance(t, torch.Tensor) and t.dim() > 2 else t for t in inputs)
        return simulate(cost_model(model, sized, loss_fn)).peak_bytes <= budget_bytes

    return multiple * largest_fitting(lambda count: fits(count * multiple), limit // multiple)
