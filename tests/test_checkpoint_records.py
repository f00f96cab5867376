"""Checkpointed segments priced from the one profile: the records cost_models.checkpoint
composes give the peak a profile of the rewritten graph gives."""

import pytest
import torch

from rewriter.cost_models.checkpoint import checkpoint_record, fresh_uids
from rewriter.cost_models.compose import Composer
from rewriter.cost_models.node_costs import Costs
from rewriter.cost_models.profile import profile_graph
from rewriter.cost_models.simulate import simulate
from examples.zoo import ZOO
from rewriter.passes import recompute
from rewriter.measure import default_loss, measure_peak
from rewriter.trace import capture

CHECKPOINT_OWN_BYTES = 4  # a scalar the checkpoint holds through each segment's backward, not composed


def composed_peak(base: Costs, gm, segments: list[recompute.Segment], modes: dict[str, str]) -> int:
    uids = fresh_uids(base)
    records, sizes = [], dict(base.sizes)
    for segment in segments:
        kept = frozenset(segment.expensive) if modes[segment.output] == "selective" else frozenset()
        record, added = checkpoint_record(base, segment.nodes, kept, uids, recompute.norm_bytes(gm, segment))
        records.append(record)
        sizes.update(added)
    alternative = Costs(nodes=records, outputs=(), sizes=sizes, example_batch=base.example_batch,
                        input_shapes=base.input_shapes)
    units = {s.output: (s.output, s.nodes) for s in segments}
    return simulate(Composer(base, [alternative], units)({s.output: 0 for s in segments})).peak_bytes


def assert_composed_as_profiled(name: str, plans) -> None:
    """For the zoo model `name` and each granularity, each (label, segments, modes) that
    `plans(segments)` gives: the peak composed from the one profile is the profiled
    rewrite's, less the checkpoints' own bytes."""
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    captured = capture(model)
    base = profile_graph(captured.gm, (x,), default_loss, captured.opaque)
    for granularity in recompute.GRANULARITIES:
        segments = recompute.segments(captured.gm, captured.opaque, granularity)
        for label, chosen, modes in plans(segments):
            rewritten = recompute.rewrite(captured.gm, modes, segments)
            profiled = simulate(profile_graph(rewritten, (x,), default_loss, captured.opaque)).peak_bytes
            composed = composed_peak(base, captured.gm, chosen, modes)
            assert 0 <= profiled - composed <= CHECKPOINT_OWN_BYTES, (granularity, label, profiled, composed)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet_bc", "vgg", "mobilenet_v2", "unet", "highres_fcn"])
def test_composed_segments_peak_as_the_profiled_rewrite(name):
    assert_composed_as_profiled(name, lambda segments: [
        (mode, segments, {s.output: mode if mode in s.modes() else "full" for s in segments}) for mode in recompute.MODES])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "unet"])
def test_segments_beside_kept_nodes_composed_as_the_profiled_rewrite(name):
    """Every other segment rewritten: the nodes kept after a rewritten segment hold its
    output, though their saved tensors name its in-place activation's first owner."""
    assert_composed_as_profiled(name, lambda segments: [
        (parity, segments[parity::2], {s.output: "full" for s in segments[parity::2]}) for parity in (0, 1)])


class ViewThenConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return self.conv(x.view(x.shape[0], 1, 8, 8))


def test_a_segment_whose_output_is_outside_memory_is_refused():
    model, x = ViewThenConv().train(), torch.randn(2, 64)
    captured = capture(model)
    base = profile_graph(captured.gm, (x,), default_loss, captured.opaque)
    (view,) = [n for n in base.nodes if n.op == "view"]
    assert view.outputs[0][0] == "value"  # the step's input, seen another way
    with pytest.raises(ValueError, match="outside the segment"):
        checkpoint_record(base, (view.name,))


