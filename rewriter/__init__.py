"""rewriter: fit CNN training into a memory budget stated in bytes.

Public names:
  measure_peak(model, example_inputs)  bytes of peak activation memory of one real training step
  explain(model, example_inputs)       the all-keep Plan: per-node saved bytes and the predicted peak
  largest_batch(model, inputs, budget) the largest batch whose predicted peak fits a budget
  Plan, NodePlan                       the plan value (table, JSON round-trip)
  RewriterError, CaptureError, InputError
"""

from rewriter.errors import CaptureError, InputError, RewriterError
from rewriter.explain import explain, largest_batch
from rewriter.measure import measure_peak
from rewriter.plan import NodePlan, Plan

__all__ = [
    "measure_peak",
    "explain",
    "largest_batch",
    "Plan",
    "NodePlan",
    "RewriterError",
    "CaptureError",
    "InputError",
]
