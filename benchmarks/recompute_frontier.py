"""Peak memory against step time: rewriter's recompute beside PyTorch's own tools.

For the zoo's ResNet-50-style and DenseNet-BC models, at budgets 0.75, 0.5, 0.3 and
0.2 x the eager peak and at the peak each of per-block checkpointing and
checkpoint_sequential reaches (the goal's comparison): rewriter.optimize with recompute alone and with its default strategies
(all four); per-block torch.utils.checkpoint; checkpoint_sequential at
several segment counts; and torch.compile(backend="aot_eager") with
torch._functorch.config.activation_memory_budget at the same fractions. Peak:
rewriter.measure_peak (the dispatch-mode protocol on CPU, the allocator on CUDA).
Time: median of 9 training steps after a warm-up, every variant of a model taking
turns (benchmarks/timing.py), as a ratio to eager; each compiled variant takes turns
with eager right after it is compiled. Writes
benchmarks/results/recompute_frontier_<device>.md and prints it; run for some models
(`--models`), it replaces their rows and keeps the others' (the file lists which run
each model's rows come from).

    python benchmarks/recompute_frontier.py            # CPU sizes below; --device cuda on a GPU
"""

import argparse
import copy
import datetime
import platform
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402
from benchmarks.timing import step_seconds  # noqa: E402
from examples.zoo.densenet import DenseLayer, DenseNetBC, Transition  # noqa: E402
from examples.zoo.resnet import Bottleneck, resnet50_style  # noqa: E402

FRACTIONS = (0.75, 0.5, 0.3, 0.2)
CASES = {  # name: (builder, block types for per-block checkpointing, input shape on CPU, on CUDA)
    "resnet50": (resnet50_style, (Bottleneck,), (8, 3, 128, 128), (32, 3, 224, 224)),
    "densenet_bc": (DenseNetBC, (DenseLayer, Transition), (32, 3, 32, 32), (128, 3, 32, 32)),
}


class Checkpointed(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        if len(args) == 1 and isinstance(args[0], list):  # DenseNet layers take the (growing) feature list:
            features = args[0]  # pass its tensors, so the rerun sees the list as it was
            return checkpoint(lambda *tensors: self.block(list(tensors)), *features, use_reentrant=False)
        return checkpoint(self.block, *args, use_reentrant=False)


def per_block(model: nn.Module, types) -> nn.Module:
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, types):
                setattr(parent, name, Checkpointed(child))
    return model


def flattened(model: nn.Module) -> nn.Sequential:
    """The model as one Sequential (for checkpoint_sequential)."""
    if isinstance(model, DenseNetBC):
        return nn.Sequential(model.stem, *model.features, model.norm, model.relu, model.pool, nn.Flatten(1), model.fc)
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, *model.layer1, *model.layer2,
                         *model.layer3, *model.layer4, model.avgpool, nn.Flatten(1), model.fc)


class Sequentially(nn.Module):
    def __init__(self, model: nn.Module, segments: int):
        super().__init__()
        self.body = flattened(copy.deepcopy(model))
        self.segments = segments

    def forward(self, x):
        return checkpoint_sequential(self.body, self.segments, x, use_reentrant=False)


