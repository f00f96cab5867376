"""Compress on volumes: 3-D max and average pooling keep one byte per output (the
argmax's offset in its window) or nothing, bit for bit as eager."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewriter.cost_models.simulate import simulate
from rewriter.measure import default_loss, measure_peak
from rewriter.passes import compressed_ops
from rewriter.report import profile_model_graph
from tests.test_compress import all_groups, op_step, train_step


@pytest.mark.parametrize("eager, ours", [
    (lambda x: F.max_pool3d(x, 2), lambda x: compressed_ops.max_pool3d(x, 2)),
    (lambda x: F.max_pool3d(x, 3, 2, 1), lambda x: compressed_ops.max_pool3d(x, 3, 2, 1)),
    (lambda x: F.max_pool3d(x, 3, 2, 1, 2, True), lambda x: compressed_ops.max_pool3d(x, 3, 2, 1, 2, True)),
    (lambda x: F.max_pool3d(x, (2, 3, 3), (1, 2, 1), (1, 1, 0), (2, 1, 1)),
     lambda x: compressed_ops.max_pool3d(x, (2, 3, 3), (1, 2, 1), (1, 1, 0), (2, 1, 1))),
    (lambda x: F.avg_pool3d(x, 3, 2, 1), lambda x: compressed_ops.avg_pool3d(x, 3, 2, 1)),
    (lambda x: F.avg_pool3d(x, 2, ceil_mode=True, count_include_pad=False),
     lambda x: compressed_ops.avg_pool3d(x, 2, ceil_mode=True, count_include_pad=False)),
])
def test_3d_pooling_equals_eager_bit_for_bit(eager, ours):
    x = torch.randn(2, 3, 9, 11, 10, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0, :4] = 1.5  # ties inside a window: the first index wins in both
    out, grad = op_step(eager, x)
    out_c, grad_c = op_step(ours, x)
    assert torch.equal(out_c, out) and torch.equal(grad_c, grad)


def test_a_window_of_more_than_256_positions_is_refused():
    with pytest.raises(ValueError, match="256"):
        compressed_ops.max_pool3d(torch.randn(1, 1, 8, 8, 8), (7, 7, 7))


class Pooled3d(nn.Module):
    """A 3-D encoder: max pooling (module and function), average pooling, ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 8, 1)
        self.pool = nn.MaxPool3d(2)
        self.avg = nn.AvgPool3d(3, 1, 1)

    def forward(self, x):
        y = self.pool(torch.relu(self.a(x)))
        y = F.max_pool3d(torch.relu(self.b(y)), 3, 2, 1)
        return self.c(self.avg(y))


def test_a_3d_network_with_every_group_compressed_trains_bit_for_bit_and_keeps_less():
    torch.manual_seed(0)
    model, reference = Pooled3d(), Pooled3d()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 16, 14, 12)
    gm, groups, _ = all_groups(model, x)
    assert {"max_pool3d", "avg_pool3d", "relu"} <= {k for g in groups for k in g.kinds}
    assert torch.equal(train_step(gm, x), train_step(reference, x))
    for (label, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(q.grad, p.grad), label
    measured = measure_peak(gm, x)
    assert measured < measure_peak(model, x)
    assert simulate(profile_model_graph(model, gm, (x,), default_loss, (), {})).peak_bytes == measured
