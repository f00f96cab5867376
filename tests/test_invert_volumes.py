"""Invert through the per-sample normalisations of MONAI's networks: InstanceNorm and
GroupNorm rebuilt from their outputs and statistics, 2-D and 3-D; and LayerNorm, per
position, as ConvNeXt normalises over channels."""

import pytest
import torch
from torch import nn

import rewriter
from rewriter.cost_models.simulate import simulate
from rewriter.measure import default_loss
from rewriter.report import profile_model_graph
from tests.test_invert import assert_same_training, inverted


class NormBlocks(nn.Module):
    """conv, norm, dropout with p = 0, PReLU (MONAI's Convolution and ADN) twice, then
    a convolution: the norm of the first block is `norm(channels)`, of the second a
    GroupNorm without affine parameters."""

    def __init__(self, dims: int, norm):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.a, self.b, self.c = conv(2, 8, 3, padding=1), conv(8, 8, 3, padding=1), conv(8, 3, 1)
        self.norm_a, self.norm_b = norm(8), nn.GroupNorm(2, 8, affine=False)
        self.drop = nn.Dropout(0.0)
        self.act_a, self.act_b = nn.PReLU(8, init=0.3), nn.PReLU(init=0.2)

    def forward(self, x):
        y = self.act_a(self.drop(self.norm_a(self.a(x))))
        return self.c(self.act_b(self.norm_b(self.b(y))))


NORMS = {
    "instance": lambda c: nn.InstanceNorm3d(c, affine=True),
    "instance_plain": lambda c: nn.InstanceNorm3d(c),
    "group": lambda c: nn.GroupNorm(4, c),
}
SHAPES = {2: (2, 2, 12, 10), 3: (2, 2, 6, 7, 5)}


def _pair(dims: int, norm: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    make = NORMS[norm] if dims == 3 or norm == "group" else (lambda c: nn.InstanceNorm2d(c, affine=norm == "instance"))
    torch.manual_seed(0)
    model = NormBlocks(dims, make).train()
    reference = NormBlocks(dims, make).train()
    reference.load_state_dict(model.state_dict())
    return model, reference, torch.randn(SHAPES[dims])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_per_sample_norm_chains_rebuild_their_inputs(dims, norm):
    model, reference, x = _pair(dims, norm)
    gm, chains = inverted(model, x)
    kinds = [u.kind for c in chains for u in c.units]
    first = "instance_norm" if norm.startswith("instance") else "group_norm"
    assert sorted(k for k in kinds if k.endswith("_norm")) == sorted([first, "group_norm"]) and kinds.count("prelu") == 2
    assert_same_training(reference, model, gm, x)
    # and in eval mode (statistics still the sample's own), the model's own output
    gm.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x))


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_inverted_norm_chains_keep_less_and_are_predicted_to_the_byte(norm):
    model, _, x = _pair(3, norm)
    gm, _ = inverted(model, x)
    measured = rewriter.measure_peak(gm, x)
    assert measured < rewriter.measure_peak(model, x)
    assert simulate(profile_model_graph(model, gm, (x,), default_loss, (), {})).peak_bytes == measured


def test_a_monai_3d_unet_inverts_through_its_norms():
    """MONAI's 3-D UNet (InstanceNorm, dropout p = 0, PReLU in every block): invert
    finds chains through its norms (before, none), which train like eager within the
    rebuild tolerance and keep less than eager. (Alone, invert promises nothing below
    eager's peak here: should training move every norm's and PReLU's factor past the
    bound, each keeps its input, as eager does.)"""
    nets = pytest.importorskip("monai.networks.nets")

    def build():
        torch.manual_seed(0)
        return nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                         num_res_units=1).train()

    model, x = build(), torch.randn(1, 1, 32, 32, 32)
    eager = rewriter.measure_peak(model, x)
    gm, chains = inverted(model, x)
    assert sum(u.kind == "instance_norm" for c in chains for u in c.units) >= 4
    assert rewriter.measure_peak(gm, x) < eager
    assert_same_training(build(), model, gm, x)


class ChannelNorms(nn.Module):
    """Three ConvNeXt-style blocks (a depthwise convolution, LayerNorm over the channels
    of the channels-last view, a pointwise MLP as Linear layers, a residual add), then
    LayerNorm over the last two dimensions of the (N, C, H, W) map (affine or not, as
    the blocks' norms) and a LeakyReLU before the last convolution."""

    def __init__(self, affine: bool = True, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "dwconv": nn.Conv2d(8, 8, 7, padding=3, groups=8), "norm": nn.LayerNorm(8, elementwise_affine=affine),
            "up": nn.Linear(8, 16), "act": nn.GELU(), "down": nn.Linear(16, 8)}) for _ in range(depth))
        self.plane = nn.LayerNorm((12, 10), elementwise_affine=affine)
        self.leaky, self.out = nn.LeakyReLU(0.2), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        for block in self.blocks:
            y = block["down"](block["act"](block["up"](block["norm"](block["dwconv"](x).permute(0, 2, 3, 1)))))
            x = x + y.permute(0, 3, 1, 2)
        return self.out(self.leaky(self.plane(x)))


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_chains_rebuild_their_inputs_and_keep_less(affine):
    """LayerNorm is rebuilt from its output and its statistics per position: each
    ConvNeXt block's chain (the permute and the norm) frees the depthwise convolution's
    output; training is eager's within the rebuild tolerance; the peak is predicted to
    the byte and lower than eager's."""
    torch.manual_seed(0)
    model, reference = ChannelNorms(affine).train(), ChannelNorms(affine).train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 8, 12, 10)
    gm, chains = inverted(model, x)
    assert [[u.kind for u in c.units] for c in chains] == [["rearrange", "layer_norm"]] * 3 + [["layer_norm", "leaky_relu"]]
    assert_same_training(reference, model, gm, x)
    measured = rewriter.measure_peak(gm, x)
    assert measured < rewriter.measure_peak(model, x)
    assert simulate(profile_model_graph(model, gm, (x,), default_loss, (), {})).peak_bytes == measured
