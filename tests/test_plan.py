import pytest

import rewriter
from examples.zoo import ZOO
from rewriter.plan import NodePlan, Plan


@pytest.fixture(scope="module")
def plan() -> Plan:
    zoo = ZOO["resnet18"]
    return rewriter.explain(zoo.test_model(), zoo.test_input())


def test_plan_round_trips_through_json(plan):
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again["layer3_1_conv2"] == plan["layer3_1_conv2"]


def test_plan_is_keyed_by_node_name(plan):
    assert "layer3_1_conv2" in plan
    assert plan["layer3_1_conv2"].label == "layer3.1.conv2"
    assert len(plan) == len(list(plan))
    with pytest.raises(KeyError, match="no node 'nope'"):
        plan["nope"]


def test_plan_is_frozen(plan):
    with pytest.raises(AttributeError):
        plan.predicted_peak_bytes = 0


def test_table_lists_saved_nodes_largest_first(plan):
    text = str(plan)
    assert f"{plan.predicted_peak_bytes:,} bytes" in text
    rows = [line for line in text.splitlines() if line.startswith(("bn1 ", "conv1 ", "layer4.1.conv2 "))]
    assert [r.split()[0] for r in rows] == ["bn1", "conv1", "layer4.1.conv2"]
    assert "held by" in text and "share" in text


def test_saved_bytes_are_the_sum_of_nodes(plan):
    assert plan.saved_bytes == sum(n.saved_bytes for n in plan.nodes)
    assert 0 < plan.saved_bytes < plan.predicted_peak_bytes


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="strategy='swap'"):
        NodePlan("n", "n", "Conv2d", (1,), 0, (), 0, strategy="swap")


def test_phase_clock_counts_each_phase_net_of_the_phases_inside_it(monkeypatch):
    from rewriter import phases

    ticks = iter([0.0, 1.0, 3.0, 10.0])  # solve opens at 0, verify runs from 1 to 3, solve closes at 10
    monkeypatch.setattr(phases.time, "perf_counter", lambda: next(ticks))
    clock = phases.PhaseClock()
    with clock("solve"):
        with clock("verify"):
            pass
    assert clock.seconds == {"verify": 2.0, "solve": 8.0}
    assert clock.summary() == "verify 2.0 s, solve 8.0 s"