class ForkJoin(torch.nn.Module):
    """Two maps, each read by a branch inside one segment and by a concat after it:
    the gradient of the map whose branch the segment's backward reaches first is summed
    with the concat's while the other branch (its rerun BatchNorm input, its gradient)
    is still live (as in MONAI's attention gates)."""

    def __init__(self):
        super().__init__()
        self.stem_a, self.stem_b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 64, 3, padding=1)
        self.conv_a, self.conv_b = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(64, 4, 1)
        self.norm_a = torch.nn.BatchNorm2d(4)
        self.psi = torch.nn.Conv2d(4, 1, 1)
        self.head = torch.nn.Conv2d(73, 2, 1)

    def forward(self, x):
        a, b = self.stem_a(x), self.stem_b(x)
        g = self.psi(torch.relu(self.norm_a(self.conv_a(a)) + self.conv_b(b)))
        return self.head(torch.cat([a, b, g], 1))


def test_a_gradient_summed_inside_a_segments_backward_is_counted_there():
    model, x = ForkJoin().train(), torch.randn(2, 3, 32, 32)
    captured = capture(model)
    base = profile_graph(captured.gm, (x,), default_loss, captured.opaque)
    segment = recompute.segment_over(captured.gm, ("conv_a", "norm_a", "conv_b", "add", "relu", "psi"))
    rewritten = recompute.rewrite(captured.gm, {"psi": "full"}, [segment])
    profiled = simulate(profile_graph(rewritten, (x,), default_loss, captured.opaque)).peak_bytes
    measured = measure_peak(rewritten, x)
    assert 0 <= profiled - measured <= CHECKPOINT_OWN_BYTES, (profiled, measured)
    assert 0 <= profiled - composed_peak(base, captured.gm, [segment], {"psi": "full"}) <= CHECKPOINT_OWN_BYTES


def test_selective_segments_that_keep_their_output_let_it_go_as_their_rerun_ends():
    """Every other segment of the zoo U-Net selective (those ending in a convolution
    keep its output until their rerun ends, not through their whole backward)."""
    zoo = ZOO["unet"]
    model, x = zoo.test_model(), zoo.test_input()
    captured = capture(model)
    base = profile_graph(captured.gm, (x,), default_loss, captured.opaque)
    segments = recompute.segments(captured.gm, captured.opaque, "fine")
    for parity in (0, 1):
        chosen = [s for s in segments[parity::2] if "selective" in s.modes()]
        assert any(s.output in s.expensive for s in chosen)
        modes = {s.output: "selective" for s in chosen}
        rewritten = recompute.rewrite(captured.gm, modes, segments)
        profiled = simulate(profile_graph(rewritten, (x,), default_loss, captured.opaque)).peak_bytes
        measured = measure_peak(rewritten, x)
        assert 0 <= profiled - measured <= CHECKPOINT_OWN_BYTES, (parity, profiled, measured)
        assert 0 <= profiled - composed_peak(base, captured.gm, chosen, modes) <= CHECKPOINT_OWN_BYTES


def test_a_segment_reading_a_shared_parameter_holds_its_other_gradient_as_measured():
    """The record of a segment carries its members' parameter gradients by parameter:
    a convolution called on two branches, recomputed on one, composes to the measured
    peak (36,992 bytes low when the records dropped them)."""
    from tests.test_cost_model import _SharedAcross
    torch.manual_seed(0)
    model, x = _SharedAcross().train(), torch.randn(2, 32, 8, 8)
    captured = capture(model)
    base = profile_graph(captured.gm, (x,), default_loss, captured.opaque)
    segments = recompute.segments(captured.gm, captured.opaque, "fine")
    chosen = [s for s in segments if s.output in ("shared", "shared_1")]
    assert len(chosen) == 2
    for segment in chosen:
        modes = {segment.output: "full"}
        rewritten = recompute.rewrite(captured.gm, modes, segments)
        assert composed_peak(base, captured.gm, [segment], modes) == measure_peak(rewritten, (x,))
