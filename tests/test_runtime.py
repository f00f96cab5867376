"""Time estimates: each node's forward timed where it runs, scaled by the roofline, and
what the planner prices a recomputed segment at."""

import time

import pytest
import torch
from torch import fx, nn

from rewriter.cost_models.node_costs import BATCH
from rewriter.cost_models.runtime import ROOFLINES, Roofline, node_seconds
from rewriter.passes import recompute
from rewriter.measure import default_loss
from rewriter.pipeline import _Planner
from rewriter.trace import capture

SLEEP = 0.05  # seconds: far above what any other node here takes


def _slow_relu(x):
    """A ReLU that takes SLEEP seconds: no FLOP count can tell its time."""
    time.sleep(SLEEP)
    return torch.relu(x)


torch.fx.wrap("_slow_relu")


class SlowBlock(nn.Module):
    """Convolutions after ReLUs; the first ReLU is slow, the others are not."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))

    def forward(self, x):
        x = self.convs[0](_slow_relu(self.stem(x)))
        for conv in self.convs[1:]:
            x = conv(torch.relu(x))
        return x


class InPlaceInput(nn.Module):
    def forward(self, x):
        return torch.relu_(x) * 2


def test_roofline_scales_a_measured_time_by_the_bound_that_binds():
    roofline = Roofline(flops_per_second=1e11, bytes_per_second=2e10)
    # compute-bound (1e9 FLOPs: 10 ms; 1e6 bytes: 50 us): twice the FLOPs, twice the time
    assert roofline.scaled(0.5, 1e9, 1e6, times=2.0, move=1.0) == pytest.approx(1.0, rel=1e-12)
    # memory-bound (1e6 FLOPs: 10 us; 1e9 bytes: 50 ms): three passes over the bytes, three times
    assert roofline.scaled(0.2, 1e6, 1e9, times=0.0, move=3.0) == pytest.approx(0.6, rel=1e-12)
    # a compute-bound node's bytes moved three times: 150 us of a 10 ms node
    assert roofline.scaled(0.5, 1e9, 1e6, times=0.0, move=3.0) == pytest.approx(0.5 * 1.5e-4 / 1e-2, rel=1e-12)
    # nothing counted: the multiple itself
    assert roofline.scaled(0.25, 0.0, 0.0, times=4.0, move=1.0) == 1.0


def test_node_seconds_times_every_compute_node_where_it_runs():
    torch.manual_seed(0)
    gm = capture(SlowBlock().train()).gm
    seconds = node_seconds(gm, (torch.randn(2, 3, 8, 8),), repeats=2)
    compute = {n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")}
    assert set(seconds) == compute
    assert seconds["_slow_relu"] >= SLEEP
    assert all(0 < s < seconds["_slow_relu"] for name, s in seconds.items() if name != "_slow_relu")


def test_node_seconds_leaves_the_inputs_as_they_were():
    gm = fx.symbolic_trace(InPlaceInput())
    x = torch.randn(4, 4)
    before = x.clone()
    node_seconds(gm, (x,), repeats=1)
    assert torch.equal(x, before)


def test_a_segment_is_priced_at_its_measured_rerun_and_the_checkpoints_own_cost():
    torch.manual_seed(0)
    model, x = SlowBlock().train(), torch.randn(2, 3, 8, 8)
    planner = _Planner(model, (x,), default_loss, ("recompute",))
    planner.profile_modes()
    choices, options = planner.choices()
    by_key = {c.key: dict(zip(options[c.key], c.seconds[1:])) for c in choices}
    slow = next(s.output for s in planner.segments if "_slow_relu" in s.nodes)
    for mode in ("selective", "full"):  # both rerun the slow ReLU, and pay the checkpoint's overhead
        assert by_key[slow][mode] >= SLEEP + recompute.overhead_seconds(mode)
        assert all(seconds[mode] < by_key[slow][mode] for key, seconds in by_key.items() if key != slow)
    # the roofline alone prices the slow ReLU as any ReLU of its size: microseconds
    cost = planner.base.by_name["_slow_relu"]
    assert ROOFLINES["cpu"].seconds(float(cost.fwd_flops.subs(BATCH, 2)), sum(float(b.subs(BATCH, 2)) for b in cost.nbytes)) < 1e-4


def test_checkpoint_overhead_is_timed_once_per_mode_and_device():
    first = recompute.overhead_seconds("selective")
    assert first >= 0.0 and recompute.overhead_seconds("selective") == first
    with pytest.raises(ValueError, match="mode='partial'"):
        recompute.overhead_seconds("partial")
