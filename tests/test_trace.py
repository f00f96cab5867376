import logging

import pytest
import torch
from torch import nn

from examples.zoo import ZOO
from rewriter import CaptureError, InputError
from rewriter.trace import capture


def test_nodes_keep_the_module_structure():
    gm = capture(ZOO["resnet18"].test_model()).gm
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"conv1", "layer3.1.conv2", "layer4.0.downsample.0", "fc"} <= targets


def test_untraceable_submodule_becomes_an_opaque_leaf(caplog):
    with caplog.at_level(logging.WARNING, logger="rewriter.trace"):
        captured = capture(ZOO["data_dependent"].test_model())
    assert captured.opaque == ("gate",)
    assert any("'gate'" in r.getMessage() and "opaque leaf" in r.getMessage() for r in caplog.records)
    gate_nodes = [n for n in captured.gm.graph.nodes if n.op == "call_module" and n.target == "gate"]
    assert len(gate_nodes) == 1


def test_captured_graph_computes_what_the_model_computes():
    zoo = ZOO["data_dependent"]
    model, x = zoo.test_model().eval(), zoo.test_input()
    torch.testing.assert_close(capture(model).gm(x), model(x))


class TopLevelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


def test_untraceable_top_level_is_an_error_naming_it():
    with pytest.raises(CaptureError, match="TopLevelBranch.*submodule"):
        capture(TopLevelBranch())
    # with example inputs too: a branch on their data is one their sizes do not give
    with pytest.raises(CaptureError, match="TopLevelBranch.*input sizes do not give"):
        capture(TopLevelBranch(), inputs=(torch.randn(1, 3, 4, 4),))


def test_capture_needs_a_module():
    with pytest.raises(InputError, match="not a torch.nn.Module"):
        capture(lambda x: x)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_capture_changes_nothing_in_the_model(name, unchanged):
    snapshot, assert_unchanged = unchanged
    model = ZOO[name].test_model()
    before = snapshot(model)
    capture(model)
    assert_unchanged(model, before)


class _SkipIfGiven(nn.Module):
    """Branches as MONAI's UpCat does: `torch.jit.isinstance(skip, torch.Tensor)`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x, skip=None):
        if skip is not None and torch.jit.isinstance(skip, torch.Tensor):
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class _UsesSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 4, 3, padding=1)
        self.up = _SkipIfGiven()

    def forward(self, x):
        return self.up(self.down(x), x)


def test_a_traced_value_is_a_tensor_to_torch_jit_isinstance():
    # issue 21: answered False, the skip connection was left out of MONAI's BasicUNet
    # graph, whose profile then failed ("expected input ... to have 256 channels")
    model, x = _UsesSkip(), torch.randn(2, 4, 8, 8)
    captured = capture(model)
    assert captured.opaque == ()
    assert any(n.target is torch.cat for n in captured.gm.graph.nodes)
    torch.testing.assert_close(captured.gm(x), model(x))
    assert torch.jit.isinstance([1], list[int])  # put back after tracing


class _AsTensor(nn.Module):
    """Wraps outputs in torch.as_tensor as MONAI's HighResNet does, once to float64."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.as_tensor(self.conv(x)) + torch.as_tensor(x)
        return torch.as_tensor(y, dtype=torch.float64) * 2


def test_torch_as_tensor_of_a_traced_value_is_that_value_or_its_conversion():
    model, x = _AsTensor(), torch.randn(2, 4, 8, 8)
    captured = capture(model)
    assert captured.opaque == ()
    assert [n.kwargs for n in captured.gm.graph.nodes if n.target is torch.as_tensor] == [{"dtype": torch.float64}]
    out = captured.gm(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, model(x))
    assert torch.as_tensor([1.0]).tolist() == [1.0]  # put back after tracing


class _ChecksSizes(nn.Module):
    """Checks its input's sizes in a loop over them, as MONAI's SegResNetDS does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if not all(size % 4 == 0 for size in x.shape[2:]):
            raise ValueError("sizes must be multiples of 4")
        height, width = x.shape[2:]
        return self.conv(x)[:, :, : height // 2, : width // 2]


def test_a_loop_over_the_input_sizes_is_traced_for_the_example_inputs():
    model, x = _ChecksSizes(), torch.randn(2, 4, 8, 12)
    captured = capture(model, inputs=(x,))
    assert captured.opaque == ()
    torch.testing.assert_close(captured.gm(x), model(x))
    with pytest.raises(Exception, match="captured for inputs"):  # a size the check took as a multiple of 4
        captured.gm(torch.randn(2, 4, 8, 10))
