"""Lossy compression on real data: a zoo ResNet-18-style CNN trained on scikit-learn's
digits (8x8 images upsampled to 32x32), exact and with every compress group at 8, 4
and 2 bits (convolution, linear and BatchNorm inputs quantized, ReLU and pooling
state lossless). Same initial weights, same batches, fixed seed and epoch count; the
forward is exact in every variant, only what the backward reads is approximate.
The learning rate decays to zero on a cosine over the run, so a run ends settled
rather than wherever the last steps of a constant rate left it. Reports the final
test accuracy of each, averaged over several seeds (one test image is 0.28 points),
and each width's difference from exact with its standard error. The training is
chaotic: a control row, exact but with every parameter gradient multiplied by
1 + 1e-7 x noise (about one float32 rounding step), lands as far from the exact runs
of the same seeds as a different seed would. So a compressed run is compared with
the exact runs as an independent sample (the standard error of a difference of two
means), not paired by seed. The goal: 4 bits within 0.5 points of exact.
Writes benchmarks/results/compress_digits_cpu.md and prints it.

    pip install scikit-learn && python benchmarks/compress_digits.py   # --epochs 12 --seeds 20 by default
"""

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.zoo.resnet import resnet18_style  # noqa: E402
from rewriter.passes import compress  # noqa: E402
from rewriter.measure import default_loss  # noqa: E402
from rewriter.report import profile_model_graph  # noqa: E402
from rewriter.trace import capture  # noqa: E402

BATCH = 64


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images (N x 3 x 32 x 32, standardised) and labels; a fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    return images[train].contiguous(), labels[train], images[test].contiguous(), labels[test]


def model_for(bits: int | None, example: torch.Tensor, seed: int):
    """The seed's initial weights, as the eager model or with every group compressed."""
    torch.manual_seed(seed)
    model = resnet18_style(width=16, num_classes=10).train()
    if bits is None:
        return model, model
    captured = capture(model)
    base = profile_model_graph(model, captured.gm, (example,), default_loss, captured.opaque, {})
    lossy = {n: bits for n in compress.lossy_nodes(captured.gm)}
    groups = compress.groups(captured.gm, base, lossy)
    forms = {n: compress.form_of(k, lossy.get(n)) for g in groups for n, k in zip(g.nodes, g.kinds)}
    return model, compress.rewrite(captured.gm, forms)


PERTURBATION = 1e-7  # the control's relative gradient noise: about float32's rounding step


def train(bits: int | None, data, epochs: int, seed: int, perturb: bool = False) -> tuple[float, float]:
    """Final test accuracy (percent) and seconds of training; `perturb`: every parameter
    gradient multiplied by 1 + PERTURBATION x standard normal noise (the control)."""
    train_x, train_y, test_x, test_y = data
    model, runner = model_for(bits, train_x[:BATCH], seed)
    if perturb:
        noise = torch.Generator().manual_seed(2000 + seed)
        for p in model.parameters():
            p.register_hook(lambda g: g * (1 + PERTURBATION * torch.randn(g.shape, generator=noise)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * (len(train_y) // BATCH))
    generator = torch.Generator().manual_seed(1000 + seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for i in range(0, len(order) - BATCH + 1, BATCH):
            batch = order[i:i + BATCH]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(runner(train_x[batch]), train_y[batch]).backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    runner.eval()
    with torch.no_grad():
        accuracy = (runner(test_x).argmax(1) == test_y).float().mean().item() * 100
    return accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    data = digits()
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [
        f"# Lossy compression on digits, {machine}",
        "",
        f"torch {torch.__version__}. Command: `python benchmarks/compress_digits.py --epochs {args.epochs} --seeds {args.seeds}`. "
        f"ResNet-18-style, width 16; {len(data[1])} training and {len(data[3])} test images (scikit-learn digits, "
        f"upsampled to 32x32); SGD lr 0.05 decaying to 0 on a cosine, momentum 0.9, batch {BATCH}, {args.epochs} epochs; "
        f"seeds 0 to {args.seeds - 1} (initial weights and batch order; every variant runs the same seeds). "
        "Accuracy ± the standard error of the mean over seeds; points from exact ± the standard error of that "
        f"difference of means. Control: exact, every gradient multiplied by 1 + {PERTURBATION:g} x noise.",
        "",
        "| backward reads | mean test accuracy | lowest / highest | points from exact | training seconds per run |",
        "|---|---:|---:|---:|---:|",
    ]

    def error(values):
        return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan

    exact = None
    variants = (("exact", None, False), (f"control: exact, gradients x (1 + {PERTURBATION:g} noise)", None, True),
                ("8-bit", 8, False), ("4-bit", 4, False), ("2-bit", 2, False))
    for label, bits, perturb in variants:
        runs = [train(bits, data, args.epochs, seed, perturb) for seed in range(args.seeds)]
        accuracies = [a for a, _ in runs]
        exact = accuracies if exact is None else exact
        apart = math.hypot(error(accuracies), error(exact)) if accuracies is not exact else 0.0
        lines.append(f"| {label} | {statistics.mean(accuracies):.2f}% ± {error(accuracies):.2f} | "
                     f"{min(accuracies):.2f}% / {max(accuracies):.2f}% | "
                     f"{statistics.mean(accuracies) - statistics.mean(exact):+.2f} ± {apart:.2f} | "
                     f"{statistics.mean(s for _, s in runs):.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "compress_digits_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
