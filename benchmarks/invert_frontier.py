"""Invert against recompute: memory flat in depth, bytes per pixel, and step time.

1. RevNet-style couplings (the zoo's RevNetStyle) at depth 4 and 16, same width and
   input: eager peak, and the peak at the smallest budget `optimize` reaches with
   invert alone and with every strategy; bytes per input pixel (peak / (batch x H x W))
   beside the 352 bytes/pixel of Hascoet et al. (2019).
2. The BatchNorm -> LeakyReLU -> conv chain at a budget both strategies reach:
   `optimize` with recompute alone, invert alone, and both; measured peak and step
   time (median of 9 steps after a warm-up, the variants taking turns) as ratios to eager.
Peaks: rewriter.measure_peak (ARCHITECTURE.md's protocol). Writes
benchmarks/results/invert_frontier_<device>.md and prints it.

    python benchmarks/invert_frontier.py            # CPU sizes; --device cuda on a GPU
"""

import argparse
import platform
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402
from benchmarks.timing import step_seconds  # noqa: E402
from examples.zoo.plain import BNLeakyChain  # noqa: E402
from examples.zoo.revnet import RevNetStyle  # noqa: E402

PAPER_BYTES_PER_PIXEL = 352
SIZES = {  # device: (RevNet channels, input), (chain channels, depth, input), chain budget fraction
    "cpu": ((32, (8, 3, 64, 64)), (32, 8, (16, 3, 64, 64)), 0.6),
    "cuda": ((64, (64, 3, 128, 128)), (64, 16, (64, 3, 128, 128)), 0.6),
}


def lowest(model: nn.Module, x: torch.Tensor, strategies) -> nn.Module:
    """`optimize` at the smallest budget it reaches with these strategies."""
    try:
        return rewriter.optimize(model, 1, x, strategies=strategies)
    except rewriter.BudgetError as error:
        return rewriter.optimize(model, error.minimum_bytes, x, strategies=strategies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    (rev_channels, rev_shape), (chain_channels, chain_depth, chain_shape), fraction = SIZES[device.type]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [
        f"# Invert on {name}",
        "",
        f"torch {torch.__version__}. Command: `python benchmarks/invert_frontier.py --device {args.device}`.",
        "Peak: rewriter.measure_peak. Time: median of 9 steps after a warm-up, the variants taking turns, as a ratio to eager.",
        "",
        f"## RevNet-style couplings, width {rev_channels}, input {'x'.join(map(str, rev_shape))}",
        "",
        "| depth | eager peak | invert only: peak | bytes / pixel | all strategies: peak | bytes / pixel | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    pixels = rev_shape[0] * rev_shape[2] * rev_shape[3]
    peaks = {}
    for depth in (4, 16):
        torch.manual_seed(0)
        model = RevNetStyle(channels=rev_channels, depth=depth).train().to(device)
        x = torch.randn(rev_shape, device=device)
        eager = rewriter.measure_peak(model, x)
        inverted = lowest(model, x, "invert")
        everything = lowest(model, x, None)
        peaks[depth] = (rewriter.measure_peak(inverted, x), rewriter.measure_peak(everything, x))
        plan = everything.plan
        lines.append(
            f"| {depth} | {eager / 2**20:.1f} MiB | {peaks[depth][0] / 2**20:.1f} MiB | {peaks[depth][0] / pixels:.0f} | "
            f"{peaks[depth][1] / 2**20:.1f} MiB | {peaks[depth][1] / pixels:.0f} | "
            f"{_chosen(plan)} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        f"Depth 16 against depth 4, invert only: {peaks[16][0] / peaks[4][0]:.3f}x the memory "
        f"(4x the couplings). The paper reports {PAPER_BYTES_PER_PIXEL} bytes/pixel for its reversible "
        "designs (a different network and input; read the column as the same unit, not the same experiment).",
        "",
        f"## BatchNorm -> LeakyReLU -> conv chain, width {chain_channels}, depth {chain_depth}, "
        f"input {'x'.join(map(str, chain_shape))}, budget {fraction} x eager",
        "",
        "| strategies | measured peak | peak / eager | time / eager | est. seconds added | chosen |",
        "|---|---|---|---|---|---|",
    ]
    torch.manual_seed(0)
    model = BNLeakyChain(channels=chain_channels, depth=chain_depth).train().to(device)
    x = torch.randn(chain_shape, device=device)
    eager_peak = rewriter.measure_peak(model, x)
    budget = int(fraction * eager_peak)
    variants, rows = {"eager": model}, {}
    for strategies in ("recompute", "invert", None):
        label = strategies or "all (default)"
        try:
            variants[label] = rewriter.optimize(model, budget, x, strategies=strategies)
        except rewriter.BudgetError as error:
            rows[label] = f"| {label} | BudgetError: smallest {error.minimum_bytes / eager_peak:.2f} x | | | | |"
    seconds = step_seconds(variants, x)
    lines.append(f"| eager | {eager_peak / 2**20:.1f} MiB | 1.00 | 1.00 | | |")
    for label in ("recompute", "invert", "all (default)"):
        if label in rows:
            lines.append(rows[label])
            continue
        optimized = variants[label]
        peak, plan = rewriter.measure_peak(optimized, x), optimized.plan
        lines.append(
            f"| {label} | {peak / 2**20:.1f} MiB | {peak / eager_peak:.2f} | {seconds[label] / seconds['eager']:.2f} | "
            f"{sum(n.seconds_added for n in plan.nodes):.4f} | "
            f"{_chosen(plan)} |"
        )
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / f"invert_frontier_{device.type}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out.relative_to(ROOT)}")


def _chosen(plan) -> str:
    return (f"{len(plan.inverted)} chains inverted, {len(plan.segments)} segments recomputed, {len(plan.spans)} spans, "
            f"{len(plan.compressed)} nodes compressed")


if __name__ == "__main__":
    main()
