"""Plan.plot: the step's live activation memory, eager against the plan, as a PNG."""

import sys

import pytest

import rewriter
from examples.zoo import ZOO

pytest.importorskip("matplotlib")


def _labels(figure) -> list[str]:
    axes = figure.axes[0]
    return [a.get_label() for a in axes.get_lines() + axes.collections]


def test_a_plan_plots_eager_the_plan_the_budget_and_the_peak(tmp_path):
    zoo = ZOO["unet"]
    model, x = zoo.test_model(), zoo.test_input()
    optimized = rewriter.optimize(model, int(0.5 * rewriter.measure_peak(model, x)), x, strategies="recompute")
    figure = optimized.plan.plot(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = _labels(figure)
    assert any(label.startswith("eager") for label in labels)
    assert any(label.startswith("this plan") for label in labels)
    assert any(label.startswith("budget") for label in labels)
    assert "step of a node: recompute" in labels
    peak = [t.get_text() for t in figure.axes[0].texts]
    assert peak == [f"peak: {optimized.plan.peak_at}"]
    plan_line = next(line for line in figure.axes[0].get_lines() if line.get_label().startswith("this plan"))
    assert max(plan_line.get_ydata()) * 2**20 == pytest.approx(optimized.plan.predicted_peak_bytes)


def test_an_explained_plan_plots_after_a_json_round_trip(tmp_path):
    zoo = ZOO["resnet18"]
    plan = rewriter.Plan.from_json(rewriter.explain(zoo.test_model(), zoo.test_input()).to_json())
    figure = plan.plot(tmp_path / "explained.png")
    assert (tmp_path / "explained.png").exists()
    assert not any(label.startswith("budget") for label in _labels(figure))


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    zoo = ZOO["resnet18"]
    plan = rewriter.explain(zoo.test_model(), zoo.test_input())
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(rewriter.InputError, match=r"rewriter\[plot\]"):
        plan.plot()
