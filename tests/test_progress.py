"""What a user sees while `optimize` plans: nothing by default, each phase with its
seconds when asked (`verbose=True`), and Ctrl-C leaving the model as it was."""

import subprocess
import sys
from pathlib import Path

import pytest

import rewriter
from examples.zoo import ZOO

ROOT = Path(__file__).resolve().parents[1]
PLAN = """
import rewriter
from examples.zoo import ZOO
zoo = ZOO["resnet18"]
model, x = zoo.test_model(), zoo.test_input()
rewriter.optimize(model, int(0.5 * rewriter.measure_peak(model, x)), x, strategies="recompute"{verbose})
"""


def planned(verbose: str) -> str:
    done = subprocess.run([sys.executable, "-c", PLAN.format(verbose=verbose)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_planning_is_silent_by_default_and_says_each_phase_when_verbose():
    assert planned("") == ""
    said = planned(", verbose=True")
    for phase in ("capture", "profile (the graph as captured)", "time nodes", "price", "solve", "verify"):
        assert f"{phase}" in said and " s\n" in said, phase
    assert "planning took" in said


@pytest.mark.parametrize("where", [
    "rewriter.cost_models.profile._Profiler.backward_node",  # profiling, on fake tensors
    "rewriter.cost_models.runtime._NodeTimer.run_node",  # timing nodes, for real
    "rewriter.schedule.solve_schedule",  # solving
    "rewriter.pipeline._Planner._profile",  # verifying a plan
])
def test_an_interrupt_leaves_the_model_as_it_was(where, monkeypatch, unchanged):
    snapshot, assert_unchanged = unchanged
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    budget = int(0.5 * rewriter.measure_peak(model, x))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupted)
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        rewriter.optimize(model, budget, x, strategies="recompute")
    assert_unchanged(model, before)
