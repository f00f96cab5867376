"""Optimized modules with the rest of PyTorch: torch.compile, float64, channels_last."""

import os
import shutil

import pytest
import torch
import torch._inductor.config

import rewriter
from examples.zoo import ZOO
from tests.test_optimize import assert_trains_like, train_step

# (zoo model, strategies, fraction of eager's peak): a plan of each strategy
PLANS = {
    "recompute": ("resnet18", "recompute", 0.5),
    "recompute_nested": ("highres_fcn", "recompute", 0.45),
    "invert": ("bn_leaky_chain", "invert", 0.85),
    "compress": ("dropout", "compress", 0.8),
    "accumulate": ("resnet18", "accumulate", 0.8),
}


def _optimized(kind: str):
    name, strategies, fraction = PLANS[kind]
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    optimized = rewriter.optimize(model, int(fraction * rewriter.measure_peak(model, x)), x, strategies=strategies)
    return zoo, model, optimized, x


@pytest.mark.parametrize("kind", sorted(PLANS))
def test_a_compiled_plan_trains_like_eager(kind):
    zoo, model, optimized, x = _optimized(kind)
    plan = optimized.plan
    assert plan.segments or plan.spans or plan.inverted or plan.compressed or plan.accumulated
    if kind == "recompute_nested":
        assert plan.spans
    if kind == "recompute":
        assert any(mode == "selective" for _, mode in plan.segments) or plan.spans
    torch._dynamo.reset()
    compiled = torch.compile(optimized, backend="aot_eager")
    assert_trains_like(zoo.test_model(), model, compiled, x)  # outputs, grads, BatchNorm statistics (updated once)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("kind", sorted(PLANS))
def test_an_inductor_compiled_plan_trains_like_the_compiled_model(kind):
    """Inductor fuses and reorders float32 arithmetic (the model compiled alone differs
    from eager past assert_close's float32 tolerance): the plan compiled is held to the
    model compiled, step for step. Inductor's own random streams depend on how it orders
    and fuses a graph's random ops (a CI machine drew other dropout masks for the plan
    than for the model), so random ops run as eager's (`fallback_random`), and the masks
    are the same for both."""
    zoo, model, optimized, x = _optimized(kind)
    with torch._inductor.config.patch(fallback_random=True):
        torch._dynamo.reset()
        reference = torch.compile(zoo.test_model(), backend="inductor")
        expected = train_step(reference, x)
        torch._dynamo.reset()
        torch.testing.assert_close(train_step(torch.compile(optimized, backend="inductor"), x), expected)
    for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, b), (_, c) in zip(reference.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(c, b, msg=name)


@pytest.mark.parametrize("layout", ["float64", "channels_last"])
@pytest.mark.parametrize("kind", sorted(PLANS))
def test_a_plan_trains_like_eager_in_float64_and_channels_last(kind, layout):
    zoo, model, optimized, x = _optimized(kind)
    reference = zoo.test_model()
    if layout == "float64":
        model.double()  # the optimized module shares the model's modules
        reference.double()
        x = x.double()
    else:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_trains_like(reference, model, optimized, x)


def _autocast_step(module, x) -> torch.Tensor:
    torch.manual_seed(7)
    with torch.autocast("cpu", torch.bfloat16):
        out = module(x)
    out.float().sum().backward()
    return out.float().detach()


@pytest.mark.parametrize("kind", sorted(PLANS))
def test_a_plan_trains_under_autocast_like_the_model(kind):
    """Under torch.autocast (bfloat16 on CPU): recompute and lossless compress give the
    model's own mixed-precision step; invert rebuilds inputs from bfloat16 outputs, so
    its gradients are held to bfloat16's tolerance (assert_close's for bfloat16:
    rtol 1.6e-2), with an absolute 1e-3 for the convolution biases before BatchNorm,
    whose gradients are zero but for rounding."""
    zoo, model, optimized, x = _optimized(kind)
    reference = zoo.test_model()
    torch.testing.assert_close(_autocast_step(optimized, x), _autocast_step(reference, x))
    tolerance = {"rtol": 1.6e-2, "atol": 1e-3} if kind == "invert" else {}
    for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name, **tolerance)
    for (name, b), (_, c) in zip(reference.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(c, b, msg=name)


def test_lossy_compression_under_autocast_is_refused_by_name():
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    optimized = rewriter.optimize(model, int(0.5 * rewriter.measure_peak(model, x)), x, strategies="compress",
                                  compress_bits=8)
    assert any(form.endswith("-bit") for _, form in optimized.plan.compressed)
    with pytest.raises(rewriter.InputError, match="autocast"):
        _autocast_step(optimized, x)


_PATIENCE = 180  # seconds a pair of data-parallel processes may take to save their gradients (alone: 7 to 15 s)
_TEARDOWN = 20  # seconds a pair is then given to end by itself before it is killed


def _distributed_worker(rank: int, world: int, init: str, plan_json: str, kind: str, wrap: str, results: str) -> None:
    """One process of a two-process data-parallel step (gloo; `wrap`: "ddp" for
    DistributedDataParallel, "fsdp2" for fully_shard): the model, and the plan applied
    to it, on this rank's own batch; the averaged gradients saved, by name (written
    whole, then renamed, so that the test never reads half a file)."""
    import faulthandler

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    faulthandler.dump_traceback_later(_PATIENCE - 20)  # where a process that does not end stands, in the test's stderr
    torch.set_num_threads(1)  # two processes per test, beside another test on the other worker: no oversubscription
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        zoo = ZOO[PLANS[kind][0]]
        x = zoo.test_input(seed=10 + rank)
        grads = {}
        for label in ("model", "plan"):
            model = zoo.test_model()
            module = model if label == "model" else rewriter.apply_plan(model, rewriter.Plan.from_json(plan_json))
            torch.manual_seed(7)
            if wrap == "ddp":
                ddp = DistributedDataParallel(module)
                if kind == "accumulate":  # gradients zeroed, not None: it adds into them in place
                    for p in ddp.parameters():
                        p.grad = torch.zeros_like(p)
                ddp(x).sum().backward()
                del ddp
            else:
                from torch.distributed.fsdp import fully_shard
                fully_shard(module)(x).sum().backward()
            grads[label] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                            for n, p in module.named_parameters()}
            del model, module
        torch.save(grads, f"{results}.{rank}.part")
        os.replace(f"{results}.{rank}.part", f"{results}.{rank}")
        dist.barrier()  # both ranks past their last collective before either tears its group down
    finally:
        dist.destroy_process_group()


