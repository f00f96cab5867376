"""The schedule solver: least seconds over nested checkpoints, against every schedule."""

import dataclasses
import itertools
import random

import pytest
import torch

import rewriter
from examples.zoo import ZOO
from examples.zoo.plain import BNLeakyChain
from rewriter import pipeline
from rewriter.cost_models.simulate import simulate
from rewriter.cost_models.stage_costs import steps as stage_steps
from rewriter.measure import default_loss
from rewriter.passes.recompute import segments, span, spannable
from rewriter.pipeline import DEPTH, STAGES, _Planner
from rewriter.schedule import Stage, estimate, solve_schedule
from rewriter.trace import capture
from tests.test_optimize import assert_trains_like

CELLS = 256
UNIT = 1000


def random_stages(rng: random.Random, count: int) -> list[Stage]:
    """Stages with options keep, selective (not nestable) and full, as a network's:
    the more an option recomputes, the less it keeps and the longer it takes."""
    stages = []
    for _ in range(count):
        keep = rng.randint(8, 40)
        selective = rng.randint(2, keep)
        output = rng.randint(1, selective)
        work = rng.randint(1, 20)
        stages.append(Stage(
            seconds=(0.0, 0.3 * work + rng.random(), float(work) + rng.random()),
            kept=(keep * UNIT, selective * UNIT, output * UNIT),
            forward=(keep * UNIT, (selective + 2) * UNIT, (output + 4) * UNIT),
            backward=((keep + rng.randint(1, 10)) * UNIT, (keep + rng.randint(1, 10)) * UNIT,
                      (keep + rng.randint(1, 12)) * UNIT),
            nestable=(True, False, True),
            output=output * UNIT,
            rerun=float(work),
        ))
    return stages


def schedules(count: int):
    """Every schedule the solver can express: options per stage, and every family of
    spans nested or disjoint, each ending before what encloses it ends."""
    pairs = [(s, j) for s in range(count) for j in range(s + 1, count)]
    for size in range(0, 4):
        for spans in itertools.combinations(pairs, size):
            if all(_nested_or_apart(a, b) for a, b in itertools.combinations(spans, 2)) and _ends_inside(spans, count):
                yield spans


def _nested_or_apart(a, b) -> bool:
    inside = a[0] >= b[0] and a[1] <= b[1] or b[0] >= a[0] and b[1] <= a[1]
    return inside or a[1] < b[0] or b[1] < a[0]


def _ends_inside(spans, count: int) -> bool:
    for pair in spans:
        enclosing = [o for o in spans if o != pair and o[0] <= pair[0] and pair[1] <= o[1]]
        end = min((o[1] for o in enclosing), default=count - 1)
        if pair[1] >= end:
            return False
    return True


def seconds_of(stages, options, spans, span_seconds) -> float:
    return (sum(stage.seconds[k] for stage, k in zip(stages, options))
            + sum(sum(stages[i].rerun for i in range(s, j + 1)) + span_seconds for s, j in spans))


def scaled(stages: list[Stage], by: int) -> list[Stage]:
    return [Stage(s.seconds, *(tuple(b * by for b in getattr(s, f)) for f in ("kept", "forward", "backward")),
                  s.nestable, s.output * by, s.rerun) for s in stages]


@pytest.mark.parametrize("seed", range(4))
def test_the_schedule_is_the_cheapest_of_all_that_fit(seed):
    limit = CELLS * UNIT  # a cell is UNIT bytes: the sums are exact
    family = list(schedules(5))
    for by in (2, 3, 5, 8):  # from a step that nearly fits to one that fits nested only, or not at all
        stages = scaled(random_stages(random.Random(seed), 5), by)
        best = None
        for spans in family:
            inside = {i for s, j in spans for i in range(s, j + 1)}
            choices = [(0, 2) if i in inside else (0, 1, 2) for i in range(len(stages))]
            for options in itertools.product(*choices):
                if estimate(stages, options, spans) <= limit:
                    seconds = seconds_of(stages, options, spans, 0.5)
                    best = seconds if best is None else min(best, seconds)
        found = solve_schedule(stages, limit, lambda s, j: True, span_seconds=0.5, cells=CELLS)
        if best is None:
            assert found is None
            continue
        assert found is not None
        assert estimate(stages, found.options, found.spans) <= limit
        assert found.seconds == pytest.approx(seconds_of(stages, found.options, found.spans, 0.5))
        assert found.seconds == pytest.approx(best)


