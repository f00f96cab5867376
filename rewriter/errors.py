"""The exceptions `rewriter` raises: one small hierarchy, each naming the value and the fix."""

__all__ = ["RewriterError", "CaptureError", "InputError", "BudgetError"]


class RewriterError(Exception):
    """Base class of every error this library raises on purpose."""


class CaptureError(RewriterError):
    """The model could not be captured as a graph at all (its top level is not traceable)."""


class InputError(RewriterError, ValueError):
    """An argument does not fit: wrong type, a model in eval mode, inputs the model rejects."""


class BudgetError(RewriterError, ValueError):
    """No plan fits the budget. `minimum_bytes` is the smallest budget a plan reaches;
    `plan` is that plan (its `budget_bytes` is `minimum_bytes`), found and verified
    while searching: `rewriter.apply_plan(model, error.plan)` builds it without
    searching again (None where the error comes from elsewhere)."""

    def __init__(self, message: str, minimum_bytes: int, plan=None):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes
        self.plan = plan

    def __reduce__(self):  # pickles whole (across processes, say)
        return type(self), (self.args[0], self.minimum_bytes, self.plan)
