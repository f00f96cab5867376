"""How long the solver takes on a graph of about 500 nodes (profiling not included).

Builds the zoo's BatchNorm -> LeakyReLU -> conv chain 166 blocks deep (503 nodes),
profiles it and its rewrites once, then times `solve` alone, from budgets where a few
choices suffice to the lowest reachable: with recompute segments alone, and with the
invert chains beside them (the default). Writes benchmarks/results/solver_speed.md.

    python benchmarks/solver_speed.py
"""

import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewriter.cost_models.simulate import simulate  # noqa: E402
from examples.zoo.plain import BNLeakyChain  # noqa: E402
from rewriter.measure import default_loss  # noqa: E402
from rewriter.pipeline import _Planner  # noqa: E402
from rewriter.solve import solve  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model = BNLeakyChain(channels=8, depth=166).train()
    x = torch.randn(2, 3, 16, 16)
    lines = [f"# Solver speed on {platform.machine()} CPU, torch {torch.__version__}", ""]
    for strategies in (("recompute",), ("recompute", "invert")):
        start = time.perf_counter()
        planner = _Planner(model, (x,), default_loss, strategies)
        planner.profile_modes()
        choices, options = planner.choices()
        nodes = len(planner.base.nodes) - 1  # less the loss
        setup = time.perf_counter() - start
        baseline = simulate(planner.base).peak_bytes

        def peak(assignment):
            return simulate(planner.composed({k: options[k][v - 1] for k, v in assignment.items()})).peak_bytes

        lines += [
            f"## strategies {strategies}",
            "",
            f"BNLeakyChain(depth=166): {nodes} graph nodes, {len(planner.segments)} segments and "
            f"{len(planner.chains)} invert chains, {len(choices)} choices; profiling took {setup:.1f} s (not timed below).",
            "Command: `python benchmarks/solver_speed.py`",
            "",
            "| budget / baseline | fits | choices taken | peak evaluations | solve seconds |",
            "|---|---|---|---|---|",
        ]
        for fraction in (0.9, 0.7, 0.5, 0.4):
            start = time.perf_counter()
            solution = solve(choices, peak, int(fraction * baseline))
            seconds = time.perf_counter() - start
            lines.append(f"| {fraction} | {'yes' if solution.fits else 'no'} | {len(solution.assignment)} | {solution.evaluations} | {seconds:.2f} |")
            print(lines[-1], flush=True)
        lines.append("")
    out = ROOT / "benchmarks" / "results" / "solver_speed.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