def test_spans_go_only_where_allowed_and_a_tight_limit_uses_them():
    stages = random_stages(random.Random(7), 6)
    everything = sum(s.kept[0] for s in stages)
    free = solve_schedule(stages, 10 * everything, lambda s, j: True)
    assert free.options == (0,) * 6 and free.spans == () and free.seconds == 0.0
    flat = solve_schedule(stages, everything // 3, lambda s, j: False)
    nested = solve_schedule(stages, everything // 3, lambda s, j: True)
    assert nested is not None and nested.spans
    assert flat is None or flat.seconds >= nested.seconds
    only = solve_schedule(stages, everything // 3, lambda s, j: (s, j) == (1, 3))
    assert only is None or set(only.spans) <= {(1, 3)}


@pytest.mark.parametrize("name", ["resnet50", "unet", "densenet_bc"])
def test_stage_sums_give_the_simulated_peak_where_every_stage_takes_one_option(name):
    """The stages are read off simulations of each option taken everywhere: for those
    plans the solver's sums are the composed peak, to the byte."""
    zoo = ZOO[name]
    planner = _Planner(zoo.test_model(), (zoo.test_input(),), default_loss, ("recompute",))
    planner.profile_modes()
    groups, stages, _ = planner.stages()
    assert len(groups) == len(stages) <= STAGES and sorted(i for g in groups for i in g) == list(range(len(planner.segments)))
    for option, mode in enumerate(("keep", "selective", "full")):
        modes = {} if mode == "keep" else planner.extreme(mode)
        assert estimate(stages, (option,) * len(stages), ()) == simulate(planner.composed(modes)).peak_bytes


def test_other_strategies_options_are_simulated_once_for_every_way_of_cutting_segments(monkeypatch):
    """Inverting every chain, compressing every group: the same step whichever way the
    segments are cut. The stages read at a second granularity simulate only recompute's
    options again, and are the stages a planner that starts there reads."""
    torch.manual_seed(0)
    model, x = BNLeakyChain(channels=8, depth=30).train(), torch.randn(2, 3, 16, 16)
    strategies = ("recompute", "invert", "compress")
    simulated = []
    monkeypatch.setattr(pipeline, "steps", lambda costs: simulated.append(costs) or stage_steps(costs))
    planner = _Planner(model, (x,), default_loss, strategies)
    planner.profile_modes()
    planner.stages()
    options = [name for name, *_ in planner.stage_options(planner._stage_groups(STAGES))]
    assert {"invert", "compress"} <= set(options)
    assert planner.use("module")
    planner.profile_modes()
    simulated.clear()
    _, again, _ = planner.stages()
    assert len(simulated) == 2  # every segment selective, every segment full
    fresh = _Planner(model, (x,), default_loss, strategies)
    assert fresh.use("module")
    fresh.profile_modes()
    _, stages, _ = fresh.stages()

    def sizes(found):  # (the seconds come from each planner's own timing)
        return [(s.kept, s.forward, s.backward, s.nestable, s.output) for s in found]

    assert sizes(stages) == sizes(again)


def test_a_plans_peak_is_composed_and_simulated_once(monkeypatch):
    """`peak_of` keeps each plan's composed peak: spans given in another order, the
    same assignment again, or the same units under another way of cutting segments
    are not simulated anew, and the peak is `nested_peak`'s."""
    zoo = ZOO["densenet_bc"]
    planner = _Planner(zoo.test_model(), (zoo.test_input(),), default_loss, ("recompute",))
    planner.profile_modes()
    modes = planner.extreme("full")
    spans = [s for s in (planner.span(0, 1), planner.span(3, 4)) if s is not None]
    assert len(spans) == 2
    expected = planner.nested_peak(planner.composed(modes), spans)
    simulated = []
    nested_peak = _Planner.nested_peak
    monkeypatch.setattr(_Planner, "nested_peak", lambda self, flat, found: simulated.append(found) or nested_peak(self, flat, found))
    assert planner.peak_of(modes, spans) == planner.peak_of(dict(reversed(modes.items())), spans[::-1]) == expected
    assert planner.composed_peak(modes, spans) == expected and len(simulated) == 1
    planner.peak_of(modes, spans[:1])  # another plan
    assert len(simulated) == 2


@pytest.mark.parametrize("name", ["resnet50", "unet", "densenet_bc"])
def test_spannable_pairs_are_the_spans_that_exist(name):
    zoo = ZOO[name]
    gm = capture(zoo.test_model()).gm
    found = segments(gm)
    indexes = list(range(len(found)))
    pairs = spannable(gm, found, indexes, indexes)
    expected = {(s, j) for s in indexes for j in indexes if s < j
                and span(gm, found, found[s].output, found[j].output) is not None}
    assert pairs == expected and pairs


def test_the_lowest_plan_of_a_long_chain_nests_at_most_depth_deep_and_trains_like_eager():
    """Below every budget, the smallest-budget search nests spans; deeper than `DEPTH`
    (a rerun per level, and Python's stack: a 1,000-node chain's went 108 deep) it does not."""
    torch.manual_seed(0)
    model, x = BNLeakyChain(channels=4, depth=30).train(), torch.randn(2, 3, 8, 8)
    with pytest.raises(rewriter.BudgetError) as caught:
        rewriter.optimize(model, 1, x, strategies="recompute")
    plan = caught.value.plan
    order = {n.node: i for i, n in enumerate(plan.nodes)}
    ranges = [(order[first], order[last]) for first, last in plan.spans]
    assert ranges
    assert max(sum(1 for a, b in ranges if a <= order[n] <= b) for n in order) <= DEPTH
    optimized = rewriter.apply_plan(model, plan)
    measured = rewriter.measure_peak(optimized, x)
    assert measured <= caught.value.minimum_bytes < rewriter.measure_peak(model, x) // 4
    torch.manual_seed(0)
    assert_trains_like(BNLeakyChain(channels=4, depth=30).train(), model, optimized, x)


def _attention_unet():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    return nets.AttentionUnet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2)).train(), torch.randn(2, 1, 64, 64)


MIXED = {
    "unet": lambda: (ZOO["unet"].test_model(), ZOO["unet"].test_input()),
    "vgg": lambda: (ZOO["vgg"].test_model(), ZOO["vgg"].test_input()),
    "attention_unet": _attention_unet,
}


@pytest.mark.parametrize("name", sorted(MIXED))
def test_mixed_schedules_are_predicted_as_measured(name):
    """Selective segments beside spans, kept segments inside them: schedules the solver
    takes where selective recompute is cheap, predicted as measured, composed as
    profiled. Seconds here stand for the bytes each stage keeps (selective at 5% of
    full), not for timings, so that every machine solves for the same schedules."""
    model, x = MIXED[name]()
    planner = _Planner(model, (x,), default_loss, ("recompute",))
    assert planner.use("fine" if name != "vgg" else "coarse")
    planner.profile_modes()
    groups, stages, joined = planner.stages()
    cheap = [dataclasses.replace(s, seconds=(0.0, 0.05e-9 * (s.kept[0] + 1), 1e-9 * (s.kept[0] + 1)), rerun=1e-9 * (s.kept[0] + 1))
             for s in stages]
    shapes = set()
    for fraction in (0.4, 0.45, 0.5, 0.6):
        found = solve_schedule(cheap, int(fraction * planner.eager_peak), lambda s, j: (s, j) in joined)
        if found is None:
            continue
        modes, spans, _ = planner.realised(groups, found)
        inside = {n for span in spans for n in span.nodes}
        shapes.add((bool(spans) and "selective" in modes.values(),
                    any(s.nodes[0] in inside and s.output not in modes for s in planner.segments)))
        gm, plan = planner.plan(modes, None, planner.mode_seconds(modes), spans)
        measured = rewriter.measure_peak(gm, x)
        assert 0 <= plan.predicted_peak_bytes - measured <= 4, (fraction, found, plan.predicted_peak_bytes, measured)
        composed = planner.nested_peak(planner.composed(modes), spans)
        assert 0 <= plan.predicted_peak_bytes - composed <= 4, (fraction, found, plan.predicted_peak_bytes, composed)
    assert (True, True) in shapes or {(True, False), (False, True)} <= shapes  # both mixtures were tried


def test_a_checkpoint_lets_go_of_its_inputs_as_its_last_saved_tensor_goes():
    """A span over AttentionUnet's attention gate and merge, with one nested over the
    gate (a schedule CI's timings chose): the outer checkpoint's frame holds the gate's
    other input (W_g's output) until W_x's convolution, the first op that saved a tensor
    for the rerun, ends its backward; it is freed there, before the two gradients of the
    skip connection are summed, not when the span's backward ends (61,032 bytes over
    measured when the cost model held it to the end)."""
    model, x = _attention_unet()
    planner = _Planner(model, (x,), default_loss, ("recompute",))
    assert planner.use("fine")
    planner.profile_modes()
    first = {s.nodes[0]: i for i, s in enumerate(planner.segments)}
    last = {s.nodes[-1]: i for i, s in enumerate(planner.segments)}
    gate = "model_1_attention_w_x_0_conv"
    spans = [planner.span(first[gate], last[end]) for end in ("model_1_merge_conv", "model_1_attention_psi_0_conv")]
    gm, plan = planner.plan({}, None, {}, spans)
    assert plan.peak_at.startswith("backward rewriter_span_")  # inside a span's backward
    assert plan.predicted_peak_bytes == rewriter.measure_peak(gm, x)
    assert planner.nested_peak(planner.composed({}), spans) == plan.predicted_peak_bytes
