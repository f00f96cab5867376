"""A node that repeats an earlier one takes its record (cost_models.repeated_nodes):
the profile is the one every node's own run gives, storage for storage."""

import contextlib
import logging

import pytest
import torch
from torch import fx, nn

from examples.zoo import ZOO
from examples.zoo.plain import BNLeakyChain
from rewriter.cost_models.profile import profile_graph
from rewriter.cost_models.repeated_nodes import Records, RepeatedNodes
from rewriter.measure import default_loss
from rewriter.passes import compress, invert
from rewriter import pipeline
from rewriter.pipeline import Lossy, _Planner
from rewriter.trace import capture

monai = pytest.importorskip("monai.networks.nets")


def _canonical(costs) -> list[tuple]:
    """Every field of every record, storage ids numbered in order of first mention (the
    numbers themselves are the tracker's, which a repeated record takes fresh)."""
    numbers: dict[int, int] = {}

    def number(uid):
        return numbers.setdefault(uid, len(numbers))

    def ref(r):
        return ("new", number(r[1])) if r[0] == "new" else r

    def events(es):
        return tuple((kind, number(uid) if kind in ("alloc", "free") else uid, str(b)) for kind, uid, b in es)

    return [(c.name, c.op, c.label, c.shapes, tuple(map(str, c.nbytes)), c.inputs, tuple(map(ref, c.outputs)),
             c.requires_grad, tuple(map(number, c.internal)), tuple(map(ref, c.saved)), events(c.fwd_events),
             c.opaque, c.many_ops, c.has_backward, events(c.bwd_events), tuple((e, ref(r)) for e, r in c.grad_inputs),
             tuple(map(number, c.param_grads)), c.param_keys, str(c.bwd_flops)) for c in costs.nodes]


