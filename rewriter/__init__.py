"""rewriter: fit CNN training into a memory budget stated in bytes.

Public names:
  optimize(model, budget_bytes, example_inputs)  a module whose training step fits the budget, with .plan
  apply_plan(model, plan)              rewrite as a stored plan says, without solving
  save(module, folder), load(folder)   the rewritten module as readable Python, weights and plan
  measure_peak(model, example_inputs)  bytes of peak activation memory of one real training step
  explain(model, example_inputs)       the all-keep Plan: per-node saved bytes and the predicted peak
  largest_batch(model, inputs, budget) the largest batch whose predicted peak fits a budget
  largest_input(model, inputs, budget) the largest square image or cubic patch whose predicted peak fits
  Plan, NodePlan                       the plan value (table, JSON round-trip)
  RewriterError, CaptureError, InputError, BudgetError
"""

from rewriter.errors import BudgetError, CaptureError, InputError, RewriterError
from rewriter.export import load, save
from rewriter.report import explain, largest_batch, largest_input
from rewriter.measure import measure_peak
from rewriter.pipeline import apply_plan, optimize
from rewriter.plan import NodePlan, Plan

__all__ = [
    "optimize",
    "apply_plan",
    "save",
    "load",
    "measure_peak",
    "explain",
    "largest_batch",
    "largest_input",
    "Plan",
    "NodePlan",
    "RewriterError",
    "CaptureError",
    "InputError",
    "BudgetError",
]
