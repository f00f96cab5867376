"""Where does the training memory of a ResNet go, and how do we make it fit? The main
example of `rewriter`.

Measures the peak activation memory of one real training step of the zoo's
ResNet-18-style model, predicts it from the graph before any step (fake tensors),
prints the per-node table of what the backward keeps, answers how large a batch
would fit a budget, then rewrites the model to train in half its peak and measures
that (or, if half is out of reach, at the least budget a plan reaches). Run:
python examples/explain_resnet.py
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the zoo lives beside this file

import rewriter  # noqa: E402
from examples.zoo import ZOO  # noqa: E402
from rewriter.plan import format_bytes  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    zoo = ZOO["resnet18"]
    model, images = zoo.test_model(), zoo.test_input(batch=8)

    plan = rewriter.explain(model, images)
    measured = rewriter.measure_peak(model, images)
    print(plan)
    print()
    print(f"measured peak  {format_bytes(measured):>12}  ({measured:,} bytes)")
    print(f"predicted peak {format_bytes(plan.predicted_peak_bytes):>12}  ({plan.predicted_peak_bytes:,} bytes), "
          f"off by {plan.predicted_peak_bytes - measured:+,} bytes")
    budget = 32 * 2**20
    print(f"largest batch whose predicted step fits {format_bytes(budget)}: "
          f"{rewriter.largest_batch(model, images, budget)}")

    budget = measured // 2
    print()
    try:
        optimized = rewriter.optimize(model, budget, images)
    except rewriter.BudgetError as error:  # says the least budget a plan reaches: take that
        print(f"BudgetError: {error}")
        budget = error.minimum_bytes
        optimized = rewriter.optimize(model, budget, images)
    plan = optimized.plan
    print(f"optimize(model, {budget:,} bytes): {len(plan.segments)} segments recomputed, {len(plan.spans)} spans, "
          f"{len(plan.inverted)} chains inverted, {len(plan.compressed)} nodes compressed, "
          f"{len(plan.row_split)} chains row-split, {len(plan.accumulated)} weight gradients into .grad")
    print(f"  predicted peak {format_bytes(optimized.plan.predicted_peak_bytes):>12}")
    print(f"  measured peak  {format_bytes(rewriter.measure_peak(optimized, images)):>12}  (budget {format_bytes(budget)})")


if __name__ == "__main__":
    main()
