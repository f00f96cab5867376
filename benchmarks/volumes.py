"""3-D volumes: how far MONAI's segmentation networks shrink, and the largest patch that fits.

For MONAI's 3-D `UNet` (channels 16/32/64/128, strides 2, two residual units) and
`SegResNet` (MONAI's defaults), batch 1, one channel, on a cubic patch (96³ by
default): the eager step's measured peak; the smallest budget `optimize` reaches
with the exact strategies other than row-split (recompute, invert, lossless
compress) and with row-split too (`BudgetError.minimum_bytes` of a budget far below
it); the plan at that smallest budget, measured (peak, step time against eager,
gradient error ||g - g_eager|| / ||g_eager|| over all parameter gradients); the
smallest budget with compress alone, lossy at 4 bits, and its plan measured; the
plan at 0.35 of the eager peak (default strategies), measured; and
the largest cubic patch (a multiple of 16, up to twice the fit size) whose step fits the eager peak of a 64³
patch: eager (`rewriter.largest_input`, predicted, then measured) and optimized
(`optimize` at that budget, the largest patch it plans, then measured).

    python benchmarks/volumes.py [--size 96] [--fit-size 64] [--steps 3] [--models unet segresnet] [--device cpu]

writes benchmarks/results/volumes_cpu.md (or _cuda.md with --device cuda).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewriter  # noqa: E402
from benchmarks.timing import gradient_error, step_seconds  # noqa: E402
from rewriter.plan import format_bytes  # noqa: E402
from rewriter.report import largest_fitting  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXACT = ("recompute", "invert", "compress")  # compress without compress_bits: lossless only
LOSSY_BITS = 4  # compress alone, lossy: convolutions', normalisations' and PReLUs' inputs at 4 bits
MIDDLE = 0.35  # a budget, as a fraction of eager's peak, between the smallest without row-split and with it
MULTIPLE = 16  # a patch edge both networks' 8x downsampling divides, the step MONAI users take


def build(name: str) -> torch.nn.Module:
    from monai.networks import nets

    torch.manual_seed(0)
    if name == "unet":
        return nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                         num_res_units=2)
    return nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=2)


def patch(edge: int, device: str) -> torch.Tensor:
    return torch.randn((1, 1, edge, edge, edge), generator=torch.Generator().manual_seed(1)).to(device)


def minimum(model, x, eager: int, strategies, **options) -> int:
    """The smallest budget `optimize` reaches with `strategies` and `options` (what its
    BudgetError names for a budget of 1% of the eager peak)."""
    try:
        rewriter.optimize(model, eager // 100, x, strategies=strategies, **options)
    except rewriter.BudgetError as error:
        return error.minimum_bytes
    raise AssertionError("a budget of 1% of the eager peak fitted")


def describe(plan) -> str:
    return (f"{len(plan.row_split)} row-split, {len(plan.segments)} recomputed, {len(plan.spans)} spans, "
            f"{len(plan.inverted)} inverted, {len(plan.compressed)} compressed")


def largest_optimized(model, budget: int, device: str, limit: int) -> int:
    """The largest multiple of 16 up to `limit` whose patch `optimize` plans within `budget`."""

    def fits(count: int) -> bool:
        try:
            rewriter.optimize(model, budget, patch(count * MULTIPLE, device))
        except rewriter.BudgetError:
            return False
        return True

    return MULTIPLE * largest_fitting(fits, limit // MULTIPLE)


def case(name: str, size: int, fit_size: int, steps: int, device: str) -> dict:
    model = build(name).to(device)
    x = patch(size, device)
    row = {"model": name, "input": f"1x1x{size}x{size}x{size}", "eager": rewriter.measure_peak(model, x)}
    row["without"] = minimum(model, x, row["eager"], EXACT)
    start = time.perf_counter()
    row["with"] = minimum(model, x, row["eager"], EXACT + ("row_split",))
    optimized = rewriter.optimize(model, row["with"], x, strategies=EXACT + ("row_split",))
    row["plan_seconds"] = time.perf_counter() - start
    plan = optimized.plan
    row["measured"], row["predicted"] = rewriter.measure_peak(optimized, x), plan.predicted_peak_bytes
    row["strategies"] = describe(plan)
    seconds = step_seconds({"eager": model, "optimized": optimized}, x, rounds=steps)
    row["eager_seconds"], row["time_ratio"] = seconds["eager"], seconds["optimized"] / seconds["eager"]
    row["grad_error"] = gradient_error(model, optimized, x)
    row["lossy"] = minimum(model, x, row["eager"], ("compress",), compress_bits=LOSSY_BITS)
    optimized = rewriter.optimize(model, row["lossy"], x, strategies="compress", compress_bits=LOSSY_BITS)
    row["lossy_measured"], row["lossy_predicted"] = rewriter.measure_peak(optimized, x), optimized.plan.predicted_peak_bytes
    row["lossy_error"] = gradient_error(model, optimized, x)
    middle = int(MIDDLE * row["eager"])  # a budget between the two smallest: what a user would more often ask
    row["middle_measured"] = None
    if middle >= row["with"]:  # (below it at small sizes, where gradients and small maps hold more)
        optimized = rewriter.optimize(model, middle, x)
        row["middle_measured"], row["middle_plan"] = rewriter.measure_peak(optimized, x), describe(optimized.plan)
        seconds = step_seconds({"eager": model, "optimized": optimized}, x, rounds=steps)
        row["middle_ratio"] = seconds["optimized"] / seconds["eager"]
    budget = rewriter.measure_peak(model, patch(fit_size, device))
    row["fit_budget"] = budget
    limit = 2 * fit_size  # eight times the volume: past what a plan at a quarter of eager's peak fits
    eager_edge = rewriter.largest_input(model, patch(fit_size, device), budget, multiple=MULTIPLE, limit=limit)
    row["eager_edge"], row["eager_edge_measured"] = eager_edge, rewriter.measure_peak(model, patch(eager_edge, device))
    edge = largest_optimized(model, budget, device, limit)
    optimized = rewriter.optimize(model, budget, patch(edge, device))
    row["edge"], row["edge_measured"] = edge, rewriter.measure_peak(optimized, patch(edge, device))
    row["limit"] = limit
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="edge of the cubic patch")
    parser.add_argument("--fit-size", type=int, default=64, help="the patch whose eager peak is the budget of the largest-patch search")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each, taking turns")
    parser.add_argument("--models", nargs="*", choices=["unet", "segresnet"], default=["unet", "segresnet"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = [case(name, args.size, args.fit_size, args.steps, args.device) for name in args.models]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    lines = [
        "# 3-D volumes: MONAI networks",
        "",
        f"`python benchmarks/volumes.py {' '.join(sys.argv[1:])}` on {device}, torch {torch.__version__}. Peaks are"
        " measured (bytes beyond what was live when the step began); smallest budgets are `BudgetError.minimum_bytes`"
        " with exact strategies only (recompute, invert, lossless compress; then with row-split too); the plan at"
        " that budget measured; step time the median of the steps, eager and optimized taking turns, one run;"
        " gradient error ||g - g_eager|| / ||g_eager|| over all parameter gradients (float32 both).",
        "",
        "| model | input | eager peak | smallest without row-split | smallest with row-split | measured there | predicted | fits | plan | step time vs eager | eager step | gradient error | planning |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {format_bytes(r['eager'])} | {format_bytes(r['without'])} "
            f"({r['without'] / r['eager']:.3f}x) | {format_bytes(r['with'])} ({r['with'] / r['eager']:.3f}x) | "
            f"{format_bytes(r['measured'])} | {format_bytes(r['predicted'])} | {'yes' if r['measured'] <= r['with'] else 'NO'} | "
            f"{r['strategies']} | {r['time_ratio']:.2f}x | {r['eager_seconds']:.2f} s | {r['grad_error']:.1e} | "
            f"{r['plan_seconds']:.0f} s |")
    lines += [
        "",
        f"Compress alone, lossy at {LOSSY_BITS} bits (convolutions', InstanceNorm/GroupNorm and PReLU inputs): the"
        " smallest budget, the plan there measured, its gradient error:",
        "",
        "| model | smallest budget | measured there | predicted | fits | gradient error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {format_bytes(r['lossy'])} ({r['lossy'] / r['eager']:.3f}x) | {format_bytes(r['lossy_measured'])} | "
            f"{format_bytes(r['lossy_predicted'])} | {'yes' if r['lossy_measured'] <= r['lossy'] else 'NO'} | {r['lossy_error']:.1e} |")
    lines += [
        "",
        f"At {MIDDLE} of the eager peak (default strategies):",
        "",
        "| model | budget | measured peak | fits | plan | step time vs eager |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = int(MIDDLE * r["eager"])
        if r["middle_measured"] is None:
            lines.append(f"| {r['model']} | {format_bytes(budget)} | below the smallest budget | | | |")
            continue
        lines.append(f"| {r['model']} | {format_bytes(budget)} | {format_bytes(r['middle_measured'])} | "
                     f"{'yes' if r['middle_measured'] <= budget else 'NO'} | {r['middle_plan']} | {r['middle_ratio']:.2f}x |")
    lines += [
        "",
        f"The largest cubic patch (a multiple of {MULTIPLE}) whose step fits the eager peak of a {args.fit_size}³ patch:",
        "",
        "| model | budget (eager peak at the fit size) | eager: largest patch | its measured peak | rewriter: largest patch | its measured peak | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {format_bytes(r['fit_budget'])} | {r['eager_edge']}³ | {format_bytes(r['eager_edge_measured'])} | "
            f"{r['edge']}³{' (the search limit)' if r['edge'] == r['limit'] else ''} | {format_bytes(r['edge_measured'])} | {'yes' if r['edge_measured'] <= r['fit_budget'] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"volumes_{'cuda' if args.device == 'cuda' else 'cpu'}.md").write_text(text)


if __name__ == "__main__":
    main()
