"""Nested checkpoints: spans of segments checkpointed around the segments' own
checkpoints, chosen where flat segments cannot reach the budget."""

import dataclasses

import pytest
from torch import nn

import rewriter
from examples.zoo import ZOO
from rewriter.passes.recompute import SPAN, segments
from rewriter.measure import default_loss
from rewriter.passes.registry import Decision
from rewriter.pipeline import _Planner
from rewriter.trace import capture
from tests.test_optimize import assert_trains_like

# budgets recompute alone must reach, as a fraction of eager's measured peak (the FCN's
# flat segments stop at 0.709: one checkpoint a layer keeps a map a layer; ResNet-50
# stopped at 0.353 while its stem's BatchNorm, ReLU and pooling joined the first block)
REACHED = {"highres_fcn": 0.6, "vgg": 0.7, "unet": 0.55, "resnet50": 0.25}
NESTED = {"highres_fcn", "resnet50"}  # those that need spans to get there (the others may use them where cheaper)


@pytest.mark.parametrize("name", sorted(REACHED))
def test_recompute_alone_reaches_low_budgets(name):
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    budget = int(REACHED[name] * rewriter.measure_peak(model, x))
    optimized = rewriter.optimize(model, budget, x, strategies="recompute")
    assert optimized.plan.spans or name not in NESTED
    measured = rewriter.measure_peak(optimized, x)
    assert measured <= budget
    assert 0 <= optimized.plan.predicted_peak_bytes - measured <= 4  # the checkpoint's own scalar
    assert_trains_like(zoo.test_model(), model, optimized, x)


def test_a_resnet_stem_closes_its_own_segment_where_both_branches_read_its_pooling():
    gm = capture(ZOO["resnet50"].test_model()).gm
    found = [s.nodes for s in segments(gm)]
    assert found[:2] == [("conv1",), ("bn1", "relu", "maxpool")]
    assert found[2][0] == "layer1_0_downsample_0" and found[2][-1] == "layer1_0_relu_2"  # the first block alone


def fcn_with_one_span():
    """The zoo FCN with every segment recomputed and one span around the second and third."""
    zoo = ZOO["highres_fcn"]
    model, x = zoo.test_model(), zoo.test_input()
    found = segments(capture(model).gm)
    plan = dataclasses.replace(rewriter.optimize(model, 10**12, x).plan, decisions=(
        *(Decision("recompute", "full", s.nodes) for s in found),
        Decision("recompute", SPAN, found[1].nodes + found[2].nodes),
    ))
    return zoo, model, x, plan, [s.output for s in found]


def test_a_nested_plan_reruns_each_layer_as_deep_as_it_is_nested():
    zoo, model, x, plan, outputs = fcn_with_one_span()
    optimized = rewriter.apply_plan(model, plan)
    norms = [m for m in model.body if isinstance(m, nn.BatchNorm2d)]
    calls = {id(m): 0 for m in norms}
    for m in norms:
        m.register_forward_pre_hook(lambda module, args: calls.__setitem__(id(module), calls[id(module)] + 1))
    reference = zoo.test_model()
    assert_trains_like(reference, model, optimized, x)
    # body.1 is in the span's first segment: forward, the span's rerun (up to the last
    # segment whose output it saves: the first), its segment's rerun; every other
    # BatchNorm: forward and its segment's rerun
    assert [calls[id(m)] for m in norms] == [3, 2, 2, 2]
    assert all(int(m.num_batches_tracked) == 1 for m in norms)  # running statistics updated once


def test_a_nested_plan_round_trips_and_saves(tmp_path):
    zoo, model, x, plan, outputs = fcn_with_one_span()
    assert rewriter.Plan.from_json(plan.to_json()) == plan
    optimized = rewriter.apply_plan(model, rewriter.Plan.from_json(plan.to_json()))
    rewriter.save(optimized, tmp_path / "fcn")
    loaded = rewriter.load(tmp_path / "fcn")
    assert loaded.plan == plan
    assert rewriter.measure_peak(loaded, x) == rewriter.measure_peak(optimized, x)
    assert_trains_like(zoo.test_model(), loaded, loaded, x)


def test_a_span_that_does_not_enclose_its_segments_is_refused():
    zoo, model, x, plan, outputs = fcn_with_one_span()
    found = segments(capture(model).gm)
    skipping = Decision("recompute", SPAN, found[0].nodes + found[2].nodes)  # the second segment left out
    with pytest.raises(rewriter.InputError, match="span over .* not one run of the graph; was the plan made"):
        rewriter.apply_plan(model, dataclasses.replace(plan, decisions=plan.decisions[:-1] + (skipping,)))
    elsewhere = Decision("recompute", SPAN, ("conv_9", "relu_9"))
    with pytest.raises(rewriter.InputError, match=r"nodes \['conv_9', 'relu_9'\] are not in this graph"):
        rewriter.apply_plan(model, dataclasses.replace(plan, decisions=plan.decisions[:-1] + (elsewhere,)))


# below what one checkpoint per segment reaches (vgg 0.5, unet 0.45): spans needed
@pytest.mark.parametrize("name, fraction", [("vgg", 0.5), ("unet", 0.45), ("revnet", 0.35)])
def test_nested_checkpoints_fit_below_flat_segments_and_train_alike(name, fraction):
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    budget = int(fraction * rewriter.measure_peak(model, x))
    optimized = rewriter.optimize(model, budget, x, strategies="recompute")
    assert optimized.plan.spans
    assert rewriter.measure_peak(optimized, x) <= budget
    assert_trains_like(zoo.test_model(), model, optimized, x)


def test_spans_around_kept_segments_composed_as_the_profiled_rewrite():
    """A span over two kept segments: its record replaces their nodes, and the nodes
    after it hold its output though their saved tensors name its in-place activation's
    first owner (the BatchNorm before it)."""
    zoo = ZOO["unet"]
    model, x = zoo.test_model(), zoo.test_input()
    planner = _Planner(model, (x,), default_loss, ("recompute",))
    assert planner.use("fine")
    planner.profile_modes()
    checked = 0
    for first in range(len(planner.segments) - 1):
        span = planner.span(first, first + 1)
        if span is None:
            continue
        composed = planner.nested_peak(planner.composed({}), [span])
        _, plan = planner.plan({}, None, {}, [span])
        assert 0 <= plan.predicted_peak_bytes - composed <= 4, (span.nodes, plan.predicted_peak_bytes, composed)
        checked += 1
    assert checked >= 10
