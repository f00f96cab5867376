"""Compress: smaller copies of saved tensors; lossless bit for bit, lossy on request."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from rewriter.cost_models.simulate import simulate
from rewriter.cost_models.saved import saved_tensors
from rewriter.cost_models.storage_tracker import StorageTracker
from examples.zoo import ZOO
from rewriter.passes import compress, compressed_ops
from rewriter.measure import default_loss, measure_peak, preserved_model_state
from rewriter.report import profile_model_graph
from rewriter.trace import capture


def op_step(fn, x0: torch.Tensor, seed: int = 3):
    """Output and input gradient of `fn` on a copy of `x0`, with a fixed random stream."""
    torch.manual_seed(seed)
    x = x0.clone().requires_grad_()
    y = fn(x * 1.0)  # not a leaf: in-place ops are allowed
    y.backward(torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin())
    return y.detach(), x.grad


@pytest.mark.parametrize("eager, ours", [
    (F.relu, compressed_ops.relu),
    (torch.relu_, lambda x: compressed_ops.relu(x, inplace=True)),
    (lambda x: F.leaky_relu(x, 0.2), lambda x: compressed_ops.leaky_relu(x, 0.2)),
    (lambda x: F.relu6(x * 4), lambda x: compressed_ops.relu6(x * 4)),
    (lambda x: F.relu6(x * 4, inplace=True), lambda x: compressed_ops.relu6(x * 4, inplace=True)),
    (lambda x: F.hardtanh(x, -0.5, 1.0), lambda x: compressed_ops.hardtanh(x, -0.5, 1.0)),
    (nn.ReLU6(inplace=True), lambda x: compressed_ops.module_call(nn.ReLU6(inplace=True), x)),
    (lambda x: F.dropout(x, 0.3), lambda x: compressed_ops.dropout(x, 0.3)),
    (lambda x: F.max_pool2d(x, 3, 2, 1), lambda x: compressed_ops.max_pool2d(x, 3, 2, 1)),
    (lambda x: F.max_pool2d(x, 2), lambda x: compressed_ops.max_pool2d(x, 2)),
    (lambda x: F.max_pool2d(x, 3, 2, 1, 2, True), lambda x: compressed_ops.max_pool2d(x, 3, 2, 1, 2, True)),
    (lambda x: F.max_pool2d(x, (2, 3), (1, 2), (1, 1)), lambda x: compressed_ops.max_pool2d(x, (2, 3), (1, 2), (1, 1))),
    (lambda x: F.avg_pool2d(x, 3, 2, 1), lambda x: compressed_ops.avg_pool2d(x, 3, 2, 1)),
])
def test_lossless_ops_equal_eager_bit_for_bit(eager, ours):
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :3] = 0.0  # ties at the thresholds: 0, 6 (1.5 x 4), 1 and -0.5
    x[0, 0, 0, 3:5], x[0, 0, 0, 5], x[0, 0, 0, 6] = 1.5, 1.0, -0.5
    out, grad = op_step(eager, x)
    out_c, grad_c = op_step(ours, x)
    assert torch.equal(out_c, out) and torch.equal(grad_c, grad)


def test_bits_pack_and_unpack():
    mask = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = compressed_ops.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 14  # 105 bits in 14 bytes
    assert torch.equal(compressed_ops.unpack_bits(packed, mask.shape), mask)


@pytest.mark.parametrize("bits", compressed_ops.BITS)
def test_quantization_is_within_a_step_and_unbiased(bits):
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    packed, low, scale = compressed_ops.quantize(x, bits)
    assert packed.numel() == scale.numel() * compressed_ops.GROUP * bits // 8
    assert low.dtype == scale.dtype == torch.bfloat16
    # a group lies within one channel (its padding copies the channel's last value), so
    # no level step can exceed the widest channel range over the number of steps, but
    # for the bfloat16 rounding of min (down, by less than 2**-7 of |min|) and of the
    # step (up, by less than 2**-7 of it)
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
    spread = per_channel.amax(1) - per_channel.amin(1) + per_channel.amin(1).abs() * 2**-7
    step = spread.max() / (2**bits - 1) * (1 + 2**-7)
    assert scale.float().max() <= step
    draws = torch.stack([compressed_ops.dequantize(*compressed_ops.quantize(x, bits), bits, x.shape, x.dtype)
                         for _ in range(400)])
    assert (draws - x).abs().max() <= step * (1 + 1e-5)  # each value rounds to a neighbouring level
    # stochastic rounding is unbiased: the mean of 400 draws is within 5 standard errors
    # (each draw's error has standard deviation at most step / 2)
    assert (draws.mean(0) - x).abs().max() <= 5 * (step / 2) / 400**0.5


def test_quantize_and_dequantize_work_a_block_of_channels_at_a_time():
    """The working copies (float rows, rounding noise, codes) of a large tensor exist
    for one block of channels at a time: beyond what they return, quantize and
    dequantize hold less than a quarter of the input's bytes (whole, the float copy
    alone would be all of them); a small one is worked whole."""
    assert compressed_ops._count((2, 64, 128, 128), compressed_ops.CHUNKS) == compressed_ops.CHUNKS
    assert compressed_ops._count((64, 16, 32, 32), compressed_ops.CHUNKS) == 1  # 16K values a sample
    x = torch.randn(2, 64, 128, 128, generator=torch.Generator().manual_seed(0))
    for bits in compressed_ops.BITS:
        with StorageTracker() as tracker:
            packed, low, scale = compressed_ops.quantize(x, bits)
            tracker.poll()
        returned = packed.nbytes + low.nbytes + scale.nbytes
        assert returned == x.numel() * bits // 8 + x.numel() // compressed_ops.GROUP * 4
        assert tracker.peak - returned < x.nbytes // 4
        with StorageTracker() as tracker:
            restored = compressed_ops.dequantize(packed, low, scale, bits, x.shape, x.dtype)
            tracker.poll()
        assert restored.is_contiguous() and tracker.peak - restored.nbytes < x.nbytes // 4


def test_a_channel_shorter_than_a_group_is_quantized_over_its_own_values():
    # 16 values per channel in [5, 6]: padding with zeros would stretch the range to [0, 6]
    x = torch.linspace(5, 6, 32).view(1, 2, 4, 4)
    packed, low, scale = compressed_ops.quantize(x, 4)
    per_channel = x.view(2, 16)
    low, scale = low.float().flatten(), scale.float().flatten()
    assert (low <= per_channel.amin(1)).all() and (low + 15 * scale >= per_channel.amax(1)).all()
    # each channel spans 15/31 (level step 1/31); bfloat16 rounds 5 + 16/31 down to 5.5
    # (step (6 - 5.5) / 15 = 1/30): with zeros padded the step would be 6/15
    assert scale.max() <= 1 / 30 * (1 + 2**-7)
    restored = compressed_ops.dequantize(packed, low.bfloat16()[:, None], scale.bfloat16()[:, None], 4, x.shape, x.dtype)
    assert (restored - x).abs().max() <= scale.max()


@pytest.mark.parametrize("batch, lossy", [(4, False), (64, True)])
def test_a_lossy_candidate_fills_a_group_per_channel(batch, lossy):
    """A Linear's input has `batch` values per feature: at batch 4 a 4-bit copy would be
    a padded row of 64 codes and its range (40 bytes against 16), so no candidate."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    _, groups, _ = all_groups(model.train(), torch.randn(batch, 3, 8, 8), bits=4)
    assert [g.nodes for g in groups if "_3" in g.nodes] == ([("_3",)] if lossy else [])
    assert [g.nodes for g in groups if "_1" in g.nodes] == [("_1",)]  # its input: 256 values per channel at batch 4


