"""After `.eval()` (or without gradients) an optimized module computes what the model
computes, whatever the model does with `self.training` (issue 21)."""

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from rewriter import trace
from rewriter.trace import capture
from tests.test_optimize import assert_trains_like


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.dropout(torch.relu(self.norm(self.conv(x))), p=0.5, training=self.training)
        if self.training:  # stochastic depth as torchvision writes it: a row mask, only in training
            keep = torch.bernoulli(torch.full_like(x[:, :1, :1, :1], 0.8)) / 0.8
            y = y * keep
        return x + y


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(8) for _ in range(4)])
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().train()


def test_the_graph_in_eval_mode_is_kept_where_it_differs():
    assert capture(_net()).eval_gm is not None
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.5), nn.BatchNorm2d(8))  # modules follow .eval() themselves
    assert capture(plain).eval_gm is None


def test_the_eval_mode_trace_notes_no_lifetimes(monkeypatch):
    """Only the training graph, which plans rewrite, needs how long eager Python holds
    each value: the eval-mode trace runs without the profile hook that notes it, and
    makes the graph a trace with it makes."""
    hooks, setprofile = [], sys.setprofile
    monkeypatch.setattr(trace.sys, "setprofile", lambda hook: hooks.append(hook) or setprofile(hook))
    captured = capture(_net())
    assert len(hooks) == 2  # the training trace's hook, set and put back
    model = _net()
    noted = trace._eval_graph(model, (), (), captured.gm.graph, None)
    with_hook = trace._ModuleTracer(frozenset())
    for module in model.modules():
        module.training = False
    expected = with_hook.trace(model)
    assert len(hooks) == 4 and noted.graph.python_code("self").src == expected.python_code("self").src


def test_an_optimized_module_drops_nothing_after_eval_and_trains_like_eager(tmp_path):
    model, x = _net(), torch.randn(2, 3, 32, 32)
    budget = int(0.6 * rewriter.measure_peak(model, x))
    optimized = rewriter.optimize(model, budget, x, strategies="recompute")
    assert (optimized.plan.segments or optimized.plan.spans) and rewriter.measure_peak(optimized, x) <= budget
    torch.manual_seed(1)
    assert_trains_like(_net(), model, optimized, x)  # the training graph, masks drawn alike (seeded in train_step)
    rewriter.save(optimized, tmp_path / "net")
    loaded = rewriter.load(tmp_path / "net")
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = reference(x)
        for module in (optimized, loaded):
            module.eval()
            torch.testing.assert_close(module(x), expected, rtol=0, atol=0)  # before: dropped at random
            torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    optimized.train()
    assert optimized.training and all(m.training for m in model.modules() if m is not model)


def test_a_lazy_module_answers_inference_without_planning():
    # issue 21: its first call in eval mode under no_grad planned, and the loss had no gradient
    model, x = _net(), torch.randn(2, 3, 32, 32)
    lazy = rewriter.optimize(model, "1MiB").eval()
    with torch.no_grad():
        torch.testing.assert_close(lazy(x), copy.deepcopy(model).eval()(x), rtol=0, atol=0)
    assert lazy.plan is None
