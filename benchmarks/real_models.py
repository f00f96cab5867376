"""Real models, as users bring them: torchvision, timm and MONAI networks, each captured,
predicted against its measured peak, optimized at 0.5 of eager (default strategies),
checked for exactness (one training step: outputs, every gradient, every buffer) and
timed; and the smallest budget `optimize` reaches. Writes
benchmarks/results/real_models_cpu.md. Packages that are missing are skipped (torchvision and
timm need torch 2.14.1 here: `pip install torch==2.14.1 torchvision==0.29.1 timm monai`).

    python benchmarks/real_models.py [--models resnet18 timm:convnext_atto monai:UNet ...] [--size 64]
    python benchmarks/real_models.py --volumes [--size 32]   # MONAI's networks in 3-D, 1x1xSIZE^3

With `--volumes`, MONAI's networks are built in 3-D with one input channel and run on a
batch of one volume (how 3-D segmentation trains; CPU kernels differ at batch 1), and the
list is every MONAI network below (MONAI_MORE too).
"""

import argparse
import copy
import logging
import platform
import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402
from benchmarks.timing import step_seconds  # noqa: E402

TORCHVISION = ["resnet18", "resnet50", "densenet121", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
               "regnet_y_400mf", "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet", "convnext_tiny", "swin_t",
               "segmentation.fcn_resnet50", "segmentation.deeplabv3_mobilenet_v3_large",
               "segmentation.lraspp_mobilenet_v3_large"]
TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnety_002", "densenet121",
        "vgg11_bn", "ghostnet_100", "mixnet_s", "rexnet_100", "dla34", "cspresnet50", "efficientnetv2_rw_t",
        "resnest14d", "dpn68"]
MONAI = ["UNet", "BasicUNet", "SegResNet", "DynUNet", "AttentionUnet", "DenseNet121"]
MONAI_MORE = ["HighResNet", "EfficientNetBN", "FlexibleUNet", "SegResNetDS", "SegResNetVAE", "BasicUNetPlusPlus",
              "VNet", "LocalNet", "SEResNet50"]


def _build(name: str, size: int = 64, dims: int = 2) -> torch.nn.Module:
    """A model by name: "resnet18" (torchvision), "timm:..." or "monai:..."; no weights.
    MONAI's take `dims` spatial dimensions of `size` (3 channels in 2-D, 1 in 3-D)."""
    if name.startswith("timm:"):
        import timm
        return timm.create_model(name[5:], pretrained=False, num_classes=10)
    if name.startswith("monai:"):
        from monai.networks import nets
        kind, d, c = name[6:], dims, 3 if dims == 2 else 1
        return {
            "UNet": lambda: nets.UNet(d, c, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2),
            "BasicUNet": lambda: nets.BasicUNet(spatial_dims=d, in_channels=c, out_channels=2),
            "SegResNet": lambda: nets.SegResNet(spatial_dims=d, in_channels=c, out_channels=2),
            "DynUNet": lambda: nets.DynUNet(d, c, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                                            upsample_kernel_size=[2, 2, 2]),
            "AttentionUnet": lambda: nets.AttentionUnet(d, c, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2)),
            "DenseNet121": lambda: nets.DenseNet121(spatial_dims=d, in_channels=c, out_channels=10),
            "HighResNet": lambda: nets.HighResNet(spatial_dims=d, in_channels=c, out_channels=2),
            "EfficientNetBN": lambda: nets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=d,
                                                          in_channels=c, num_classes=10),
            "FlexibleUNet": lambda: nets.FlexibleUNet(in_channels=c, out_channels=2, backbone="efficientnet-b0",
                                                      pretrained=False, spatial_dims=d),
            "SegResNetDS": lambda: nets.SegResNetDS(spatial_dims=d, in_channels=c, out_channels=2),
            "SegResNetVAE": lambda: nets.SegResNetVAE(input_image_size=(size,) * d, spatial_dims=d, in_channels=c,
                                                      out_channels=2),
            "BasicUNetPlusPlus": lambda: nets.BasicUNetPlusPlus(spatial_dims=d, in_channels=c, out_channels=2),
            "VNet": lambda: nets.VNet(spatial_dims=d, in_channels=c, out_channels=2),
            "LocalNet": lambda: nets.LocalNet(spatial_dims=d, in_channels=c, num_channel_initial=16,
                                              extract_levels=(0, 1, 2, 3), out_channels=d),
            "SEResNet50": lambda: nets.SEResNet50(spatial_dims=d, in_channels=c, num_classes=10),
        }[kind]()
    import torchvision
    module, _, short = name.rpartition(".")
    home = getattr(torchvision.models, module) if module else torchvision.models
    options = {"weights_backbone": None} if module else {"num_classes": 10}  # no backbone weights to download
    return getattr(home, short)(weights=None, **options)


def _available(names: list[str]) -> list[str]:
    found = []
    for package, prefix in (("torchvision", ""), ("timm", "timm:"), ("monai", "monai:")):
        try:
            __import__(package)
        except Exception as error:  # a package built for another torch fails at import, not only when missing
            print(f"skipping {package}: {type(error).__name__}: {error}", flush=True)
            continue
        found += [n for n in names if (n.startswith(prefix) if prefix else ":" not in n)]
    return found


