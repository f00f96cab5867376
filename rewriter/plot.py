"""`Plan.plot`: live activation bytes over one training step, eager against the plan.

The x axis is the step, forward on [0, 1] and backward on [1, 2], each graph's steps
spread evenly over its half (the rewritten graph has other nodes than the eager one).
Each of the plan's steps is a point coloured by the strategy of its node; the budget
is a dashed line; the plan's peak is marked and named by its step. Drawn on a
matplotlib Figure of its own (Agg), so the caller's pyplot state is untouched.
"""

from __future__ import annotations

from pathlib import Path

from rewriter.errors import InputError

__all__ = ["plot_plan"]

_CALLS = {"rewriter_recompute_": "recompute", "rewriter_span_": "recompute", "rewriter_invert_": "invert"}
_COLOURS = {"keep": "#8c8c8c", "recompute": "#1f77b4", "invert": "#2ca02c", "compress": "#d62728",
            "row_split": "#9467bd"}


def _positions(timeline) -> list[float]:
    """x of each step: forward steps over [0, 1], backward steps over [1, 2]."""
    forward = [i for i, (where, _) in enumerate(timeline) if where.startswith("forward")]
    backward = [i for i, (where, _) in enumerate(timeline) if not where.startswith("forward")]
    x = [0.0] * len(timeline)
    for part, start in ((forward, 0.0), (backward, 1.0)):
        for k, i in enumerate(part):
            x[i] = start + (k + 0.5) / len(part)
    return x


def plot_plan(plan, path: str | Path | None = None):
    """The Figure (see the module's doc), saved to `path` as PNG if given."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise InputError("Plan.plot needs matplotlib: pip install 'rewriter[plot]' (or matplotlib)") from error
    if not plan.timeline:
        raise InputError("this plan has no step timeline (plans made before 2026-12-07 do not): make it again to plot it")
    mib = 2**20
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if plan.baseline_timeline:
        axes.plot(_positions(plan.baseline_timeline), [b / mib for _, b in plan.baseline_timeline], color="#bbbbbb",
                  linewidth=1.5, label=f"eager: every saved tensor kept (peak {plan.baseline_peak_bytes / mib:.2f} MiB)")
    x, live = _positions(plan.timeline), [b / mib for _, b in plan.timeline]
    axes.plot(x, live, color="black", linewidth=1, label=f"this plan (peak {plan.predicted_peak_bytes / mib:.2f} MiB)")
    strategy = {n.label: n.strategy for n in plan.nodes} | {n.node: n.strategy for n in plan.nodes}
    used = {}
    for xi, yi, (where, _) in zip(x, live, plan.timeline):
        label = where.split(" ", 1)[-1]
        call = next((name for prefix, name in _CALLS.items() if label.startswith(prefix)), None)  # a rewrite's own node
        used.setdefault(call or strategy.get(label, "keep"), []).append((xi, yi))
    for name, points in sorted(used.items()):
        axes.scatter(*zip(*points), s=9, color=_COLOURS.get(name, "#ff7f0e"), zorder=3, label=f"step of a node: {name}")
    if plan.budget_bytes is not None:
        axes.axhline(plan.budget_bytes / mib, color="#d62728", linestyle="--", label=f"budget ({plan.budget_bytes / mib:.2f} MiB)")
    peak = max(range(len(live)), key=live.__getitem__)
    axes.annotate(f"peak: {plan.timeline[peak][0]}", (x[peak], live[peak]), xytext=(0, 12), textcoords="offset points",
                  ha="center", fontsize=8, arrowprops={"arrowstyle": "-", "color": "black"})
    axes.axvline(1.0, color="#dddddd", linewidth=1)
    axes.set_xticks([0.5, 1.5], ["forward", "backward"])
    axes.set_xlim(0, 2)
    axes.set_ylim(0, None)
    axes.set_ylabel("live activation memory (MiB)")
    axes.set_title(f"one training step, inputs {', '.join('x'.join(map(str, s)) for s in plan.input_shapes)}")
    axes.legend(fontsize=8, loc="upper left")
    if path is not None:
        figure.savefig(path, format="png", dpi=110)
    return figure