def _earlier_runs(path: Path, models: list[str]) -> tuple[dict[str, str], list[str]]:
    """From an earlier results file: which run each model not run now comes from, and
    those models' table rows."""
    if not path.exists():
        return {}, []
    text = path.read_text().splitlines()
    runs = {}
    for line in text:
        if line.startswith("- ") and ": " in line:
            name, run = line[2:].split(": ", 1)
            if name in CASES and name not in models:
                runs[name] = run
    rows = [line for line in text if line.startswith("| ") and line.split(" | ")[0][2:] in runs]
    return runs, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="*", default=list(CASES))
    parser.add_argument("--fractions", nargs="*", type=float, default=list(FRACTIONS))
    args = parser.parse_args()
    fractions = tuple(args.fractions)
    device = torch.device(args.device)
    name_of_device = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    out = ROOT / "benchmarks" / "results" / f"recompute_frontier_{device.type}.md"
    runs, kept = _earlier_runs(out, args.models)
    command = f"`python benchmarks/recompute_frontier.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
    for name in args.models:
        runs[name] = f"{datetime.date.today()}, torch {torch.__version__}, {command}"
    lines = [
        f"# Recompute frontier on {name_of_device}",
        "",
        "Each model's rows come from its latest run:",
        *(f"- {name}: {run}" for name, run in runs.items()),
        "",
        "Peak: rewriter.measure_peak (ARCHITECTURE.md's protocol). Time: median of 9 steps after a warm-up,",
        "all variants of a model taking turns, as a ratio to eager (each compiled variant takes turns with",
        "eager right after compiling). rewriter (recompute): `strategies=\"recompute\"`; rewriter (default):",
        "all four strategies, row-split searched only where the others find no plan.",
        "",
        "torch.compile's step is measured as it runs compiled, on CPU as well: the CPU's counting mode",
        "lets dynamo run the compiled graphs under it (`ignore_compile_internals`). Its backward returns",
        "every parameter gradient at once, before any is added into `.grad` (eager adds each as it is made).",
        "Plain torch.utils.checkpoint updates BatchNorm running statistics twice per step; rewriter once.",
        "",
        "| model | input | method | budget | measured peak | peak / eager | time / eager | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(model_name, shape, method, budget, cells):
        lines.append(f"| {model_name} | {'x'.join(map(str, shape))} | {method} | "
                     f"{'' if budget is None else f'{budget / 2**20:.1f} MiB'} | {cells} |")
        print(lines[-1], flush=True)

    for model_name in args.models:
        build, types, cpu_shape, cuda_shape = CASES[model_name]
        shape = cuda_shape if device.type == "cuda" else cpu_shape
        torch.manual_seed(0)
        model = build().to(device).train()
        x = torch.randn(shape, device=device)
        base_peak = rewriter.measure_peak(model, x)
        variants = {"eager": (None, model)}  # method -> (budget, module)
        errors = []  # (method, budget, cells) of variants that did not run
        variants["checkpoint per block"] = (None, per_block(model, types))
        for segments in (2, 4, 8):
            variants[f"checkpoint_sequential({segments})"] = (None, Sequentially(model, segments))
        # the goal's comparison: rewriter at the peak each of PyTorch's checkpointings reaches
        budgets = [(str(f), int(f * base_peak)) for f in fractions]
        for peer in [m for m in variants if m.startswith("checkpoint")]:
            try:
                reached = rewriter.measure_peak(variants[peer][1], x)
            except RuntimeError:  # it cannot run this model: listed with the others below
                continue
            label = "per-block checkpoint" if peer == "checkpoint per block" else peer
            if reached < base_peak:
                budgets.append((f"{label}'s peak", reached))
        for label, strategies in (("recompute", "recompute"), ("default", None)):
            for at, budget in budgets:
                method = f"rewriter ({label}) at {at}"
                print(f"planning {model_name}: {method}", flush=True)
                try:
                    variants[method] = (budget, rewriter.optimize(model, budget, x, strategies=strategies))
                except rewriter.BudgetError as error:
                    errors.append((method, budget, f"BudgetError: smallest reachable {error.minimum_bytes / 2**20:.1f} MiB "
                                                   f"({error.minimum_bytes / base_peak:.2f}) | | | "))
                    if at == str(fractions[-1]):  # rewriter's lowest point, at the budget the error named
                        variants[f"rewriter ({label}) at BudgetError.minimum_bytes"] = (
                            error.minimum_bytes, rewriter.optimize(model, error.minimum_bytes, x, strategies=strategies))
        peaks = {}
        for method, (budget, module) in list(variants.items()):
            try:
                peaks[method] = rewriter.measure_peak(module, x)
            except RuntimeError as error:  # a peer that cannot run this model
                errors.append((method, budget, f"fails: {str(error).splitlines()[0][:90]} | | | "))
                del variants[method]
        seconds = step_seconds({method: module for method, (_, module) in variants.items()}, x)
        for method, (budget, _) in variants.items():
            fits = "" if budget is None else ("yes" if peaks[method] <= budget else "**no**")
            row(model_name, shape, method, budget, f"{peaks[method] / 2**20:.1f} MiB | {peaks[method] / base_peak:.2f} | "
                                                   f"{seconds[method] / seconds['eager']:.2f} | {fits}")
        for method, budget, cells in errors:
            row(model_name, shape, method, budget, cells)
        for fraction in fractions:
            budget = int(fraction * base_peak)
            torch._dynamo.reset()
            with torch._functorch.config.patch(activation_memory_budget=fraction):
                compiled = torch.compile(model, backend="aot_eager")
                compiled(x).sum().backward()  # compile outside the measurement
                method = f"torch.compile aot_eager, activation_memory_budget={fraction}"
                timed = step_seconds({"eager": model, "compiled": compiled}, x)
                ratio = timed["compiled"] / timed["eager"]
                peak = rewriter.measure_peak(compiled, x)
                row(model_name, shape, method, budget, f"{peak / 2**20:.1f} MiB | {peak / base_peak:.2f} | {ratio:.2f} | "
                                                       f"{'yes' if peak <= budget else '**no**'}")
    lines += kept
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
