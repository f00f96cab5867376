"""Compress is priced at what its members add when timed alone, forward and backward
(passes.compress_timing), not at a roofline of their bytes."""

import pytest
import torch
from torch import nn

from rewriter.cost_models.runtime import node_seconds
from rewriter.measure import default_loss
from rewriter.passes import compress, compress_timing, compressed_ops
from rewriter.pipeline import Lossy, _Planner


class Sizes(nn.Module):
    """ReLUs on three sizes of input (one kind), a LeakyReLU and a max-pool (two more),
    each output read by a sum that saves nothing: each alone holds what it saves."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = torch.relu(self.a(x)) + 1
        x = torch.relu(self.b(x)) + 1
        x = nn.functional.leaky_relu(self.pool(x), 0.2) + 1
        return self.out(torch.relu(self.c(x)) + 1)


def _timings(model: nn.Module, x: torch.Tensor) -> tuple[compress_timing.FormTimings, dict[str, torch.Size]]:
    """The timings of every compress member, and each member's input shape."""
    planner = _Planner(model, (x,), default_loss, ("compress",))
    forms = next(iter(planner.forms.values()))
    inputs = {n.name: torch.Size(planner.shapes[n.args[0].name]) for n in planner.gm.graph.nodes if n.name in forms}
    return compress_timing.FormTimings(planner.gm, forms, planner.shapes), inputs


def test_each_kinds_smallest_and_largest_member_is_probed_with_its_inputs():
    torch.manual_seed(0)
    model, x = Sizes().train(), torch.randn(2, 3, 16, 16)
    timings, shapes = _timings(model, x)
    elements = {name: shape.numel() for name, shape in shapes.items()}
    relus = sorted((n for n in timings.forms if n.startswith("relu")), key=elements.get)
    assert len(relus) == 3 and len({elements[n] for n in relus}) == 3
    probes = timings.probes()
    assert set(probes) == {relus[0], relus[-1], "leaky_relu", "pool"}
    seen = {}
    wrapped = {name: (lambda values, result, name=name, probe=probe: (seen.setdefault(name, values), probe(values, result)))
               for name, probe in probes.items()}
    node_seconds(timings.gm, (x,), repeats=1, probes=[wrapped])
    assert set(seen) == set(probes)  # each once, with the node's input values as the graph makes them
    for name, values in seen.items():
        assert values[0].numel() == elements[name]
    assert set(timings.measured) == set(probes)
    assert all(s >= 0.0 for s in timings.measured.values())
    assert set(timings.seconds()) == set(timings.forms)


def test_members_between_the_probed_sizes_lie_on_the_line_through_them():
    torch.manual_seed(0)
    timings, shapes = _timings(Sizes().train(), torch.randn(2, 3, 16, 16))
    elements = {name: shape.numel() for name, shape in shapes.items()}
    low, middle, high = sorted((n for n in timings.forms if n.startswith("relu")), key=elements.get)
    timings.measured.update({low: 0.001, high: 0.003, "leaky_relu": 0.0005, "pool": 0.0})
    seconds = timings.seconds()
    slope = 0.002 / (elements[high] - elements[low])
    assert seconds[middle] == pytest.approx(0.001 + slope * (elements[middle] - elements[low]), rel=1e-12)
    assert (seconds[low], seconds[high], seconds["leaky_relu"], seconds["pool"]) == (0.001, 0.003, 0.0005, 0.0)
    del timings.measured[high]  # a kind not fully probed: not priced
    assert not {low, middle, high} & set(timings.seconds())


def test_a_probe_times_the_compressed_op_forward_and_backward(monkeypatch):
    calls = []
    relu = compressed_ops.relu

    def counted(*args, **kwargs):
        out = relu(*args, **kwargs)
        calls.append(out.grad_fn)
        return out

    monkeypatch.setattr(compressed_ops, "relu", counted)
    monkeypatch.setitem(compress._COMPRESSED, "relu", counted)
    torch.manual_seed(0)
    timings, shapes = _timings(Sizes().train(), torch.randn(2, 3, 16, 16))
    name, probe = next((n, p) for n, p in timings.probes().items() if n.startswith("relu"))
    probe([torch.randn(shapes[name])], None)
    assert len(calls) == compress_timing.ROUNDS + 1  # a warm-up and the timed rounds, with autograd
    assert all(fn is not None for fn in calls)
    assert timings.measured[name] >= 0.0


def test_candidates_take_the_measured_seconds_and_the_roofline_where_none(monkeypatch):
    torch.manual_seed(0)
    planner = _Planner(Sizes().train(), (torch.randn(2, 3, 16, 16),), default_loss, ("compress",))
    group = planner.groups[0]
    measured = {n: 0.25 for n in group.nodes}
    pricing = planner.pricing.__class__(**{**planner.pricing.__dict__, "compressed_seconds": measured.get})
    [candidate, *_] = compress.candidates(pricing, [group], planner.forms)
    assert candidate.seconds == (0.25 * len(group.nodes),)
    unmeasured = planner.pricing.__class__(**{**planner.pricing.__dict__, "compressed_seconds": lambda n: None})
    [candidate, *_] = compress.candidates(unmeasured, [group], planner.forms)
    assert candidate.seconds == (planner.rerun_seconds(group.nodes, times=0.0, move=3.0),)


def test_a_kind_whose_probe_fails_is_priced_by_its_bytes(monkeypatch):
    def fails(*args):
        raise torch.OutOfMemoryError("no room to time it")

    monkeypatch.setattr(compress_timing, "_added_seconds", fails)
    torch.manual_seed(0)
    planner = _Planner(Sizes().train(), (torch.randn(2, 3, 16, 16),), default_loss, ("compress",))
    planner.profile_modes()
    assert planner.node_seconds() and planner._compressed == {}
    for candidate in planner.offered.values():
        assert candidate.seconds == (planner.rerun_seconds(candidate.nodes, times=0.0, move=3.0),)


def test_probing_a_lossy_form_leaves_the_roundings_stream_as_it_was():
    """Lossy forms round stochastically from compressed_ops' own generator: probing them
    draws no rounding that training would have drawn."""
    torch.manual_seed(0)
    model, x = Sizes().train(), torch.randn(2, 3, 16, 16)
    planner = _Planner(model, (x,), default_loss, ("compress",), Lossy(bits=4))
    lossy = {n: f for n, f in next(iter(planner.forms.values())).items() if f != "lossless"}
    assert lossy  # the convolutions at 8 bits, the widest width
    timings = compress_timing.FormTimings(planner.gm, lossy, planner.shapes)
    compressed_ops.manual_seed(0)
    before = compressed_ops._generator(x.device).get_state()
    node_seconds(planner.gm, (x,), repeats=1, probes=[timings.probes()])
    assert timings.measured and torch.equal(compressed_ops._generator(x.device).get_state(), before)