def test_error_bound_picks_the_fewest_bits_that_hold_it():
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    chosen = []
    for error in (0.6, 0.15, 0.01):  # the widest group spans 1.6 x max|x|: 2, 4, 8 bits
        bits = compress.bits_for(x, error)
        assert bits is not None
        restored = compressed_ops.dequantize(*compressed_ops.quantize(x, bits), bits, x.shape, x.dtype)
        assert (restored - x).abs().max() <= error * x.abs().max()
        chosen.append(bits)
    assert chosen == sorted(chosen) and len(set(chosen)) == 3  # a tighter bound, more bits
    assert compress.bits_for(x, 1e-5) is None  # beyond 8 bits: left uncompressed


def all_groups(model: nn.Module, x: torch.Tensor, bits: int | None = None):
    """`model` with every compress group rewritten, the groups, and its profile."""
    captured = capture(model)
    base = profile_model_graph(model, captured.gm, (x,), default_loss, captured.opaque, {})
    lossy = {n: bits for n in compress.lossy_nodes(captured.gm)} if bits else {}
    groups = compress.groups(captured.gm, base, lossy)
    forms = {n: compress.form_of(k, lossy.get(n)) for g in groups for n, k in zip(g.nodes, g.kinds)}
    return compress.rewrite(captured.gm, forms), groups, base


