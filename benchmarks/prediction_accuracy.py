"""Predicted against measured peak activation memory for every zoo model.

For each model: the cost model's prediction (fake tensors, before any real step),
the measured peak of one real training step (ARCHITECTURE.md's protocol), their
difference, and where the predicted peak falls. Writes a markdown table to
benchmarks/results/prediction_accuracy_<size>.md (_<size>_cuda.md on a GPU) and prints it.

    python benchmarks/prediction_accuracy.py             # test sizes, two batch sizes
    python benchmarks/prediction_accuracy.py --size bench
    python benchmarks/prediction_accuracy.py --device cuda   # the CUDA caching allocator's peak
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402
from examples.zoo import ZOO  # noqa: E402


def rows(size: str, device: torch.device):
    for name, zoo in ZOO.items():
        if size == "test":
            shapes = [zoo.test_shape, (2 * zoo.test_shape[0], *zoo.test_shape[1:])]
        else:
            shapes = [zoo.bench_shape]
        for shape in shapes:
            model = (zoo.test_model() if size == "test" else zoo.bench_model()).to(device)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
            start = time.perf_counter()
            plan = rewriter.explain(model, x)
            seconds = time.perf_counter() - start
            measured = rewriter.measure_peak(model, x)
            error = plan.predicted_peak_bytes - measured
            yield (name, "x".join(map(str, shape)), plan.predicted_peak_bytes, measured, error,
                   100 * error / measured, plan.peak_at, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["test", "bench"], default="test")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, measured with the caching allocator's peak"
    else:
        where = f"{platform.machine()} CPU, measured with the storage-counting dispatch mode"
    header = "| model | input | predicted (bytes) | measured (bytes) | error (bytes) | error | predicted peak at | explain (s) |"
    lines = [
        f"# Predicted vs measured peak activation memory ({args.size} sizes)",
        "",
        f"torch {torch.__version__}, {where}.",
        "Command: `python benchmarks/prediction_accuracy.py" + (" --size bench" if args.size == "bench" else "")
        + (f" --device {args.device}`" if device.type != "cpu" else "`"),
        "",
        header,
        "|" + "---|" * 8,
    ]
    for name, shape, predicted, measured, error, percent, where, seconds in rows(args.size, device):
        lines.append(f"| {name} | {shape} | {predicted:,} | {measured:,} | {error:+,} | {percent:+.3f}% | {where} | {seconds:.2f} |")
        print(lines[-1], flush=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    out = ROOT / "benchmarks" / "results" / f"prediction_accuracy_{args.size}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
