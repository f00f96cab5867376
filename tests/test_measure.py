import pytest
import torch
from torch import nn

import rewriter
from examples.zoo import ZOO
from tests.conftest import MiB


def one_mib_chain() -> nn.Module:
    """A 1x1 conv then ReLU on a 1 MiB image (1x1x512x512 float32): every activation is 1 MiB."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU()).train()


# forward: conv output A (1 MiB, freed once ReLU has run: conv keeps only its input),
# ReLU output B (1 MiB, kept by ReLU and held by the caller to the end), loss (4 B);
# backward: the initial gradient (4 B); ReLU's backward allocates dL/dA (1 MiB); the
# conv's backward then allocates its 4-byte weight gradient while B, dL/dA, the loss
# and the initial gradient are all still alive.
HAND_COUNTED_PEAK = 1 * MiB + 1 * MiB + 4 + 4 + 4


def test_peak_of_a_hand_counted_step_is_exact():
    model, x = one_mib_chain(), torch.randn(1, 1, 512, 512)
    assert rewriter.measure_peak(model, x) == HAND_COUNTED_PEAK


def test_a_compiled_module_is_measured_as_it_runs_compiled():
    model, x = one_mib_chain(), torch.randn(1, 1, 512, 512)
    calls = []

    def holding_one_mib(gm, example_inputs):  # a torch.compile backend
        def run(*args):
            calls.append(len(args))
            scratch = torch.empty(MiB, dtype=torch.uint8)  # alive while the graph runs
            out = gm(*args)
            del scratch
            return out
        return run

    compiled = torch.compile(model, backend=holding_one_mib)
    # the scratch MiB beside the conv output A and the ReLU output B at the forward's
    # end: 3 MiB, above the eager step's peak in backward (2 MiB + 12 bytes); compiling
    # (the first call) is not counted, and neither call runs the eager code instead
    assert rewriter.measure_peak(compiled, x) == 3 * MiB
    assert rewriter.measure_peak(compiled, x) == 3 * MiB
    assert len(calls) == 2
    assert rewriter.measure_peak(model, x) == HAND_COUNTED_PEAK


def test_measure_is_deterministic_on_cpu():
    zoo = ZOO["resnet50"]
    model, x = zoo.test_model(), zoo.test_input()
    assert len({rewriter.measure_peak(model, x) for _ in range(3)}) == 1


@pytest.mark.parametrize("name", ["dropout", "resnet18", "data_dependent"])
def test_measure_leaves_the_model_as_it_found_it(name, unchanged):
    snapshot, assert_unchanged = unchanged
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    for p in list(model.parameters())[::2]:  # some gradients already there, some not
        p.grad = torch.randn_like(p)
    before = snapshot(model)
    rewriter.measure_peak(model, x)
    assert_unchanged(model, before)


def test_measure_with_a_loss_function():
    model, x = one_mib_chain(), torch.randn(1, 1, 512, 512)
    # mean's backward divides the expanded gradient: dL/dB is a real 1 MiB tensor,
    # alive with B and dL/dA during ReLU's backward
    peak = rewriter.measure_peak(model, x, loss_fn=lambda out: out.mean())
    assert peak == 3 * MiB + 4 + 4


def test_eval_mode_is_an_error():
    model = one_mib_chain().eval()
    with pytest.raises(rewriter.InputError, match="eval mode"):
        rewriter.measure_peak(model, torch.randn(1, 1, 8, 8))


def test_not_a_module_is_an_error():
    with pytest.raises(rewriter.InputError, match="not a torch.nn.Module"):
        rewriter.measure_peak(lambda x: x, torch.randn(2))


def test_output_without_floats_is_an_error():
    class Argmax(nn.Module):
        def forward(self, x):
            return x.argmax(1)

    with pytest.raises(rewriter.InputError, match="loss_fn"):
        rewriter.measure_peak(Argmax(), torch.randn(2, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_of_the_hand_counted_step():
    model, x = one_mib_chain().cuda(), torch.randn(1, 1, 512, 512, device="cuda")
    # beyond the hand count: the allocator's 512-byte blocks for the 4-byte loss and its
    # gradient, and the workspace cuDNN takes for the convolution (about 9 MiB measured
    # on an H100), which the cost model measures once per convolution shape
    measured = rewriter.measure_peak(model, x)
    assert measured >= 2 * MiB + 1024
    assert measured == rewriter.explain(model, x).predicted_peak_bytes
