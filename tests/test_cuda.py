"""On CUDA the budget is the caching allocator's peak: the cost model must bound it
(block rounding and cuDNN/cuBLAS workspaces included), and plans must fit it when
measured. Marked `cuda`; skipped without a GPU (CI has none)."""

import pytest
import torch

import rewriter
from examples.zoo import ZOO
from tests.test_optimize import assert_fits_and_trains_like, optimized_within

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# Known gaps, measured on an H100 (torch 2.11): every op's allocations and workspace
# match the prediction (checked op by op), so these are lifetimes that differ on CUDA.
_UNDER = "measured 1,024 bytes above the prediction on CUDA (two 512-byte blocks)"
_PLAN_OVER = "the plan at 0.3 measured 3,579,904 bytes against 3,482,112 predicted on CUDA"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=_UNDER, strict=True))
                                  if n == "shared_module" else n for n in sorted(ZOO)])
def test_predicted_peak_bounds_the_allocators_peak(name):
    zoo = ZOO[name]
    model, x = zoo.test_model().cuda(), zoo.test_input().cuda()
    predicted = rewriter.explain(model, x).predicted_peak_bytes
    measured = rewriter.measure_peak(model, x)
    assert measured <= predicted
    assert predicted - measured <= 0.1 * measured, "the prediction errs high by more than a tenth"


@pytest.mark.parametrize("name, fraction", [
    pytest.param(name, fraction, marks=pytest.mark.xfail(reason=_PLAN_OVER, strict=True))
    if (name, fraction) == ("densenet_bc", 0.3) else (name, fraction)
    for name in ("resnet50", "densenet_bc", "mobilenet_v2", "unet", "highres_fcn", "dropout") for fraction in (0.5, 0.3)
])
def test_plans_fit_the_allocators_peak_and_train_alike(name, fraction):
    zoo = ZOO[name]
    model, x = zoo.test_model().cuda(), zoo.test_input().cuda()
    optimized, budget = optimized_within(model, x, fraction)
    assert_fits_and_trains_like(zoo.test_model().cuda(), model, optimized, x, budget)


def test_workspace_of_a_convolution_is_counted():
    from rewriter.cost_models.cuda_allocator import workspace_bytes

    conv = torch.ops.aten.convolution.default
    x, w = torch.randn(8, 64, 128, 128, device="cuda"), torch.randn(64, 64, 3, 3, device="cuda")
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    counted = workspace_bytes(conv, args, {}, int)  # runs the op twice: set-up costs are behind us
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = conv(*args)
    torch.cuda.synchronize()
    held = torch.cuda.max_memory_allocated() - before - out.untyped_storage().nbytes()
    assert counted == held
