"""Row-split at high resolution: budgets that recompute alone cannot reach.

For the high-resolution FCN (batch 1, 1024x1024 by default, and a wide strip of as
many pixels, 128x8192) at a budget of 2.5 of its full-size feature maps, and for the
U-Net (batch 1, 512x512 by default) at 25% of its baseline peak: the smallest budget
recompute, invert and compress reach without row-split, then `optimize` with every
strategy: measured peak, predicted peak, step time against eager (median of --steps
steps, one run), and the largest gradient error against eager (||g - g_eager|| /
||g_eager|| over all parameter gradients together). For the wide strip, whose plan
tiles along W, the same plan with its chains tiled along H instead, measured alike.

    python benchmarks/row_split_highres.py [--fcn-size 1024] [--wide-size 128x8192] [--unet-size 512] [--steps 3]

writes benchmarks/results/row_split_highres_cpu.md (or _cuda.md with --device cuda).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewriter  # noqa: E402
from examples.zoo import ZOO  # noqa: E402
from benchmarks.timing import gradient_error  # noqa: E402
from rewriter.plan import format_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _step_seconds(model, x, steps: int) -> float:
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=False)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _chains(plan) -> str:
    return ", ".join(f"{tiles} {'row' if axis == 'H' else 'column'} tiles (+{100 * halo:.0f}% halo FLOPs)"
                     for _, tiles, halo, axis in plan.row_split) or "none"


def _case(name: str, size: tuple[int, int], budget_of, steps: int, device: str) -> dict:
    zoo = ZOO[name]
    model = zoo.bench_model().to(device)
    x = torch.randn((1, 3, *size), generator=torch.Generator().manual_seed(1)).to(device)
    baseline = rewriter.measure_peak(model, x)
    budget = budget_of(model, baseline, size)
    row = {"model": name, "input": f"1x3x{size[0]}x{size[1]}", "baseline": baseline, "target": budget, "budget": budget}
    try:
        rewriter.optimize(model, budget, x, strategies=("recompute", "invert", "compress"))
        row["without"] = "fits"
    except rewriter.BudgetError as error:
        row["without"] = f"BudgetError, minimum {format_bytes(error.minimum_bytes)}"
    start = time.perf_counter()
    try:
        optimized = rewriter.optimize(model, budget, x)
        row["reached"] = "yes"
    except rewriter.BudgetError as error:  # reported, then measured at the smallest budget it names
        row["reached"] = f"no: minimum {format_bytes(error.minimum_bytes)} ({error.minimum_bytes / baseline:.3f}x)"
        row["budget"] = error.minimum_bytes
        optimized = rewriter.optimize(model, error.minimum_bytes, x)
    row["plan_seconds"] = time.perf_counter() - start
    plan = optimized.plan
    row["measured"] = rewriter.measure_peak(optimized, x)
    row["predicted"] = plan.predicted_peak_bytes
    row["chains"] = _chains(plan)
    row["others"] = f"{len(plan.segments)} recomputed, {len(plan.inverted)} inverted, {len(plan.compressed)} compressed"
    eager_time = _step_seconds(model, x, steps)
    ours_time = _step_seconds(optimized, x, steps)
    row["time_ratio"] = ours_time / eager_time
    row["eager_seconds"] = eager_time
    row["grad_error"] = gradient_error(model, optimized, x)
    if any(axis == "W" for *_, axis in plan.row_split):  # the same chains along H, for comparison
        along_h = dataclasses.replace(plan, decisions=tuple(
            dataclasses.replace(d, detail=(d.detail[0], "H", d.detail[2])) if d.strategy == "row_split" else d
            for d in plan.decisions))
        rows = rewriter.apply_plan(model, along_h)
        row["along_h"] = {"measured": rewriter.measure_peak(rows, x), "time_ratio": _step_seconds(rows, x, steps) / eager_time,
                          "chains": ", ".join(f"{tiles} row tiles" for _, tiles, _, _ in along_h.row_split)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fcn-size", type=int, default=1024)
    parser.add_argument("--wide-size", default="128x8192", help="HxW of the FCN's wide strip")
    parser.add_argument("--unet-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="*", choices=["highres_fcn", "highres_fcn_wide", "unet"],
                        default=["highres_fcn", "highres_fcn_wide", "unet"])
    args = parser.parse_args()
    torch.manual_seed(0)
    wide = tuple(int(n) for n in args.wide_size.lower().split("x"))
    if len(wide) != 2:
        parser.error(f"--wide-size {args.wide_size!r}: give HxW, such as 128x8192")

    def fcn_budget(model, baseline, size):
        channels = model.body[0].out_channels
        return int(2.5 * channels * size[0] * size[1] * 4)  # 2.5 full-size feature maps

    cases = {
        "highres_fcn": lambda: _case("highres_fcn", (args.fcn_size, args.fcn_size), fcn_budget, args.steps, args.device),
        "highres_fcn_wide": lambda: _case("highres_fcn", wide, fcn_budget, args.steps, args.device),
        "unet": lambda: _case("unet", (args.unet_size, args.unet_size), lambda model, baseline, size: baseline // 4,
                              args.steps, args.device),
    }
    rows = [cases[name]() for name in args.models]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    lines = [
        "# Row-split at high resolution",
        "",
        f"`python benchmarks/row_split_highres.py {' '.join(sys.argv[1:])}`"
        f" on {device}, torch {torch.__version__}. Peaks are measured (bytes beyond what was live when the step began);"
        " step time is the median of the steps, one run; gradient error is ||g - g_eager|| / ||g_eager||"
        " over all parameter gradients together (float32 both).",
        "",
        "| model | input | baseline peak | target budget | without row-split | target reached | budget run | measured peak | predicted | fits | step time vs eager | eager step | gradient error | row-split chains | other strategies | planning |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {format_bytes(r['baseline'])} | {format_bytes(r['target'])} "
            f"({r['target'] / r['baseline']:.2f}x) | {r['without']} | {r['reached']} | {format_bytes(r['budget'])} "
            f"({r['budget'] / r['baseline']:.3f}x) | {format_bytes(r['measured'])} | "
            f"{format_bytes(r['predicted'])} | {'yes' if r['measured'] <= r['budget'] else 'NO'} | "
            f"{r['time_ratio']:.2f}x | {r['eager_seconds']:.2f} s | {r['grad_error']:.1e} | {r['chains']} | {r['others']} | "
            f"{r['plan_seconds']:.0f} s |"
        )
    compared = [r for r in rows if "along_h" in r]
    if compared:
        lines += [
            "",
            "The same plans with their chains tiled along H instead of W (measured alike):",
            "",
            "| model | input | along W: measured peak | step time vs eager | along H: measured peak | step time vs eager | chains along H |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in compared:
            h = r["along_h"]
            lines.append(f"| {r['model']} | {r['input']} | {format_bytes(r['measured'])} | {r['time_ratio']:.2f}x | "
                         f"{format_bytes(h['measured'])} | {h['time_ratio']:.2f}x | {h['chains']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"row_split_highres_{'cuda' if args.device == 'cuda' else 'cpu'}.md").write_text(text)


if __name__ == "__main__":
    main()
