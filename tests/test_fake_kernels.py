"""The profiler's own fake kernels (cost_models.fake_kernels) return what the fake
tensor mode's kernels return, layout for layout, and a profile made with them is the
profile made without them."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from examples.zoo import ZOO
from rewriter.cost_models import fake_kernels
from rewriter.cost_models.profile import profile_graph
from rewriter.measure import default_loss
from rewriter.trace import capture
from tests.test_repeated_nodes import _canonical

aten = torch.ops.aten
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device, t.untyped_storage().nbytes()


def _calls(shape, dtype, device, channels_last):
    """A batch norm's forward and backward calls on fake tensors of this layout."""
    channels = shape[1]

    def make(*size):
        t = torch.randn(*size, dtype=dtype, device=device)
        return t.to(memory_format=FORMATS[len(size)]) if channels_last and len(size) in FORMATS else t

    x, grad = make(*shape), make(*shape)
    weight, bias, mean, var = (torch.randn(channels, dtype=dtype, device=device) for _ in range(4))
    out, save_mean, save_invstd = aten.native_batch_norm.default(x, weight, bias, mean, var, True, 0.1, 1e-5)
    forward = (aten.native_batch_norm.default, (x, weight, bias, mean, var, True, 0.1, 1e-5))
    backward = (aten.native_batch_norm_backward.default,
                (grad, x, weight, mean, var, save_mean, save_invstd, True, 1e-5, [True, True, True]))
    return forward, backward


LAYOUTS = [((4, 3), False), ((2, 3, 5), False), ((2, 3, 4, 5), False), ((2, 3, 4, 5), True), ((2, 3, 2, 4, 5), False),
           ((2, 3, 2, 4, 5), True), ((1, 6, 2, 1), True)]


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("shape, stride, dtype", [((2, 8, 16, 16), (2048, 256, 16, 1), torch.float32),
                                                  ((2, 8, 16, 16), (2048, 1, 128, 8), torch.float64),
                                                  ((3, 5), (1, 3), torch.float16), ((7,), (2,), torch.bool), ((), (), torch.int64)])
def test_empty_fake_is_what_empty_strided_makes_under_the_mode(shape, stride, dtype, device):
    mode = FakeTensorMode()
    with mode:
        made = fake_kernels.empty_fake(mode, shape, stride, dtype, torch.device(device))
        expected = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        again = fake_kernels.empty_fake(mode, shape, stride, dtype, torch.device(device))
    assert type(made) is type(expected) and made.fake_mode is mode
    assert _layout(made) == _layout(expected)
    assert made.untyped_storage()._cdata != again.untyped_storage()._cdata  # a storage of its own
    assert not made.requires_grad and made.grad_fn is None


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
def test_batch_norm_outputs_are_laid_out_as_the_fake_modes(shape, channels_last, dtype, device):
    mode = FakeTensorMode()
    with mode:
        calls = _calls(shape, dtype, device, channels_last)
        for func, args in calls:
            answered = fake_kernels.kernel(func, args, {})
            assert answered is not NotImplemented, func
            expected = func(*args)
            assert [_layout(t) for t in answered] == [_layout(t) for t in expected], func
            assert all(isinstance(t, torch._subclasses.FakeTensor) for t in answered)


def test_calls_it_does_not_answer_run_as_they_are():
    mode = FakeTensorMode()
    with mode:
        (forward, f_args), (backward, b_args) = _calls((2, 3, 4, 5), torch.float32, "cpu", False)
        half = [a.half() if isinstance(a, torch.Tensor) else a for a in f_args]
        strided = (b_args[0].transpose(2, 3).contiguous().transpose(2, 3), *b_args[1:])  # gradient laid out otherwise
        unanswered = [
            (forward, (*f_args[:5], False, *f_args[6:])),  # eval mode
            (forward, tuple(half)),  # half: the decomposition computes in float32 and casts
            (forward, (f_args[0][:, :, ::2], *f_args[1:])),  # a strided view
            (forward, (f_args[0][:1, :, :1, :1].clone(), *f_args[1:])),  # one value per channel
            (backward, (*b_args[:9], [True, False, False])),  # no weight or bias gradient
            (backward, strided),
        ]
        for func, args in unanswered:
            assert fake_kernels.kernel(func, args, {}) is NotImplemented
    real = _calls((2, 3, 4, 5), torch.float32, "cpu", False)[0]
    assert fake_kernels.kernel(real[0], real[1], {}) is NotImplemented  # real tensors: never


class ChannelsLast(nn.Module):
    """Batch norms on channels-last tensors, 2-D and 3-D, and on a dense layout of
    neither kind (a channels-last tensor reshaped: run by the fake mode)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.norm3 = nn.BatchNorm3d(8)
        self.other = nn.BatchNorm3d(2)

    def forward(self, x):
        y = self.norm(self.conv(x.contiguous(memory_format=torch.channels_last))).relu()
        z = self.norm3(y.unsqueeze(2).contiguous(memory_format=torch.channels_last_3d)).relu()
        return z.sum() + self.other(y.reshape(2, 2, 4, 8, 8)).sum()


@pytest.mark.parametrize("name", ["densenet_bc", "resnet18", "channels last"])
def test_profiles_with_and_without_them_are_the_same(name, monkeypatch):
    torch.manual_seed(0)
    if name == "channels last":
        model, x = ChannelsLast().train(), torch.randn(2, 3, 8, 8)
    else:
        model, x = ZOO[name].test_model().train(), ZOO[name].test_input()
    captured = capture(model, (), (), (x,))
    answered = []

    def counted(func, args, kwargs):
        out = kernel(func, args, kwargs)
        answered.append(out is not NotImplemented)
        return out

    kernel = fake_kernels.kernel
    monkeypatch.setattr(fake_kernels, "kernel", counted)
    with_them = profile_graph(captured.gm, (x,), default_loss, captured.opaque, repeats=False)
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    unanswered = 2 if name == "channels last" else 0  # the reshaped one's forward and backward
    assert sum(answered) == 2 * norms - unanswered  # each norm's forward and backward
    monkeypatch.setattr(fake_kernels, "kernel", lambda func, args, kwargs: NotImplemented)
    without = profile_graph(captured.gm, (x,), default_loss, captured.opaque, repeats=False)
    assert _canonical(with_them) == _canonical(without)
