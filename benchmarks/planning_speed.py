"""How long planning takes, phase by phase: `optimize` at 0.5 and 0.3 of eager's peak
(default strategies, and recompute alone) and `explain`, on the ResNet-50-style net
(8x3x128x128), DenseNet-BC (32x3x32x32) and a 1,000-node BatchNorm/LeakyReLU/conv
chain. Phases (each net of the phases inside it): capture, profile (the graph and its
rewrites on fake tensors), time nodes (each node's forward, timed once), price,
solve, verify (the chosen plans' rewritten graphs profiled). Writes
benchmarks/results/planning_speed_cpu.md.

    python benchmarks/planning_speed.py [--models resnet50 densenet_bc chain1000] [--fractions 0.5 0.3]
                                        [--without-repeated-records] [--out FILE]

`--without-repeated-records` profiles every node on fake tensors, none taking the record
of an earlier node of its kind (cost_models.repeated_nodes): to compare, in one session.
"""

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402
from rewriter.cost_models import profile  # noqa: E402
from examples.zoo.densenet import DenseNetBC  # noqa: E402
from examples.zoo.plain import BNLeakyChain  # noqa: E402
from examples.zoo.resnet import resnet50_style  # noqa: E402

CASES = {
    "resnet50": (resnet50_style, (8, 3, 128, 128)),
    "densenet_bc": (DenseNetBC, (32, 3, 32, 32)),
    "chain1000": (lambda: BNLeakyChain(channels=8, depth=333), (2, 3, 16, 16)),
}
PHASES = ("capture", "profile", "time nodes", "price", "solve", "verify")


class _Phases(logging.Handler):
    """Keeps the phase seconds `optimize` logs when it ends."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "phases"):
            self.seconds = record.phases


def _row(model_name: str, call: str, outcome: str, wall: float, phases: dict[str, float]) -> str:
    cells = [f"{phases.get(p, 0.0):.2f}" for p in PHASES]
    return f"| {model_name} | {call} | {outcome} | {wall:.1f} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(CASES))
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.5, 0.3])
    parser.add_argument("--without-repeated-records", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "planning_speed_cpu.md")
    args = parser.parse_args()
    profile.REPEATED_RECORDS = not args.without_repeated_records
    handler = _Phases()
    logger = logging.getLogger("rewriter.pipeline")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines = [
        f"# Planning speed on {platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/planning_speed.py{' --without-repeated-records' if args.without_repeated_records else ''}`."
        " Wall seconds of the whole call; phase seconds as",
        "`optimize` logs them (each net of the phases inside it). `explain` is one capture and one profile.",
        "",
        "| model | call | outcome | wall s | " + " | ".join(PHASES) + " |",
        "|---|---|---|---:|" + "---:|" * len(PHASES),
    ]
    for name in args.models:
        build, shape = CASES[name]
        torch.manual_seed(0)
        model = build().train()
        x = torch.randn(shape)
        start = time.perf_counter()
        plan = rewriter.explain(model, x)
        lines.append(_row(name, "explain", f"{len(plan.nodes) - 1} nodes", time.perf_counter() - start, {}))
        print(lines[-1], flush=True)
        baseline = rewriter.measure_peak(model, x)
        for strategies in (None, ("recompute",)):
            for fraction in args.fractions:
                call = f"optimize {fraction} {'default' if strategies is None else '+'.join(strategies)}"
                handler.seconds = {}
                start = time.perf_counter()
                try:
                    optimized = rewriter.optimize(model, int(baseline * fraction), x, strategies=strategies)
                    outcome = f"fits, {optimized.plan.predicted_peak_bytes / baseline:.3f}x predicted"
                except rewriter.BudgetError as error:
                    outcome = f"BudgetError, minimum {error.minimum_bytes / baseline:.3f}x"
                lines.append(_row(name, call, outcome, time.perf_counter() - start, handler.seconds))
                print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