def train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(7)
    out = model(x)
    out.square().mean().backward()
    return out.detach()


def assert_gradients_close_in_direction(model: nn.Module, reference: nn.Module) -> None:
    """Every parameter gradient of `model` at cosine similarity >= 0.99 to `reference`'s."""
    for (label, p), q in zip(reference.named_parameters(), model.parameters()):
        cosine = F.cosine_similarity(q.grad.flatten(), p.grad.flatten(), dim=0)
        assert cosine >= 0.99, (label, float(cosine))


class Clamps(nn.Module):
    """ReLU6 and hardtanh as modules and as functions, in place and not."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.six = nn.ReLU6(inplace=True)

    def forward(self, x):
        y = self.six(self.a(x) * 2)
        y = F.hardtanh(self.b(y), -0.5, 0.5) * 3
        return F.relu6(self.c(y) * 4, inplace=True).mean((2, 3))


def test_clamps_keep_masks_and_train_bit_for_bit():
    torch.manual_seed(0)
    model = Clamps().train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    gm, groups, _ = all_groups(model, x)
    assert sorted(k for g in groups for k in g.kinds) == ["hardtanh", "hardtanh", "relu6"]
    assert torch.equal(train_step(gm, x), train_step(reference, x))
    for (label, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(q.grad, p.grad), label
    eager = measure_peak(reference, x)
    assert measure_peak(gm, x) < eager


@pytest.mark.parametrize("name", sorted(ZOO))
def test_lossless_groups_train_bit_for_bit_as_eager(name):
    zoo = ZOO[name]
    model, reference = zoo.test_model(), zoo.test_model()
    x = zoo.test_input()
    gm, groups, _ = all_groups(model, x)
    assert all(g.lossless for g in groups)
    assert torch.equal(train_step(gm, x), train_step(reference, x))
    for (label, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(q.grad, p.grad), label
    for (label, b), c in zip(reference.named_buffers(), model.buffers()):
        assert torch.equal(c, b), label


@pytest.mark.parametrize("name, kinds", [("dropout", {"dropout", "max_pool2d"}), ("unet", {"max_pool2d"}),
                                         ("resnet18", {"max_pool2d"})])
def test_dropout_and_max_pool_models_drop_measured_memory(name, kinds):
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    gm, groups, base = all_groups(model, x)
    assert kinds <= {k for g in groups for k in g.kinds}
    eager = measure_peak(model, x)
    measured = measure_peak(gm, x)
    assert measured < eager
    rewritten = profile_model_graph(model, gm, (x,), default_loss, (), {})
    assert simulate(rewritten).peak_bytes == measured


def test_a_relu_output_the_next_conv_keeps_is_no_lossless_candidate():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU()).train()
    x = torch.randn(2, 3, 12, 12)
    _, groups, _ = all_groups(model, x)
    # the first ReLU's output is the second conv's input: a mask would free nothing;
    # the last ReLU's output only it keeps
    assert [g.nodes for g in groups] == [("_3",)]
    # lossy: the second conv keeps a 4-bit copy, so the first ReLU's mask frees its output
    _, lossy_groups, _ = all_groups(model, x, bits=4)
    assert [g.nodes for g in lossy_groups] == [("_1", "_2"), ("_3",)]


def gradient(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_four_bit_gradients_point_where_eager_does(name):
    zoo = ZOO[name]
    model, reference = zoo.test_model(), zoo.test_model()
    x = zoo.test_input()
    gm, _, _ = all_groups(model, x, bits=4)
    compressed_ops.manual_seed(0)  # the roundings of a fresh process, whatever ran before in this one
    torch.testing.assert_close(train_step(gm, x), train_step(reference, x))  # the forward stays exact
    for (label, b), c in zip(reference.named_buffers(), model.buffers()):
        torch.testing.assert_close(c, b, msg=label)
    cosine = F.cosine_similarity(gradient(model), gradient(reference), dim=0)
    assert cosine >= 0.99, f"{name}: gradient cosine {cosine:.4f} at 4 bits"


class NormReluConv(nn.Module):
    def __init__(self, consumer: nn.Module, norm: nn.Module):
        super().__init__()
        self.norm, self.relu, self.consumer = norm, nn.ReLU(inplace=True), consumer

    def forward(self, x):
        return self.consumer(self.relu(self.norm(x)))


@pytest.mark.parametrize("consumer, norm, shape", [
    (nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.BatchNorm2d(8), (4, 8, 9, 11)),
    (nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(8), (3, 8, 7, 7)),
    (nn.Linear(8, 5), nn.BatchNorm1d(8), (64, 8)),
])
def test_batch_norm_relu_consumer_runs_as_one_op_keeping_one_copy(consumer, norm, shape):
    torch.manual_seed(0)
    model = NormReluConv(consumer, norm).train()
    with torch.no_grad():  # BatchNorm weights of both signs: the ReLU's side flips with them
        model.norm.weight.copy_(torch.linspace(-1.5, 1.5, 8))
        model.norm.bias.copy_(torch.linspace(0.5, -0.5, 8))
    reference = copy.deepcopy(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    gm, groups, base = all_groups(model, x, bits=4)
    assert [g.fused for g in groups] == [(("norm", "relu", "consumer"),)]
    assert [n.name for n in gm.graph.nodes if n.op == "call_function"] == ["consumer"]
    compressed_ops.manual_seed(0)
    assert torch.equal(train_step(gm, x), train_step(reference, x))  # the forward is exact
    for (label, b), c in zip(reference.named_buffers(), model.buffers()):
        assert torch.equal(c, b), label  # running statistics updated once, as eager
    assert_gradients_close_in_direction(model, reference)
    # kept for the backward: 4-bit codes, low and scale for each side of the threshold
    # (8 bytes per group of 64, in bfloat16) and the mask, a bit per value (each channel's bits
    # padded to whole bytes), where apart the ops keep the BatchNorm input's copy, the
    # mask and the ReLU output's copy
    rewritten = profile_model_graph(model, gm, (x,), default_loss, (), {})
    groups_of = -(-x.numel() // x.shape[1] // compressed_ops.GROUP) * x.shape[1]
    mask_bytes = -(-x.numel() // x.shape[1] // 8) * x.shape[1]
    kept = {t.nbytes for t in saved_tensors(rewritten) if t.held_by == ("consumer",)}
    assert {groups_of * compressed_ops.GROUP // 2, groups_of * 4, mask_bytes} <= kept


def test_the_batch_norm_relu_pass_needs_a_single_consumer():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.relu = nn.BatchNorm2d(4), nn.ReLU()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.relu(self.norm(x))
            return self.a(y) + self.b(y)

    assert compress.fusable(capture(Two()).gm) == []
    assert compress.fusable(capture(NormReluConv(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).gm) == [("norm", "relu", "consumer")]


class TwoReaders(nn.Module):
    """A ResNet stage's first block: the block input read by conv1 and the downsample."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(8, 16, 1, stride=2)

    def forward(self, x):
        y = self.norm(self.stem(x)) + 1.0  # kept by no one but the two convolutions
        return self.conv1(y) + self.down(y)


