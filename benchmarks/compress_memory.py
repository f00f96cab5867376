"""Compress: bytes saved, lossless and lossy, measured.

1. Every zoo model at its test size: eager peak; the peak with every lossless
   compress group applied (bit-packed dropout masks and ReLU masks, one-byte max-pool
   offsets, shape-only average pools); and the smallest budget `optimize` reaches with
   recompute alone and with recompute and lossless compression.
2. The ResNet-50-style model: eager peak against every group compressed at 8, 4 and
   2 bits (with the lossless masks), as measured peaks and as the bytes the backward
   keeps (the profile's saved tensors); the goal is 6x less at 4 bits.
Peaks: rewriter.measure_peak (ARCHITECTURE.md's protocol). Writes
benchmarks/results/compress_memory_<device>.md and prints it.

    python benchmarks/compress_memory.py            # --resnet-batch 8 --resnet-size 224 by default
"""

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402
from rewriter.cost_models.saved import saved_tensors  # noqa: E402
from examples.zoo import ZOO  # noqa: E402
from rewriter.passes import compress  # noqa: E402
from rewriter.measure import default_loss  # noqa: E402
from rewriter.plan import format_bytes  # noqa: E402
from rewriter.report import profile_model_graph  # noqa: E402
from rewriter.trace import capture  # noqa: E402


def compressed(model, x, bits=None):
    """`model` with every compress group applied (lossy kinds at `bits`), and the
    bytes its backward keeps before and after (the profile's saved tensors)."""
    captured = capture(model)
    base = profile_model_graph(model, captured.gm, (x,), default_loss, captured.opaque, {})
    lossy = {n: bits for n in compress.lossy_nodes(captured.gm)} if bits else {}
    groups = compress.groups(captured.gm, base, lossy)
    forms = {n: compress.form_of(k, lossy.get(n)) for g in groups for n, k in zip(g.nodes, g.kinds)}
    gm = compress.rewrite(captured.gm, forms)
    after = profile_model_graph(model, gm, (x,), default_loss, captured.opaque, {})
    kept = [sum(t.nbytes for t in saved_tensors(c)) for c in (base, after)]
    return gm, kept


def smallest(model, x, strategies) -> int:
    """The smallest budget `optimize` reaches with these strategies."""
    try:
        return rewriter.optimize(model, 1, x, strategies=strategies).plan.predicted_peak_bytes
    except rewriter.BudgetError as error:
        return error.minimum_bytes


def zoo_table(names) -> list[str]:
    lines = [
        "| model | input | eager peak | lossless compress | saved | smallest budget, recompute | with lossless compress | saved |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        zoo = ZOO[name]
        model, x = zoo.test_model(), zoo.test_input()
        eager = rewriter.measure_peak(model, x)
        gm, _ = compressed(model, x)
        lossless = rewriter.measure_peak(gm, x)
        alone = smallest(model, x, "recompute")
        both = smallest(model, x, ("recompute", "compress"))
        lines.append(
            f"| {name} | {'x'.join(map(str, x.shape))} | {format_bytes(eager)} | {format_bytes(lossless)} | "
            f"{100 * (eager - lossless) / eager:.1f}% | {format_bytes(alone)} | {format_bytes(both)} | "
            f"{100 * (alone - both) / alone:.1f}% |"
        )
        print(lines[-1], flush=True)
    return lines


def resnet_table(batch: int, size: int) -> list[str]:
    zoo = ZOO["resnet50"]
    model = zoo.build_bench().train()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    eager = rewriter.measure_peak(model, x)
    lines = [
        f"ResNet-50-style (`build_bench`), input {batch}x3x{size}x{size}.",
        "",
        "| compress | measured peak | eager / this | kept for backward | eager / this |",
        "|---|---:|---:|---:|---:|",
    ]
    gm, (kept_eager, kept) = compressed(model, x)
    lines.append(f"| none (eager) | {format_bytes(eager)} | 1.00x | {format_bytes(kept_eager)} | 1.00x |")
    rows = [("lossless only", None), ("8-bit + lossless", 8), ("4-bit + lossless", 4), ("2-bit + lossless", 2)]
    for label, bits in rows:
        gm, (_, kept) = compressed(model, x, bits)
        peak = rewriter.measure_peak(gm, x)
        lines.append(f"| {label} | {format_bytes(peak)} | {eager / peak:.2f}x | {format_bytes(kept)} | {kept_eager / kept:.2f}x |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resnet-batch", type=int, default=8)
    parser.add_argument("--resnet-size", type=int, default=224)
    args = parser.parse_args()
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [
        f"# Compress on {machine}",
        "",
        f"torch {torch.__version__}. Command: `python benchmarks/compress_memory.py --resnet-batch {args.resnet_batch} "
        f"--resnet-size {args.resnet_size}`. Peaks: rewriter.measure_peak (CPU: storages counted by a dispatch mode).",
        "",
        "## Lossless compression across the zoo (test sizes)",
        "",
        "\"lossless compress\": every lossless group applied (gradients bit-for-bit equal to eager, tested). "
        "\"smallest budget\": the least budget `optimize` finds a verified plan for.",
        "",
    ]
    lines += zoo_table(sorted(ZOO))
    lines += ["", "## Lossy compression, ResNet-50-style", ""]
    lines += resnet_table(args.resnet_batch, args.resnet_size)
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "compress_memory_cpu.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