def _saved_by_both(context, results: str) -> bool:
    """Waits for the pair: True once both ranks have saved their gradients, whether or not
    the processes have ended. gloo's teardown has, rarely and in loaded runs only (CI's
    among them), hung after the work was done (both processes past the worker's last
    line; pytorch/pytorch#75097): a pair that saved its results is given _TEARDOWN
    seconds to end, then killed. False if a process dies (a signal or an exit code), or
    nothing is saved within _PATIENCE; an exception in a worker is raised here, with its
    traceback."""
    import time

    import torch.multiprocessing as mp

    deadline, saved_at = time.monotonic() + _PATIENCE, None
    try:
        while not context.join(timeout=2):
            if saved_at is None and all(os.path.exists(f"{results}.{rank}") for rank in range(2)):
                saved_at = time.monotonic()
            if saved_at is not None and time.monotonic() > saved_at + _TEARDOWN:
                break
            if time.monotonic() > deadline and saved_at is None:
                return False
    except mp.ProcessExitedException:
        return False
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return all(os.path.exists(f"{results}.{rank}") for rank in range(2))


# accumulate's in-place path needs gradients zeroed, not None: DDP's step zeroes them, FSDP2's does not
@pytest.mark.parametrize("kind, wrap", [(kind, wrap) for kind in ("recompute", "invert", "compress", "accumulate")
                                        for wrap in ("ddp", "fsdp2") if (kind, wrap) != ("accumulate", "fsdp2")])
def test_data_parallel_training_of_a_plan_averages_the_models_gradients(kind, wrap, tmp_path):
    import torch.multiprocessing as mp

    if wrap == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="this torch has no fully_shard")
    _, _, optimized, _ = _optimized(kind)
    # two tries: in loaded full runs a pair has, rarely, not saved within the time (and once
    # one aborted in gloo's teardown); a pair that fails twice fails the test, and wrong
    # gradients fail on the first try
    for attempt in range(2):
        results = str(tmp_path / f"grads{attempt}")
        args = (2, f"file://{tmp_path / f'rendezvous{attempt}'}", optimized.plan.to_json(), kind, wrap, results)
        if _saved_by_both(mp.spawn(_distributed_worker, args=args, nprocs=2, join=False), results):
            break
        if attempt == 1:
            pytest.fail(f"{wrap} of a {kind} plan, twice: the two processes did not save their gradients "
                        f"within {_PATIENCE} s, or one died (a signal or an exit code)")
    for rank in range(2):
        grads = torch.load(f"{results}.{rank}", weights_only=True)
        assert grads["plan"].keys() == grads["model"].keys()
        for name, expected in grads["model"].items():
            torch.testing.assert_close(grads["plan"][name], expected, msg=name)


def test_a_compiled_row_split_plan_trains_like_the_model_in_float64():
    """Tiles sum in another order than whole tensors: compared in float64 (as the
    row-split tests do), against eager for aot_eager and against the model compiled
    alike for inductor (where a C++ compiler is at hand). One plan for both."""
    zoo = ZOO["highres_fcn"]
    model, x = zoo.test_model(), zoo.test_input()
    plan = rewriter.optimize(model, int(0.3 * rewriter.measure_peak(model, x)), x).plan
    assert plan.row_split
    backends = ["aot_eager"] + (["inductor"] if shutil.which("c++") or shutil.which("g++") else [])
    for backend in backends:
        model = zoo.test_model().double()
        optimized = rewriter.apply_plan(model, plan)
        torch._dynamo.reset()
        reference = zoo.test_model().double()
        expected = train_step(reference if backend == "aot_eager" else torch.compile(reference, backend=backend),
                              x.double())
        torch._dynamo.reset()
        torch.testing.assert_close(train_step(torch.compile(optimized, backend=backend), x.double()), expected)
        for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=f"{backend}: {name}")
        for (name, b), (_, c) in zip(reference.named_buffers(), model.named_buffers()):
            torch.testing.assert_close(c, b, msg=f"{backend}: {name}")
