"""The schedule's stages take the other strategies' candidates as options: chains
inverted and groups compressed inside a stage, beside stages recomputed and spans
checkpointed around others, weighed in the one dynamic programme."""

import dataclasses

import pytest
import torch

import rewriter
from examples.zoo.plain import BNLeakyChain
from rewriter import pipeline
from rewriter.cost_models.simulate import simulate
from rewriter.measure import default_loss
from rewriter.pipeline import Lossy, _Planner
from rewriter.schedule import estimate, solve_schedule
from tests.test_optimize import assert_trains_like

STRATEGIES = ("recompute", "invert", "compress")


def _chain(depth: int = 12) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return BNLeakyChain(channels=4, depth=depth).train().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)


def _planner(model, x, lossy: Lossy = Lossy()) -> _Planner:
    planner = _Planner(model, (x,), default_loss, STRATEGIES, lossy)
    planner.profile_modes()
    return planner


def test_each_rewrite_is_a_stage_option_its_sums_the_simulated_peak():
    """Every chain inverted, every group compressed, both: options of every stage (not
    rerun inside spans), priced from the simulation of that option taken everywhere,
    so the schedule's sums are its composed peak to the byte."""
    planner = _planner(*_chain())
    groups, stages, _ = planner.stages()
    options = planner.stage_options(groups)
    assert [name for name, *_ in options] == ["keep", "selective", "full", "invert", "compress", "invert+compress"]
    assert [nestable for *_, nestable in options] == [True, False, True, False, False, False]
    assert len(options[3][1]) == len(planner.chains) and len(options[4][1]) == len(planner.groups)
    for index, (name, everywhere, per_stage, _) in enumerate(options):
        assert {k: v for modes in per_stage for k, v in modes.items()} == everywhere, name
        summed, peak = estimate(stages, (index,) * len(stages), ()), planner.composed_peak(everywhere)
        if planner.fallen_back(everywhere) == everywhere:
            assert summed == peak == simulate(planner.composed(everywhere)).peak_bytes, name
        else:  # each stage at the higher of its costs as inverted and fallen back: at or above both peaks
            fallen = simulate(planner.composed(planner.fallen_back(everywhere))).peak_bytes
            assert summed >= peak == max(fallen, simulate(planner.composed(everywhere)).peak_bytes), name
            assert summed <= 1.1 * peak, name  # (measured: 3.5% over here; within a tenth, the schedule stays useful)
        seconds = sum(planner.mode_seconds(everywhere).values())
        assert sum(s.seconds[index] for s in stages) == pytest.approx(seconds), name
    assert planner.schedule_covers()


def test_narrower_compress_widths_are_not_covered_by_the_stages():
    """With lossy widths allowed, a group has several options and the stages offer
    only its widest: the flat search must still weigh the narrower ones."""
    planner = _planner(*_chain(), Lossy(bits=4))
    assert any(len(planner.offered[g.key].options) > 1 for g in planner.groups)
    assert not planner.schedule_covers()


def test_schedules_mixing_spans_and_rewritten_stages_are_predicted_as_measured_and_train_like_eager():
    """Seconds here stand for bytes kept (a rewrite at a tenth of recomputing in full),
    so that every machine solves for the same schedules: spans around recomputed
    stages beside inverted and compressed ones. Each fits as predicted, composed as
    profiled, and trains like eager in float64."""
    model, x = _chain(depth=16)
    planner = _planner(model, x)
    groups, stages, joined = planner.stages()
    names = [name for name, *_ in planner.stage_options(groups)]

    def priced(stage):
        unit = 1e-9 * (stage.kept[0] + 1)
        seconds = {"keep": 0.0, "selective": 0.5 * unit, "full": unit}
        return dataclasses.replace(stage, seconds=tuple(seconds.get(n, 0.1 * unit) for n in names), rerun=unit)

    cheap = [priced(s) for s in stages]
    mixed = 0
    for fraction in (0.35, 0.45, 0.55, 0.7):
        found = solve_schedule(cheap, int(fraction * planner.eager_peak), lambda s, j: (s, j) in joined)
        if found is None:
            continue
        modes, spans, _ = planner.realised(groups, found)
        rewritten = {planner.offered[k].strategy for k in modes} - {"recompute"}
        mixed += bool(spans) and bool(rewritten)
        gm, plan = planner.plan(modes, None, planner.mode_seconds(modes), spans)
        measured = rewriter.measure_peak(gm, x)
        assert 0 <= plan.predicted_peak_bytes - measured <= 4, (fraction, found, plan.predicted_peak_bytes, measured)
        composed = planner.nested_peak(planner.composed(modes), spans)
        assert 0 <= plan.predicted_peak_bytes - composed <= 4, (fraction, found, plan.predicted_peak_bytes, composed)
        fresh = _chain(depth=16)[0]  # (`model` is the planner's: left as it was)
        assert_trains_like(_chain(depth=16)[0], fresh, rewriter.apply_plan(fresh, plan), x)
    assert mixed  # a schedule with spans beside rewritten stages was tried


def test_where_the_stages_cover_every_choice_the_flat_search_is_not_run(monkeypatch):
    """The default strategies on a chain: the schedule finds the plan, and the flat
    search over the same choices (hundreds of composed peaks on long chains) never runs."""
    model, x = _chain(depth=20)
    budget = rewriter.measure_peak(model, x) // 2

    def flat_search(*args, **kwargs):
        raise AssertionError("the flat search ran")

    monkeypatch.setattr(pipeline, "_solve_widest", flat_search)
    optimized = rewriter.optimize(model, budget, x)
    assert rewriter.measure_peak(optimized, x) <= budget
    assert_trains_like(_chain(depth=20)[0], model, optimized, x)
