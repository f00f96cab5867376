"""The Plan: what every node's saved memory costs and what to do about it, as a value.

A frozen dataclass keyed by node name. `str(plan)` is a table, largest saved memory
first; `plan.to_json()` and `Plan.from_json()` round-trip it, so a stored plan can be
read back and compared, or applied again without solving: its `decisions` name the
nodes each rewrite covers.

Older plans: plans written before decisions stored each strategy's rewrites by their
output nodes alone (fields "segments", "spans", "inverted", "compressed",
"row_split"); they load with those in `legacy`, and `apply_plan` finds the nodes
again from the graph, as it did then.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterator

from rewriter.passes.recompute import SPAN
from rewriter.passes.registry import Decision

__all__ = ["NodePlan", "Plan", "format_bytes"]

STRATEGIES = ("keep", "recompute", "invert", "compress", "row_split")


def format_bytes(n: int) -> str:
    """Bytes as a short human string: 3.20 MiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class NodePlan:
    """One graph node: the memory autograd keeps for it and the strategy chosen for it.

    `saved_bytes` is the memory this node allocated that the backward needs (its
    output kept by `held_by`, or statistics/masks/indices it keeps for itself).
    """

    node: str
    label: str
    op: str
    shape: tuple[int, ...]
    saved_bytes: int
    held_by: tuple[str, ...]
    forward_flops: int
    strategy: str = "keep"
    seconds_added: float = 0.0
    error_factor: float = 1.0  # invert: how much rebuilding this node's input amplifies rounding error
    compress_form: str = ""  # compress: "lossless", or the width its saved input is kept at ("4-bit")

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} for node {self.node!r} is not one of {STRATEGIES}")


_LEGACY = ("segments", "spans", "inverted", "compressed", "row_split")  # a plan's rewrites before decisions
_GRADIENT_KINDS = ("gradient", "parameter gradient")  # kinds of peak holders no strategy rewrites
_TILE_NAMES = {"H": "row", "W": "column", "D": "slab"}  # a row-split chain's tiles, by the axis they cut