def _exact(model: torch.nn.Module, optimized: torch.nn.Module, reference: torch.nn.Module, x) -> str:
    """One training step of each (the same seed, gradients zeroed first): outputs, every
    gradient, every buffer; in float64 where the plan tiles (tiles sum in another order: float32 rounding differs)."""
    if optimized.plan.row_split:
        model, reference, x = copy.deepcopy(model).double(), copy.deepcopy(reference).double(), x.double()
        optimized = rewriter.apply_plan(model, optimized.plan)
    outs = []
    for module in (reference, model):  # gradients zeroed, as the budget has them (accumulate adds into them)
        for p in module.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
    for module in (reference, optimized):
        torch.manual_seed(7)
        out = module(x)
        rewriter.measure.default_loss(out).backward()
        outs.append([t.detach() for t in rewriter.cost_models.storage_tracker.tensors_in(out)])
    pairs = list(zip(outs[0], outs[1]))
    pairs += [(p.grad, q.grad) for p, q in zip(reference.parameters(), model.parameters()) if p.grad is not None]
    pairs += list(zip(reference.buffers(), model.buffers()))
    worst = 0.0
    for a, b in pairs:
        try:
            torch.testing.assert_close(b, a)
        except AssertionError:
            worst = max(worst, float((a.double() - b.double()).abs().max()))
    return "yes" if worst == 0.0 else f"no (max diff {worst:.2g})"


def _out_of_time(signum, frame):
    raise TimeoutError


def _row(name: str, size: int, limit: int, volumes: bool = False) -> str:
    torch.manual_seed(0)
    model = _build(name, size, 3 if volumes else 2).train()
    reference = copy.deepcopy(model)
    x = torch.randn(1, 1, size, size, size) if volumes else torch.randn(2, 3, size, size)
    start = time.perf_counter()
    plan = rewriter.explain(model, x)
    explain_s = time.perf_counter() - start
    measured = rewriter.measure_peak(model, x)
    error = (plan.predicted_peak_bytes - measured) / measured
    captured = f"{len(plan.nodes)} nodes" + (f", {len(plan.opaque)} opaque" if plan.opaque else "")
    start = time.perf_counter()
    try:
        optimized = rewriter.optimize(model, int(0.5 * measured), x)
        fits = f"{rewriter.measure_peak(optimized, x) / measured:.3f}x measured"
    except rewriter.BudgetError as caught:
        optimized = rewriter.apply_plan(model, caught.plan)
        fits = f"BudgetError, {caught.minimum_bytes / measured:.3f}x"
    plan_s = time.perf_counter() - start
    exact = _exact(model, optimized, reference, x)
    times = step_seconds({"eager": reference, "rewriter": optimized}, x, rounds=5, loss_fn=rewriter.measure.default_loss)
    smallest = "?"
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(limit)
    try:
        rewriter.optimize(model, 1, x)
    except rewriter.BudgetError as caught:
        smallest = f"{caught.minimum_bytes / measured:.3f}x"
    except TimeoutError:
        smallest = f"not found in {limit} s"
    finally:
        signal.alarm(0)
    return (f"| {name} | {captured} | {measured:,} | {100 * error:+.2f}% | {explain_s:.1f} | {fits} | {plan_s:.1f} | "
            f"{times['rewriter'] / times['eager']:.2f} | {smallest} | {exact} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*",
                        default=TORCHVISION + [f"timm:{n}" for n in TIMM] + [f"monai:{n}" for n in MONAI])
    parser.add_argument("--volumes", action="store_true",
                        help="MONAI's networks in 3-D on 1x1xSIZE^3 (every one of MONAI and MONAI_MORE by default)")
    parser.add_argument("--size", type=int, default=None, help="inputs are 2x3xSIZExSIZE (default 64), or 1x1xSIZE^3 "
                                                                 "with --volumes (default 32)")
    parser.add_argument("--out", default=None, help="the results file, under benchmarks/results/ (default "
                                                    "real_models_cpu.md, or real_models_cpu_volumes.md)")
    parser.add_argument("--limit", type=int, default=300, help="seconds the search for the smallest budget may take")
    args = parser.parse_args()
    models_given = "--models" in sys.argv
    if args.volumes and not models_given:
        args.models = [f"monai:{n}" for n in MONAI + MONAI_MORE]
    if args.volumes and any(not n.startswith("monai:") for n in args.models):
        parser.error("--volumes builds MONAI's networks only (monai:NAME)")
    args.size = args.size or (32 if args.volumes else 64)
    args.out = args.out or ("real_models_cpu_volumes.md" if args.volumes else "real_models_cpu.md")
    shape = f"1x1x{args.size}x{args.size}x{args.size}" if args.volumes else f"2x3x{args.size}x{args.size}"
    logging.disable(logging.WARNING)  # opaque leaves and fallbacks are counted in the table
    lines = [
        f"# Real models on {platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/real_models.py{' --volumes' if args.volumes else ''} --size {args.size} "
        f"--limit {args.limit}{' --models ' + ' '.join(args.models) if models_given else ''}`."
        f" Inputs {shape}, train mode,",
        "no weights. Peaks in bytes as `measure_peak` counts them; 0.5x: `optimize` at half the measured peak (default",
        "strategies; on BudgetError, the plan the error names); plan s: its planning wall time; step: median training step",
        "time over eager's (5 rounds, in turns); smallest: `BudgetError.minimum_bytes` over the measured peak (its",
        f"search stopped after {args.limit} s); exact:",
        "one step's outputs, gradients and buffers `assert_close` to eager's (in float64 where the plan row-splits).",
        "",
        "| model | captured | measured | predicted | explain s | 0.5x | plan s | step | smallest | exact |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for name in _available(args.models):
        try:
            lines.append(_row(name, args.size, args.limit, args.volumes))
        except Exception as error:  # the table says which models fail and how
            lines.append(f"| {name} | failed: {type(error).__name__}: {str(error)[:160]} | | | | | | | | |")
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / args.out
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