def test_convolutions_of_one_tensor_run_as_one_op_with_one_copy():
    torch.manual_seed(0)
    model = TwoReaders().train()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gm, groups, _ = all_groups(model, x, bits=4)
    assert ("conv1", "down") in [g.nodes for g in groups]
    forks = [n for n in gm.graph.nodes if n.target is compressed_ops.convs]
    assert [n.name for n in forks] == ["conv1"]  # named as the first reader, as a fused op is
    assert not [n for n in gm.graph.nodes if n.target is compressed_ops.shared_copy]
    assert torch.equal(train_step(gm, x), train_step(reference, x))  # the forward is exact
    assert_gradients_close_in_direction(model, reference)
    # 4 x 8 x 16 x 16 values at 4 bits, and a bfloat16 low and scale per 64: kept once
    rewritten = profile_model_graph(model, gm, (x,), default_loss, (), {})
    kept = sorted(t.nbytes for t in saved_tensors(rewritten) if t.held_by == ("conv1",))
    assert kept == sorted([4 * 8 * 16 * 16 // 2, 4 * 8 * 16 * 16 // 64 * 2, 4 * 8 * 16 * 16 // 64 * 2])


def test_one_op_of_convolutions_equals_the_convolutions_on_one_copy_bit_for_bit():
    torch.manual_seed(0)
    a, b = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(8, 4, 1, stride=2, bias=False)
    x0 = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    results = []
    for fork in (True, False):
        for p in (*a.parameters(), *b.parameters()):
            p.grad = None
        x = x0.clone().requires_grad_()
        compressed_ops.manual_seed(5)
        if fork:
            ya, yb = compressed_ops.convs((a, b), x, bits=4)
        else:
            copy_ = compressed_ops.shared_copy(x, 4)
            ya, yb = (compressed_ops.module_call(m, x, 4, copy_) for m in (a, b))
        (ya.sin().sum() + yb.cos().sum()).backward()
        results.append((ya, yb, x.grad, a.weight.grad, a.bias.grad, b.weight.grad))
    for fork, apart in zip(*results):
        assert torch.equal(fork, apart)


class ReadTwice(nn.Module):
    """A tensor read by a convolution and a BatchNorm: one shared copy, two ops."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.stem(x) + 1.0  # kept by no one but the two readers
        return self.conv(y) + self.norm(y)


def test_lossy_readers_of_other_kinds_share_one_copy():
    torch.manual_seed(0)
    model = ReadTwice().train()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gm, _, _ = all_groups(model, x, bits=4)
    copies = [n for n in gm.graph.nodes if n.target is compressed_ops.shared_copy]
    assert len(copies) == 1 and {u.name for u in copies[0].users} == {"conv", "norm"}
    assert torch.equal(train_step(gm, x), train_step(reference, x))
    assert_gradients_close_in_direction(model, reference)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.norm, name), getattr(reference.norm, name)), name


class ConvNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.out = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Conv2d(32, 4, 1)
        self.again = nn.BatchNorm2d(32)

    def forward(self, x):
        y = self.conv(x)
        z = self.norm(self.conv(x))  # the convolution's output is read by this BatchNorm only
        return self.out(z) + self.norm(y).mean() + self.again(torch.tanh(y)).mean()


def test_a_batch_norm_writes_over_a_convolution_output_only_it_reads():
    torch.manual_seed(0)
    model = ConvNorm().train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # 32 x 64 x 64 a sample: 4 blocks
    gm, _, _ = all_groups(model, x, bits=4)
    over = {n.name: n.kwargs.get("overwrite", False) for n in gm.graph.nodes if n.target is compressed_ops.module_call}
    # `norm` reads the second conv call's output alone; `norm_1` reads y, which tanh
    # reads too; `again` reads tanh's output, which tanh's backward keeps
    assert over == {"norm": True, "norm_1": False, "again": False, "out": False}
    assert torch.equal(train_step(gm, x), train_step(reference, x))  # written over, the same forward
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.norm, name), getattr(reference.norm, name)), name
    # written over, the BatchNorm's forward allocates nothing the size of its output
    profile = profile_model_graph(model, gm, (x,), default_loss, (), {})
    sizes = profile.sizes_at(profile.example_batch)
    allocated = [sizes[uid] for kind_, uid, _ in profile.by_name["norm"].fwd_events if kind_ == "alloc"]
    assert max(allocated) <= 2 * 32 * 64 * 64 * 4 // 4
    apart = [sizes[uid] for kind_, uid, _ in profile.by_name["norm_1"].fwd_events if kind_ == "alloc"]
    assert max(apart) == 2 * 32 * 64 * 64 * 4


def test_a_batch_norm_written_over_its_input_computes_the_same_numbers():
    norm = nn.BatchNorm2d(16).train()
    y0 = torch.randn(2, 16, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 + 1  # two blocks
    results = []
    for overwrite in (False, True):
        norm.reset_running_stats()
        norm.weight.grad = norm.bias.grad = None
        y = y0.clone().requires_grad_()
        compressed_ops.manual_seed(5)
        out = compressed_ops.module_call(norm, y * 1.0, bits=4, overwrite=overwrite)
        out.sin().sum().backward()
        results.append((out.detach(), y.grad, norm.weight.grad, norm.bias.grad,
                        norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_a_residual_sum_writes_over_the_lossy_batch_norm_output_it_alone_reads():
    zoo = ZOO["resnet18"]
    model = zoo.test_model().train()
    reference = copy.deepcopy(model)
    x = zoo.test_input()
    gm, _, _ = all_groups(model, x, bits=4)
    sums = {n.name: n.args[0].name for n in gm.graph.nodes if n.target is compressed_ops.add_into}
    assert sums["add"] == "layer1_0_bn2"  # out += identity, traced as out + identity
    assert torch.equal(train_step(gm, x), train_step(reference, x))
    a = torch.randn(2, 3, 4)
    assert compressed_ops.add_into(a, torch.ones(3, 4)) is a and compressed_ops.add_into(a, 1.5) is a
    wider, promoted = compressed_ops.add_into(a, torch.ones(5, 2, 3, 4)), compressed_ops.add_into(a, torch.ones(4, dtype=torch.float64))
    assert wider.shape == (5, 2, 3, 4) and promoted.dtype == torch.float64  # not written over: a new tensor


def test_optimize_uses_lossless_compression_by_default():
    zoo = ZOO["dropout"]
    model, reference = zoo.test_model(), zoo.test_model()
    x = zoo.test_input()
    budget = int(0.7 * measure_peak(model, x))
    optimized = rewriter.optimize(model, budget, x)
    plan = optimized.plan
    assert plan.compressed and all(form == "lossless" for _, form in plan.compressed)
    assert {plan[n].strategy for n, _ in plan.compressed} == {"compress"}
    assert measure_peak(optimized, x) <= budget
    assert torch.equal(train_step(optimized, x), train_step(reference, x))
    for (label, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(q.grad, p.grad), label
    assert "lossless" in str(plan)


def test_optimize_with_four_bits_fits_a_budget_lossless_cannot(tmp_path):
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    budget = int(0.48 * measure_peak(model, x))
    with pytest.raises(rewriter.BudgetError):
        rewriter.optimize(model, budget, x, strategies="compress")
    optimized = rewriter.optimize(model, budget, x, strategies="compress", compress_bits=4)
    forms = dict(optimized.plan.compressed)
    assert set(forms.values()) & {"8-bit", "4-bit"}  # (narrower only where needed: tested below)
    measured = measure_peak(optimized, x)
    assert measured <= budget
    assert optimized.plan.predicted_peak_bytes == measured
    again = rewriter.apply_plan(model, rewriter.Plan.from_json(optimized.plan.to_json()))
    rewriter.save(optimized, tmp_path)
    loaded = rewriter.load(tmp_path)
    assert measure_peak(again, x) == measure_peak(loaded, x) == measured


def test_saved_compressed_module_loads_and_trains_identically(tmp_path):
    zoo = ZOO["dropout"]
    model, x = zoo.test_model(), zoo.test_input()
    optimized = rewriter.optimize(model, int(0.7 * measure_peak(model, x)), x, strategies="compress")
    rewriter.save(optimized, tmp_path)
    text = (tmp_path / "module.py").read_text()
    assert "= rewriter.export.compressed_ops.module_call" in text
    imported = set(re.findall(r"^(?:import|from) ([\w.]+)", text, flags=re.M))
    assert {name.split(".")[0] for name in imported} <= {"torch", "rewriter", "math"}
    loaded = rewriter.load(tmp_path)
    assert torch.equal(train_step(loaded, x), train_step(optimized, x))
    for p, q in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_compressed_modules_follow_eval_mode():
    """A compressed Dropout module stops dropping in eval mode, as the graph it replaced
    does (the functional dropout's training=True is fixed at capture, compressed or not)."""
    zoo = ZOO["dropout"]
    model, x = zoo.test_model(), zoo.test_input()
    optimized = rewriter.optimize(model, int(0.7 * measure_peak(model, x)), x, strategies="compress")
    assert "drop1" in dict(optimized.plan.compressed)
    unchanged = rewriter.optimize(model, 10**9, x)
    optimized.eval()
    unchanged.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        expected = unchanged(x)
        torch.manual_seed(0)
        assert torch.equal(optimized(x), expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"compress_bits": 3}, "compress_bits=3"),
    ({"compress_bits": 4, "compress_error": 0.01}, "not both"),
    ({"compress_error": 2.0}, "compress_error=2.0"),
    ({"compress_bits": 4, "strategies": "recompute"}, "leaves it out"),
])
def test_bad_compress_options_are_clear_errors(kwargs, message):
    model = ZOO["dropout"].test_model()
    with pytest.raises(rewriter.InputError, match=message):
        rewriter.optimize(model, 10**6, ZOO["dropout"].test_input(), **kwargs)