@dataclass(frozen=True)
class Plan:
    """A strategy per node, with the predicted and baseline peaks of one training step.

    `predicted_peak_bytes` is the cost model's peak under this plan;
    `fallback_peak_bytes`, with inverted chains, its peak if every chain falls back
    to keeping its input (when training moves weights past the rebuild's error bound;
    the plan fits its budget either way: `promised_peak_bytes`);
    `baseline_peak_bytes` its peak with every saved tensor kept; `budget_bytes` the
    budget the plan was made for (None for `explain`); `peak_at` the step where the
    predicted peak falls; `peak_held_by` what is live then, as (kind, node label,
    bytes), most bytes first, adding up to the predicted peak (kinds:
    `cost_models.peak_holders`; only "activation" is rewritten by a strategy);
    `batch` and `input_shapes` the inputs it was made for. Made for a budget of device
    memory (`optimize(..., optimizer=...)`), `device_split` says what the step holds
    besides activations (parameters, gradients, optimizer state), and `budget_bytes`
    is what that leaves for activations.
    """

    nodes: tuple[NodePlan, ...]
    predicted_peak_bytes: int
    baseline_peak_bytes: int
    budget_bytes: int | None = None
    peak_at: str = ""
    batch: int = 1
    input_shapes: tuple[tuple[int, ...], ...] = ()
    opaque: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()  # forward's parameters given as None (traced as None: rewriter.trace.capture)
    decisions: tuple[Decision, ...] = ()  # the rewrites, each with the nodes it covers (passes.registry)
    granularity: str = "coarse"  # how the graph was cut into segments (passes.recompute.segments)
    row_granularity: str = "block"  # how row-split chains were found (passes.row_split.chains)
    peak_held_by: tuple[tuple[str, str, int], ...] = ()  # (kind, node label, bytes) live at the peak
    legacy: tuple[tuple[str, tuple], ...] = ()  # a plan written before decisions: (field, its entries)
    device_split: tuple[tuple[str, int], ...] = ()  # with a device budget: (what, bytes) held besides activations
    timeline: tuple[tuple[str, int], ...] = ()  # per step ("forward <node>", "backward <node>"): its highest live bytes
    baseline_timeline: tuple[tuple[str, int], ...] = ()  # the same, every saved tensor kept
    fallback_peak_bytes: int | None = None  # with inverted chains: the peak if all of them keep their inputs
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {n.node: n for n in self.nodes})

    # ---- keyed by node name -------------------------------------------------------------
    def __getitem__(self, node: str) -> NodePlan:
        try:
            return self._index[node]
        except KeyError:
            raise KeyError(f"no node {node!r} in this plan; its nodes are {list(self._index)[:8]}...") from None

    def __contains__(self, node: object) -> bool:
        return node in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self.nodes)

    # ---- the rewrites, per strategy ----------------------------------------------------------
    def _of(self, strategy: str):
        return [d for d in self.decisions if d.strategy == strategy]

    @property
    def segments(self) -> tuple[tuple[str, str], ...]:
        """(segment output node, recompute mode) of each recomputed segment."""
        return dict(self.legacy).get("segments") or tuple(
            sorted((d.output, d.option) for d in self._of("recompute") if d.option != SPAN))

    @property
    def spans(self) -> tuple[tuple[str, str], ...]:
        """(first node, last node) of each nested checkpoint around segments (older
        plans: first and last segment output)."""
        return dict(self.legacy).get("spans") or tuple((d.nodes[0], d.output) for d in self._of("recompute") if d.option == SPAN)

    @property
    def inverted(self) -> tuple[tuple[str, str], ...]:
        """(chain input node, chain output node) of each inverted chain."""
        return dict(self.legacy).get("inverted") or tuple((d.detail[0], d.output) for d in self._of("invert"))

    @property
    def compressed(self) -> tuple[tuple[str, str], ...]:
        """(node, compressed form) of each compressed node."""
        return dict(self.legacy).get("compressed") or tuple(
            (n, form) for d in self._of("compress") for n, form in zip(d.nodes, d.detail))

    @property
    def row_split(self) -> tuple[tuple[str, int, float, str], ...]:
        """(chain output node, tiles, halo FLOPs added as a fraction, axis "H" or "W") of
        each row-split chain."""
        return dict(self.legacy).get("row_split") or tuple(
            (d.output, d.detail[0], d.detail[2], d.detail[1]) for d in self._of("row_split"))

    @property
    def accumulated(self) -> tuple[tuple[str, int], ...]:
        """(node, slices) of each Linear or convolution that adds its weight's gradient
        into `.grad` in place (passes.accumulate; slices of output channels, 1 for a Linear)."""
        return tuple((n, chunks) for d in self._of("accumulate") for n, chunks in zip(d.nodes, d.detail))

    @property
    def promised_peak_bytes(self) -> int:
        """The peak this plan stays within: its predicted peak, or with inverted chains
        the larger of that and the peak with every chain fallen back."""
        return max(self.predicted_peak_bytes, self.fallback_peak_bytes or 0)

    @property
    def saved_bytes(self) -> int:
        """Memory kept for the backward, summed over all nodes."""
        return sum(n.saved_bytes for n in self.nodes)

    # ---- JSON ---------------------------------------------------------------------------
    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "_index"}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        nodes = tuple(
            NodePlan(**{**n, "shape": tuple(n["shape"]), "held_by": tuple(n["held_by"])}) for n in data.pop("nodes")
        )
        data["input_shapes"] = tuple(tuple(s) for s in data["input_shapes"])
        data["opaque"] = tuple(data["opaque"])
        data["absent"] = tuple(data.get("absent", ()))  # none in plans written before keyword inputs
        data["decisions"] = tuple(Decision(d["strategy"], d["option"], tuple(d["nodes"]), tuple(d["detail"]))
                                  for d in data.get("decisions", ()))
        legacy = dict(data.pop("legacy", ()))
        legacy.update({name: data.pop(name) for name in _LEGACY if name in data})  # a plan written before decisions
        # plans written before W tiling have no axis: their chains were tiled along H
        legacy["row_split"] = [(*c, "H")[:4] for c in legacy.get("row_split", ())]
        data["legacy"] = tuple((name, tuple(tuple(e) for e in legacy[name])) for name in _LEGACY if legacy.get(name))
        data["peak_held_by"] = tuple(tuple(h) for h in data.get("peak_held_by", ()))  # none in older plans
        for name in ("device_split", "timeline", "baseline_timeline"):  # none in older plans
            data[name] = tuple(tuple(s) for s in data.get(name, ()))
        return cls(nodes=nodes, **data)

    def held_by_kind(self) -> dict[str, int]:
        """Bytes live at the predicted peak, per kind (activation, gradient, ...)."""
        totals: dict[str, int] = {}
        for kind, _, nbytes in self.peak_held_by:
            totals[kind] = totals.get(kind, 0) + nbytes
        return totals

    def unrewritable_at_peak(self) -> str:
        """A sentence on the gradients that hold the peak (no strategy rewrites them),
        the largest named; "" where none does."""
        grads = [h for h in self.peak_held_by if h[0] in _GRADIENT_KINDS]
        if not grads:
            return ""
        kind, label, nbytes = max(grads, key=lambda h: h[2])
        total = sum(h[2] for h in grads)
        return (f"at the peak ({self.peak_at}) {format_bytes(total)} of {format_bytes(self.predicted_peak_bytes)} "
                f"are gradients, which no strategy rewrites (the largest: {kind} of {label}, {format_bytes(nbytes)})")

    # ---- the table ----------------------------------------------------------------------
    def plot(self, path=None):
        """A picture of the step: live activation bytes over forward and backward, eager
        against this plan, the budget, the peak named; written to `path` (a PNG) if
        given. Returns the matplotlib Figure. Needs matplotlib (`pip install
        'rewriter[plot]'`)."""
        from rewriter.plot import plot_plan
        return plot_plan(self, path)

    def summary(self) -> str:
        """The plan's head: peaks, budget, what holds the peak, what the plan does."""
        lines = [
            f"Plan for inputs {', '.join(str(tuple(s)) for s in self.input_shapes)} (batch {self.batch})",
            f"  predicted peak  {format_bytes(self.predicted_peak_bytes):>12}  ({self.predicted_peak_bytes:,} bytes, at {self.peak_at})",
            f"  baseline peak   {format_bytes(self.baseline_peak_bytes):>12}",
            f"  budget          {format_bytes(self.budget_bytes) if self.budget_bytes is not None else 'none':>12}",
        ]
        if self.fallback_peak_bytes is not None:
            lines.insert(2, f"  if chains fall back {format_bytes(self.fallback_peak_bytes):>8}  (inverted chains keeping their "
                            "inputs, as when training moves weights past the rebuild's error bound)")
        if self.device_split:
            held = sum(b for _, b in self.device_split)
            parts = " + ".join(f"{what} {format_bytes(b)}" for what, b in self.device_split)
            budget_line = next(i for i, line in enumerate(lines) if line.startswith("  budget "))
            lines[budget_line] += " of activations"
            lines.append(f"  on the device   {format_bytes(held + self.predicted_peak_bytes):>12}  predicted: {parts} "
                         f"+ the activation peak" + (f", within {format_bytes(held + self.budget_bytes)}"
                                                     if self.budget_bytes is not None else ""))
        if self.peak_held_by:
            kinds = sorted(self.held_by_kind().items(), key=lambda item: -item[1])
            lines.append("  held at the peak: " + ", ".join(f"{kind} {format_bytes(b)}" for kind, b in kinds))
            lines.append("  largest there:    " + "; ".join(f"{kind} of {label} {format_bytes(b)}"
                                                         for kind, label, b in self.peak_held_by[:3]))
        lines += [
            f"  saved for backward {format_bytes(self.saved_bytes)} in {sum(1 for n in self.nodes if n.saved_bytes)} nodes",
        ]
        if self.opaque:
            lines.append(f"  opaque leaves (not rewritten inside): {', '.join(self.opaque)}")
        if self.segments or self.spans or self.inverted or self.compressed or self.row_split or self.accumulated:
            added = sum(n.seconds_added for n in self.nodes)
            lines.append(f"  recomputed segments: {len(self.segments)}, checkpointed spans of segments: {len(self.spans)}, "
                         f"inverted chains: {len(self.inverted)}, "
                         f"compressed nodes: {len(self.compressed)}, row-split chains: {len(self.row_split)}, "
                         f"weight gradients into .grad: {len(self.accumulated)}, "
                         f"est. seconds added per step {added:.4f}")
        for output, tiles, halo, axis in self.row_split:
            lines.append(f"  row-split chain ending at {self[output].label if output in self else output}: "
                         f"{tiles} {_TILE_NAMES.get(axis, axis)} tiles, halo recompute +{100 * halo:.1f}% "
                         f"of its forward FLOPs")
        return "\n".join(lines)

    def __str__(self) -> str:
        """`summary`, then a row per node that saves memory for the backward, largest first."""
        peak = max(self.predicted_peak_bytes, 1)
        lines = [self.summary()]
        rows = sorted((n for n in self.nodes if n.saved_bytes), key=lambda n: (-n.saved_bytes, n.node))
        header = ("node", "op", "shape", "saved", "share", "held by", "strategy", "+seconds", "error x / form")
        table = [header] + [
            (
                n.label, n.op, "x".join(map(str, n.shape)) or "scalar", format_bytes(n.saved_bytes),
                f"{100 * n.saved_bytes / peak:.1f}%", _held(n, self), n.strategy, f"{n.seconds_added:.4f}",
                f"{n.error_factor:.3g}" if n.strategy == "invert" else n.compress_form,
            )
            for n in rows
        ]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines.append("")
        for i, r in enumerate(table):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _held(node: NodePlan, plan: Plan) -> str:
    names = ["itself" if h == node.node else plan[h].label if h in plan else h for h in node.held_by]
    return ", ".join(names)