class Layouts(nn.Module):
    """One convolution on its input as it is, transposed (a strided view, which the
    kernel copies) and detached (no input gradient), and two equal convolutions
    concatenated (their incoming gradients are slices of one storage)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.c, self.d = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.e = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        z = self.c(y) + self.c(y.transpose(2, 3)) + self.c(y.detach())
        return self.e(torch.cat([self.c(z), self.d(z)], 1))


CASES = {
    **{name: (zoo.test_model, zoo.test_input) for name, zoo in ZOO.items()},
    "chain of 100 blocks": (lambda: BNLeakyChain(channels=8, depth=100), lambda: torch.randn(2, 3, 16, 16)),
    "layouts": (Layouts, lambda: torch.randn(2, 3, 16, 16)),
    "MONAI 3-D UNet": (lambda: monai.UNet(3, 1, 2, (8, 16, 32), (2, 2), num_res_units=2),
                       lambda: torch.randn(1, 1, 16, 16, 16)),
    "MONAI SegResNet": (lambda: monai.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2),
                        lambda: torch.randn(1, 1, 16, 16, 16)),
}


def _rewritten(model: nn.Module, x: torch.Tensor, rewrite: str) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """The captured graph, or the graph with every compress group compressed (lossless,
    or lossy at 4 bits) or every invert chain inverted, as the planner profiles them."""
    if rewrite == "as captured":
        captured = capture(model, (), (), (x,))
        return captured.gm, captured.opaque
    strategy = "invert" if rewrite == "inverted" else "compress"
    lossy = Lossy(bits=4) if rewrite == "compressed at 4 bits" else Lossy()
    planner = _Planner(model, (x,), default_loss, (strategy,), lossy)
    if strategy == "invert":
        return invert.rewrite(planner.gm, [c.output for c in planner.chains], planner.chains), planner.opaque
    return compress.rewrite(planner.gm, planner.forms[min(planner.forms)]), planner.opaque


REWRITES = [(name, "as captured") for name in sorted(CASES)] + [
    ("chain of 100 blocks", "compressed"), ("chain of 100 blocks", "inverted"), ("revnet", "inverted"),
    ("MONAI 3-D UNet", "inverted"), ("resnet18", "compressed at 4 bits"),
    ("densenet_bc", "compressed at 4 bits"), ("MONAI 3-D UNet", "compressed at 4 bits")]


@pytest.mark.parametrize("name, rewrite", REWRITES)
def test_repeated_records_are_the_records_each_node_gives(name, rewrite, caplog):
    torch.manual_seed(0)
    build, make_input = CASES[name]
    model, x = build().train(), make_input()
    gm, opaque = _rewritten(model, x, rewrite)
    own = profile_graph(gm, (x,), default_loss, opaque, repeats=False)
    with caplog.at_level(logging.DEBUG, logger="rewriter.cost_models.profile"):
        repeated = profile_graph(gm, (x,), default_loss, opaque, repeats=True)
    assert _canonical(repeated) == _canonical(own)
    # FLOPs as counted: the first transposed 3-D convolution a process counts can come
    # out 16 FLOPs higher (the MONAI UNet's, 1,327,120 against 1,327,104), repeated or not
    for a, b in zip(repeated.nodes, own.nodes):
        assert abs(float(a.fwd_flops) - float(b.fwd_flops)) <= 1e-4 * float(b.fwd_flops), a.name
    taken = [r.getMessage() for r in caplog.records  # (a coupling's rerun profiles its functions apart too)
             if f"of {len(repeated.nodes)} nodes took the record of an earlier node" in r.getMessage()]
    assert len(taken) == 1
    repeats = int(taken[0].split()[1])
    if name == "chain of 100 blocks":  # blocks 2 to 100 repeat block 1: norm, activation and convolution,
        assert repeats == {"as captured": 3, "compressed": 3, "inverted": 2}[rewrite] * 99  # or invert chain and convolution
    if name in ("resnet50", "densenet_bc", "layouts", "MONAI 3-D UNet"):
        assert repeats > 0


SHARED = ["chain of 100 blocks", "densenet_bc", "unet", "revnet"]


def _nested_plan(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, list[str], bool]:
    """The graph with two nested checkpoints over the first half of its segments and
    every invert chain after them inverted; the graph's checkpoint nodes (the outer
    one); whether a chain was inverted."""
    planner = _Planner(model, (x,), default_loss, ("recompute", "invert"))
    planner.profile_modes()
    half = len(planner.segments) // 2
    spans = [s for s in (planner.span(0, half), planner.span(0, half // 2)) if s is not None]
    inside = {n for s in spans for n in s.nodes}
    chains = {pipeline._INVERT + c.output: "invert" for c in planner.chains if not inside & set(c.nodes)}
    gm = planner.apply(chains, spans)
    segments = [n.name for n in gm.graph.nodes
                if n.op == "call_module" and hasattr(gm.get_submodule(n.target), "checkpointed_code")]
    return gm, segments, bool(chains)


@pytest.mark.parametrize("name", SHARED)
def test_profiles_sharing_records_are_the_profiles_each_makes_alone(name, monkeypatch):
    """A planner's profiles share their records (`Records`): a plan's graph, nested
    checkpoints and inverted chains included, is profiled as alone, and its profile
    with the chains fallen back takes every checkpointed segment's record from it."""
    torch.manual_seed(0)
    build, make_input = CASES[name]
    model, x = build().train(), make_input()
    gm, segments, inverted = _nested_plan(model, x)
    outer = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.name in segments]
    assert len(outer) == 1 and len(outer[0].inner()) == 1  # one nested in the other
    assert inverted == (name == "chain of 100 blocks")
    replayed: list[str] = []
    original = RepeatedNodes._repeated_forward

    def spy(self, node, *args):
        found = original(self, node, *args)
        if found is not None:
            replayed.append(node.name)
        return found

    monkeypatch.setattr(RepeatedNodes, "_repeated_forward", spy)
    records = Records()
    captured = capture(model, (), (), (x,))
    profile_graph(captured.gm, (x,), default_loss, captured.opaque, records=records)  # the planner's first profile
    own_normal = None
    for fallen in (False, True):
        with invert.assuming_fallback() if fallen else contextlib.nullcontext():
            own = profile_graph(gm, (x,), default_loss, captured.opaque, flops=False, repeats=False)
            replayed.clear()
            shared = profile_graph(gm, (x,), default_loss, captured.opaque, flops=False, records=records)
        assert _canonical(shared) == _canonical(own), f"fallen back: {fallen}"
        own_normal = own_normal if fallen else own
        assert all(float(c.fwd_flops) == 0 for c in shared.nodes)  # not counted, though the first profile's records count them
        assert bool(set(segments) & set(replayed)) == fallen  # each segment's record, from the profile before
    # a segment whose forward record is at hand but not its backward's runs forward again for its backward
    forward_only = Records()
    forward_only.forwards.update(records.forwards)
    forward_only.backwards.update((k, v) for k, v in records.backwards.items() if k[0][0][0] != "checkpointed segment")
    assert len(forward_only.backwards) < len(records.backwards)
    replayed.clear()
    ran_again: list[str] = []
    rerun_forward = RepeatedNodes._rerun_forward
    monkeypatch.setattr(RepeatedNodes, "_rerun_forward",
                        lambda self, cost, node: ran_again.append(node.name) or rerun_forward(self, cost, node))
    rerun = profile_graph(gm, (x,), default_loss, captured.opaque, flops=False, records=forward_only)
    assert set(segments) <= set(replayed) & set(ran_again) and _canonical(rerun) == _canonical(own_normal)


def test_a_profile_that_counts_flops_takes_no_record_made_without():
    torch.manual_seed(0)
    model, x = BNLeakyChain(channels=8, depth=4).train(), torch.randn(2, 3, 16, 16)
    gm = capture(model, (), (), (x,)).gm
    records = Records()
    uncounted = profile_graph(gm, (x,), default_loss, flops=False, records=records)
    counted = profile_graph(gm, (x,), default_loss, records=records)
    own = profile_graph(gm, (x,), default_loss, repeats=False)
    assert [c.fwd_flops for c in counted.nodes] == [c.fwd_flops for c in own.nodes]
    assert any(float(c.fwd_flops) > 0 for c in counted.nodes)
    assert all(float(c.fwd_flops) == 0 for c in uncounted.nodes)
    assert _canonical(counted) == _canonical(own)