def resnet18_forms(fraction: float, **options) -> set[str]:
    """The compressed forms in resnet18's plan at `fraction` of its eager peak with
    compress alone and `options`; the plan's measured peak must fit."""
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    budget = int(fraction * measure_peak(model, x))
    optimized = rewriter.optimize(model, budget, x, strategies="compress", **options)
    assert measure_peak(optimized, x) <= budget
    return set(dict(optimized.plan.compressed).values())


def test_error_bound_mode_keeps_each_tensor_under_the_bound():
    forms = resnet18_forms(0.5, compress_error=0.05)
    assert forms - {"lossless"} and forms <= {"lossless", "2-bit", "4-bit", "8-bit"}


def test_sensitivity_grows_as_the_width_narrows():
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    captured = capture(model)
    lossy = compress.lossy_nodes(captured.gm)
    shares = {}
    with preserved_model_state(model):
        for bits in (8, 2):
            forms = {n: f"{bits}-bit" for n in lossy}
            shares[bits] = compress.sensitivity(captured.gm, forms, (x,), default_loss)
    assert set(shares[8]) == set(lossy)
    assert all(v >= 0 for v in shares[2].values())
    assert sum(shares[2].values()) > 16 * sum(shares[8].values())  # 2-bit steps are 85x wider than 8-bit ones


def test_narrow_widths_only_where_wider_ones_do_not_fit():
    forms = resnet18_forms(0.75, compress_bits=2)
    assert "8-bit" in forms and forms <= {"lossless", "8-bit"}
