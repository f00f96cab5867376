"""A node that repeats an earlier one takes its record (cost_models.repeated_nodes):
the profile is the one every node's own run gives, storage for storage."""

import logging

import pytest
import torch
from torch import fx, nn

from examples.zoo import ZOO
from examples.zoo.plain import BNLeakyChain
from rewriter.cost_models.profile import profile_graph
from rewriter.measure import default_loss
from rewriter.passes import compress, invert
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
