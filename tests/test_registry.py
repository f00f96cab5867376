"""The strategy contract: candidates of every strategy in one shape, one rule where they meet."""

import dataclasses

import pytest

import rewriter
from examples.zoo import ZOO
from rewriter.passes.recompute import GRANULARITIES, RecomputeSegment, segments
from rewriter.passes.registry import REGISTRY, Candidate, Decision, compatible
from rewriter.plan import Plan
from rewriter.trace import capture
from tests.test_optimize import assert_trains_like


def _candidate(strategy: str, key: str, nodes: tuple[str, ...]) -> Candidate:
    return Candidate(strategy, key, nodes, nodes[-1], ("on",), (1.0,), (8,))


def test_the_earlier_strategy_keeps_a_shared_node():
    offered = {c.key: c for c in (
        _candidate("compress", "compress:a", ("a", "b")),
        _candidate("invert", "invert:c", ("b", "c")),
        _candidate("recompute", "c", ("c", "d")),
        _candidate("compress", "compress:e", ("e",)),
    )}
    chosen = {"compress:a": "on", "invert:c": "on", "c": "on", "compress:e": "on"}
    # recompute covers c: the invert chain over b, c goes, so the group over a, b stays
    assert compatible(offered, chosen) == {"compress:a": "on", "c": "on", "compress:e": "on"}
    assert compatible(offered, {"compress:a": "on", "invert:c": "on"}) == {"invert:c": "on"}


def test_a_candidate_names_a_registered_strategy_and_prices_each_option():
    assert REGISTRY == ("accumulate", "recompute", "row_split", "invert", "compress")
    with pytest.raises(ValueError, match="strategy='tile'"):
        Candidate("tile", "k", ("a",), "a", ("on",), (1.0,), (8,))
    with pytest.raises(ValueError, match="one price per option"):
        Candidate("recompute", "k", ("a",), "a", ("selective", "full"), (1.0,), (8, 8))
    choice = _candidate("recompute", "k", ("a", "b")).choice()
    assert (choice.seconds, choice.saved_bytes, choice.members) == ((0.0, 1.0), (0, 8), frozenset({"a", "b"}))


def test_apply_plan_carries_out_decisions_over_the_nodes_they_name():
    zoo = ZOO["highres_fcn"]
    model, x = zoo.test_model(), zoo.test_input()
    gm = capture(model).gm
    found = segments(gm)
    merged = found[1].nodes + found[2].nodes  # two layers as one segment: no granularity cuts this run
    assert merged not in {s.nodes for granularity in GRANULARITIES for s in segments(gm, (), granularity)}
    plan = dataclasses.replace(rewriter.optimize(model, 10**12, x).plan, decisions=(Decision("recompute", "full", merged),))
    optimized = rewriter.apply_plan(model, Plan.from_json(plan.to_json()))
    [segment] = [m for m in optimized.modules() if isinstance(m, RecomputeSegment)]
    code = [n.name for n in segment.checkpointed_code.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    assert tuple(code) == merged
    assert_trains_like(zoo.test_model(), model, optimized, x)
