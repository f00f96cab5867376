"""optimize: a module that trains like the model with a training-step peak under a budget."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import re
from typing import Any, Callable

import torch
from torch import fx, nn

from rewriter.cost_models.checkpoint import checkpoint_record, fresh_uids, nest, owns_output
from rewriter.cost_models.compose import Composer
from rewriter.cost_models.node_costs import BATCH, Costs
from rewriter.cost_models.repeated_nodes import Records
from rewriter.cost_models.runtime import ROOFLINES, node_seconds
from rewriter.cost_models.saved import saved_tensors
from rewriter.cost_models.peak_holders import peak_holders
from rewriter.cost_models.simulate import simulate
from rewriter.cost_models.stage_costs import StageCosts, Steps, stage_costs, steps
from rewriter.passes import accumulate, compress, compress_timing, invert, recompute, registry, row_split
from rewriter.passes.compressed_ops import BITS
from rewriter.device_memory import held_outside_activations
from rewriter.errors import BudgetError, InputError
from rewriter.report import captured_and_profiled, keep_all_plan, profile_model_graph, step_timeline
from rewriter.measure import as_input_tuple, bind_inputs, check_trainable, default_loss, preserved_model_state
from rewriter.phases import PhaseClock, verbose_logging
from rewriter.plan import Plan, format_bytes
from rewriter import schedule
from rewriter.solve import Choice, relaxed, solve
from rewriter.trace import capture, with_eval_path

__all__ = ["optimize", "apply_plan", "parse_budget", "STRATEGIES", "AVAILABLE_STRATEGIES"]

log = logging.getLogger(__name__)

STRATEGIES = ("recompute", "invert", "compress", "row_split", "accumulate")
AVAILABLE_STRATEGIES = STRATEGIES  # the default; row-split is searched only where the others find no plan

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(budget: int | str) -> int:
    """Bytes from an int or a string such as "512MiB", "2GB", "1.5 GiB"."""
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise InputError(f"budget_bytes={budget!r} must be a number of bytes or a string such as '512MiB'")
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", budget.lower())
        if not match:
            raise InputError(f"budget_bytes={budget!r} is not a size; write it as 536870912, '512MiB' or '2GB'")
        budget = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    if budget <= 0:
        raise InputError(f"budget_bytes={budget} must be positive")
    return budget


def _strategies(strategies) -> tuple[str, ...]:
    if strategies is None:
        return AVAILABLE_STRATEGIES
    names = (strategies,) if isinstance(strategies, str) else tuple(strategies)
    for name in names:
        if name not in STRATEGIES:
            raise InputError(f"strategies contains {name!r}; the strategies are {STRATEGIES}")
    return names


def _margin(budget: int) -> int:
    """Room the solver leaves under the budget for the cost model's error on rewritten
    graphs (measured on the zoo: at most 516 bytes under)."""
    return max(4096, budget // 200)


_INVERT = invert.KEY
_COMPRESS = compress.KEY
_ROWS = row_split.KEY
_FALLEN = "invert, fallen back"  # the records of inverted chains as they run fallen back (`invert.assuming_fallback`)
_ROW_MODES = row_split.MODES  # one profile per tile count, every chain so tiled
STAGES = 64  # the most stages the schedule solver takes (neighbouring segments join into one)
DEPTH = 8  # the most spans a segment may be inside: each reruns it once more (and Python's stack has a bottom)
LOWEST_STAGES = 128  # the same for the lowest peak with every segment in full (one option a stage)


@dataclasses.dataclass(frozen=True)
class Lossy:
    """What lossy compression the user allows: the narrowest width (`bits`: 8 bits,
    and narrower down to `bits` where the budget needs it), or an error bound per
    tensor (`error`: each tensor gets the fewest bits whose rounding error stays under
    error x max|x| on the example batch). Neither: lossless only."""

    bits: int | None = None
    error: float | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and self.error is not None:
            raise InputError(f"pass compress_bits={self.bits} or compress_error={self.error}, not both")
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits not in BITS):
            raise InputError(f"compress_bits={self.bits!r} must be one of {BITS}")
        if self.error is not None and (isinstance(self.error, bool) or not isinstance(self.error, (int, float))
                                       or not 0 < self.error < 1):
            raise InputError(f"compress_error={self.error!r} must be a number between 0 and 1 (a bound relative to max|x|)")

    def __bool__(self) -> bool:
        return self.bits is not None or self.error is not None


class _Planner:
    """Everything `optimize` learns about one model and input signature."""

    def __init__(self, model: nn.Module, inputs: tuple, loss_fn: Callable, strategies: tuple[str, ...] = ("recompute",),
                 lossy: Lossy = Lossy(), budget: int | None = None):
        """With "accumulate" among `strategies` and a `budget` under the eager peak, the
        graph every plan builds on adds its large weight gradients into `.grad` in place
        (passes.accumulate): `base` is that graph's profile, `eager` the model's."""
        self.model = model
        self.inputs = inputs
        self.loss_fn = loss_fn
        self.clock = PhaseClock()
        self.records = Records()  # every profile's node records, for the others to take (cost_models.repeated_nodes)
        with self.clock("profile", "the graph as captured"):  # the model as Python runs it
            captured, self.eager = captured_and_profiled(model, inputs, loss_fn, clock=self.clock, records=self.records)
        self.gm = captured.gm
        self.absent = captured.absent
        self.eval_gm = captured.eval_gm
        self.opaque = captured.opaque
        self.eager_peak = simulate(self.eager).peak_bytes
        below = "accumulate" in strategies and budget is not None and budget < self.eager_peak
        self.accumulated = accumulate.eligible(self.gm, self.eager, self.eager_peak) if below else {}  # node -> chunks
        if self.accumulated:
            with self.clock("profile", f"{len(self.accumulated)} weight gradients accumulated in place"):
                self.base = profile_model_graph(model, accumulate.rewrite(self.gm, self.accumulated), inputs, loss_fn,
                                                self.opaque, {}, records=self.records)
        else:
            self.base = dataclasses.replace(self.eager, held_until={})  # as a GraphModule runs it
        self.saved = saved_tensors(self.base)  # every storage the backward keeps, and who keeps it
        self._holders: dict[str, list[tuple[str, ...]]] = {}  # owner -> who holds each storage it saves
        for tensor in self.saved:
            self._holders.setdefault(tensor.owner, []).append(tensor.held_by)
        self.keep_all = keep_all_plan(self.base, simulate(self.base))
        self.granularity = "coarse"
        self.segments = self._segments("coarse") if "recompute" in strategies else []
        self._tried: list[list] = []  # the segment lists `use` has handed out
        self._stages: dict[int, tuple] = {}  # `stages(most)` of the current segments, by most
        self._simulated: dict[tuple, Steps] = {}  # `_steps_of`, by the units and options taken
        self._peaks: dict[tuple, int] = {}  # `peak_of`, by the units and options taken and the spans
        self._spans: dict[tuple[str, int, int], recompute.Segment | None] = {}
        self._norm_bytes: dict[tuple[str, ...], int] = {}  # segment or span nodes -> its BatchNorm buffers' bytes
        self.segment_profiles: dict[tuple[str, str], Costs] = {}  # (granularity, mode) -> every segment so run, composed
        self.groups: list[compress.Group] = []
        # compress modes, widest first: "compress" (lossless, or widths set by an error
        # bound), or one per width from 8 bits down to compress_bits ("compress8", ...);
        # for each, node -> compressed form for every group member
        self.forms: dict[str, dict[str, str]] = {}
        self.compressed: dict[str, Costs] = {}  # mode -> the profile with every group compressed so
        self.sensitivity: dict[str, float] | None = None  # group key -> its share of the gradient error
        if "compress" in strategies:
            bits = self._lossy_bits(lossy)
            self.groups = compress.groups(self.gm, self.base, bits)
            widths = [b for b in sorted(BITS, reverse=True) if b >= lossy.bits] if lossy.bits else [None]
            for width in widths:
                mode = "compress" if width is None else f"compress{width}"
                self.forms[mode] = {n: compress.form_of(k, width or bits.get(n))
                                    for g in self.groups for n, k in zip(g.nodes, g.kinds)}
        self.device = "cuda" if any(t.is_cuda for t in inputs if isinstance(t, torch.Tensor)) else "cpu"
        self.input_device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device(self.device))
        self.shapes = _shapes(self.gm, self.base, inputs)
        self._node_seconds: dict[str, float] | None = None
        self._works: dict[str, tuple[float, float]] = {}  # node -> `_work`
        self._compressed: dict[str, float] = {}  # node -> `compressed_seconds`, once the nodes are timed
        self.chains: list[invert.Chain] = []
        self._falls: set[str] = set()  # the keys of the chains that can fall back
        self.inverted: Costs | None = None  # the profile with every chain inverted
        self.fallen: Costs | None = None  # the same with the chains that can fall back fallen back
        if "invert" in strategies:
            factors = self._calibrated(budget)
            self.chains = [c for c in invert.chains(self.gm, self.opaque, factors) if self._gains(c)]
            self._falls = {_INVERT + c.output for c in self.chains if c.can_fall_back}
        self.alternatives: dict[str, Costs] = {}
        self.offered: dict[str, registry.Candidate] = {}  # key -> every strategy's candidate with profiled options
        saved_by_owner: dict[str, int] = {}
        for tensor in self.saved:
            saved_by_owner[tensor.owner] = saved_by_owner.get(tensor.owner, 0) + tensor.nbytes
        self.pricing = registry.Pricing(self.base, saved_by_owner, self.shapes, self.input_device, self.rerun_seconds,
                                        self.compressed_seconds)
        self.row_granularity = "block"
        self.tiled: list[row_split.Chain] = []  # row-split chains
        self.tilings = row_split.Tilings(self.pricing, self.gm, [])
        self.tiled_profiles: dict[tuple[str, str], Costs] = {}  # (granularity, mode) -> every chain so tiled

    def use_rows(self, granularity: str | None) -> bool:
        """Find row-split chains this way (None: none); False if that finds no chain or
        the chains it found already (nothing new to search)."""
        found = row_split.chains(self.gm, self.shapes, self.opaque, granularity) if granularity else []
        if self.row_granularity != (granularity or "block") and found == self.tiled:
            return False
        self.row_granularity, self.tiled, self.alternatives, self._tried = granularity or "block", found, {}, []
        self._simulated, self._peaks = {}, {}
        self.tilings = row_split.Tilings(self.pricing, self.gm, found)
        return bool(found)

    def _lossy_bits(self, lossy: Lossy) -> dict[str, int]:
        """Bits per lossy-kind node the user allows compressing."""
        if lossy.bits is not None:
            return {n: lossy.bits for n in compress.lossy_nodes(self.gm)}
        if lossy.error is not None:
            with preserved_model_state(self.model):
                return compress.calibrate_bits(self.gm, self.inputs, lossy.error)
        return {}

    def _calibrated(self, budget: int | None) -> dict[str, float]:
        """Invert's value-dependent factors (`invert.calibrate`), read in the run that
        times the nodes where plans are to be priced (a budget under the eager peak, or
        none), else in a forward of their own (as where timing ran out of memory)."""
        if budget is None or budget < self.eager_peak:
            probes, factors = invert.calibration_probes(self.gm)
            with self.clock("time nodes"):
                self._node_seconds = self._timed_nodes(probes)
            if self._node_seconds:
                return factors
        with preserved_model_state(self.model):
            return invert.calibrate(self.gm, self.inputs)

    def _gains(self, chain: invert.Chain) -> bool:
        """Whether inverting the chain frees a tensor: one that only its members save."""
        members = set(chain.nodes)
        return any(set(held_by) <= members for n in chain.nodes if n != chain.output
                   for held_by in self._holders.get(n, ()))

    def _profile(self, gm: fx.GraphModule, held_until: dict) -> Costs:
        """A rewrite's profile: its bytes (its seconds are priced from the one profile's)."""
        return profile_model_graph(self.model, gm, self.inputs, self.loss_fn, self.opaque, held_until, flops=False,
                                   records=self.records)

    def use(self, granularity: str) -> bool:
        """Cut the graph into segments this way; False if an earlier `use` gave the same
        segments (nothing new to search)."""
        found = self._segments(granularity)
        if found in self._tried:
            return False
        self._tried.append(found)
        self.granularity, self.segments, self.alternatives, self._stages = granularity, found, {}, {}
        return True

    def _segments(self, granularity: str) -> list[recompute.Segment]:
        """`recompute.segments` cut this way, less those whose output is a view of what
        they read (a trailing `flatten`: a checkpoint would return its input's memory)."""
        return [s for s in recompute.segments(self.gm, self.opaque, granularity) if owns_output(self.base, s.nodes)]

    def profile_modes(self, row_modes: tuple[str, ...] = tuple(_ROW_MODES)) -> None:
        """The records plans are composed from: every segment in each recompute mode (or,
        where a segment lacks that mode, its last one), composed from the one profile;
        and profiles of the graph with every chain inverted, every group compressed, and
        every row-split chain at each tile count of `row_modes`."""
        with self.clock("profile", f"{self.granularity} segments' alternatives"):
            self._profile_modes(row_modes)

    def _profile_modes(self, row_modes: tuple[str, ...]) -> None:
        if self.segments:
            for mode in recompute.MODES:
                key = (self.granularity, mode)
                if key not in self.segment_profiles:
                    self.segment_profiles[key] = self._checkpointed(self.extreme(mode))
                self.alternatives[mode] = self.segment_profiles[key]
        if self.chains:
            if self.inverted is None:
                inverted = invert.rewrite(self.gm, [c.output for c in self.chains], self.chains)
                with self.clock("profile", f"{len(self.chains)} chains inverted"):
                    self.inverted = self._profile(inverted, {})
                if self._falls:
                    with self.clock("profile", f"{len(self.chains)} chains inverted, fallen back"), invert.assuming_fallback():
                        self.fallen = self._profile(inverted, {})
            self.alternatives["invert"] = self.inverted
            if self.fallen is not None:
                self.alternatives[_FALLEN] = self.fallen  # no candidate's option: `fallen_back` composes it
        for mode in row_modes if self.tiled else ():
            key = (self.row_granularity, mode)
            if key not in self.tiled_profiles:
                chosen = {c.output: self.tilings.tiling(c, mode) for c in self.tiled}
                with self.clock("profile", f"{len(self.tiled)} chains row-split, {mode}"):
                    self.tiled_profiles[key] = self._profile(row_split.rewrite(self.gm, chosen, self.tiled), {})
            self.alternatives[mode] = self.tiled_profiles[key]
        for mode, forms in self.forms.items() if self.groups else ():
            if mode not in self.compressed:
                with self.clock("profile", f"{len(self.groups)} groups compressed, {mode}"):
                    self.compressed[mode] = self._profile(compress.rewrite(self.gm, forms), {})
            self.alternatives[mode] = self.compressed[mode]
        with self.clock("price"):
            self.offered = {c.key: c for c in self.candidates()}
        units = {c.key: (c.outputs, c.nodes) for c in self.offered.values()}
        self._composer = Composer(self.base, list(self.alternatives.values()), units)
        self._stages = {}  # the stages' options are the candidates just offered

    def candidates(self) -> list[registry.Candidate]:
        """Every strategy's candidates, in the options profiled in `alternatives`."""
        present = tuple(self.alternatives)
        return [
            *recompute.candidates(self.pricing, self.segments, tuple(m for m in recompute.MODES if m in present)),
            *row_split.candidates(self.pricing, self.tilings, tuple(m for m in _ROW_MODES if m in present)),
            *(invert.candidates(self.pricing, self.chains) if "invert" in present else ()),
            *compress.candidates(self.pricing, self.groups, {m: f for m, f in self.forms.items() if m in present}),
        ]

    def _checkpointed(self, modes: dict[str, str]) -> Costs:
        """Records of the segments run in `modes` (output -> mode), composed from the one
        profile (cost_models.checkpoint), as a profile of alternatives for the Composer."""
        uids = fresh_uids(self.base)
        records, sizes = [], dict(self.base.sizes)
        for segment in self.segments:
            kept = frozenset(segment.expensive) if modes[segment.output] == "selective" else frozenset()
            record, added = checkpoint_record(self.base, segment.nodes, kept, uids, self.norm_bytes(segment))
            records.append(record)
            sizes.update(added)
        base = self.base
        return Costs(nodes=records, outputs=(), sizes=sizes, example_batch=base.example_batch,
                     input_shapes=base.input_shapes, batch_symbolic=False)

    _STATE = ("granularity", "segments", "alternatives", "offered", "_composer", "row_granularity", "tiled", "tilings",
              "_stages")

    def snapshot(self) -> dict[str, Any]:
        """What `use` and `use_rows` change: to verify a plan found under them later."""
        return {name: getattr(self, name, None) for name in self._STATE}

    @contextlib.contextmanager
    def restored(self, state: dict[str, Any]):
        now = self.snapshot()
        for name, value in state.items():
            setattr(self, name, value)
        try:
            yield
        finally:
            for name, value in now.items():
                setattr(self, name, value)

    def span(self, first: int, last: int) -> recompute.Segment | None:
        """`recompute.span` over the segments first..last (indexes), worked out once."""
        key = (self.granularity, first, last)
        if key not in self._spans:
            self._spans[key] = recompute.span(self.gm, self.segments, self.segments[first].output,
                                              self.segments[last].output, self.opaque)
        return self._spans[key]

    def norm_bytes(self, segment: recompute.Segment) -> int:
        """`recompute.norm_bytes` of a segment or span, worked out once."""
        if segment.nodes not in self._norm_bytes:
            self._norm_bytes[segment.nodes] = recompute.norm_bytes(self.gm, segment)
        return self._norm_bytes[segment.nodes]

    def nested_peak(self, flat: Costs, spans: list[recompute.Segment]) -> int:
        """The peak of `flat` (a composed plan) with `spans` checkpointed around its segments."""
        if not spans:
            return simulate(flat).peak_bytes
        scratch = {s.nodes: self.norm_bytes(s) for s in spans}
        return simulate(nest(flat, [s.nodes for s in spans], scratch=scratch)).peak_bytes

    def peak_of(self, assignment: dict[str, str], spans: list[recompute.Segment] = ()) -> int:
        """`nested_peak` of `assignment` composed, with `spans`, worked out once per planner
        (a search meets plans again: DenseNet-BC's search for its smallest budget asked
        for 1,846 peaks of 1,721 plans)."""
        key = (self._assignment_key(assignment), tuple(sorted(s.nodes for s in spans)))
        if key not in self._peaks:
            self._peaks[key] = self.nested_peak(self.composed(assignment), list(spans))
        return self._peaks[key]

    def _assignment_key(self, assignment: dict[str, str]) -> tuple:
        """What a composed plan of `assignment` depends on: each unit taken, its option and
        its nodes (a segment's output names segments of different ways of cutting)."""
        return tuple(sorted((k, v, self.offered[k].nodes) for k, v in self.compatible(assignment).items()))

    def nest_greedily(self, modes: dict[str, str], limit: int) -> tuple[list[recompute.Segment], int]:
        """Spans chosen bottom-up around the segments recomputed in `modes`. Each round
        prices merging each two neighbouring top-level units (segments or spans) into a
        span, nested around both or as one span over what both hold, whichever gives
        the lower composed peak; then takes the fewest of the merges that lower the
        peak, best first and not overlapping, that bring it under `limit` (a long chain
        ends in one round, not one merge a round), or the best alone where all of them
        do not (taking them all each round nests worse); until the peak is under
        `limit` or no merge lowers it."""
        # each unit: first and last segment index, and its spans, its outermost last
        units: list[tuple[int, int, tuple]] = [(i, i, ()) for i in range(len(self.segments))]
        peak = self.peak_of(modes)
        while peak > limit and len(units) > 1:
            merges = []  # (trial peak, index, spans of the merged unit), for each neighbouring pair that lowers the peak
            for index in range(len(units) - 1):
                (first, _, left), (_, last, right) = units[index], units[index + 1]
                span = self.span(first, last)
                if span is None:
                    continue
                others = [s for unit in units[:index] + units[index + 2:] for s in unit[2]]
                trials = [(self.peak_of(modes, others + list(held) + [span]), index, tuple(held) + (span,))
                          for held in dict.fromkeys((left + right, left[:-1] + right[:-1]))  # around both, over what both hold
                          if _depth(list(held) + [span]) <= DEPTH]
                best = min(trials, key=lambda t: t[0], default=None)
                if best is not None and best[0] < peak:
                    merges.append(best)
            if not merges:
                break
            chosen, taken = [], set()
            for merge in sorted(merges, key=lambda m: m[0]):
                if not {merge[1], merge[1] + 1} & taken:
                    chosen.append(merge)
                    taken |= {merge[1], merge[1] + 1}

            def merged(count: int) -> list[tuple[int, int, tuple]]:
                result = list(units)
                for _, index, spans in sorted(chosen[:count], key=lambda m: -m[1]):
                    result[index: index + 2] = [(result[index][0], result[index + 1][1], spans)]
                return result

            peaks = {1: chosen[0][0]}

            def peak_of(count: int) -> int:
                if count not in peaks:
                    peaks[count] = self.peak_of(modes, [s for u in merged(count) for s in u[2]])
                return peaks[count]

            low, high = 1, len(chosen)
            if peak_of(high) > limit:  # out of reach this round: the best merge alone (merging all nests worse)
                high = 1
            while low < high:  # the fewest merges, best first, under the limit
                middle = (low + high) // 2
                low, high = (low, middle) if peak_of(middle) <= limit else (middle + 1, high)
            peak, units[:] = peak_of(low), merged(low)
        return [s for unit in units for s in unit[2]], peak

    def stages(self, most: int = STAGES) -> tuple[list[list[int]], list[schedule.Stage], set[tuple[int, int]]]:
        """The segments as a chain of at most `most` stages for `schedule.solve_schedule`:
        each stage's segment indexes (runs of neighbours, as even as they divide), its
        options (`stage_options`: keep; selective; full; each other strategy's
        candidates inside it taken) priced from simulations of each option taken
        everywhere (`stage_costs`), and the stage pairs a span may join."""
        groups = self._stage_groups(most)
        options = self.stage_options(groups)
        stage_of = {n: i for i, segment in enumerate(self.segments) for n in segment.nodes}
        per_segment = [self._stage_costs(everywhere, stage_of) for _, everywhere, _, _ in options]
        full = next(costs for (name, *_), costs in zip(options, per_segment) if name == "full")
        stages = []
        for k, group in enumerate(groups):
            seconds, kept, forward, backward = [], [], [], []
            for (_, _, per_stage, _), costs in zip(options, per_segment):
                held = high_forward = high_backward = 0
                for i in group:
                    high_forward = max(high_forward, held + costs[i].forward)
                    high_backward = max(high_backward, held + costs[i].backward)
                    held += costs[i].kept
                seconds.append(sum(self.mode_seconds(per_stage[k]).values()))
                kept.append(held)
                forward.append(high_forward)
                backward.append(high_backward)
            nodes = [n for i in group for n in self.segments[i].nodes]
            stages.append(schedule.Stage(tuple(seconds), tuple(kept), tuple(forward), tuple(backward),
                                         tuple(nestable for *_, nestable in options), full[group[-1]].kept,
                                         self.rerun_seconds(nodes)))
        pairs = recompute.spannable(self.gm, self.segments, [g[0] for g in groups], [g[-1] for g in groups], self.opaque)
        index = {g[0]: k for k, g in enumerate(groups)} | {g[-1]: k for k, g in enumerate(groups)}
        joined = {(index[s], index[j]) for s, j in pairs if index[s] < index[j]}
        return groups, stages, joined

    def _stage_costs(self, everywhere: dict[str, str], stage_of: dict[str, int]) -> list[StageCosts]:
        """Each segment's `stage_costs` with `everywhere` taken; where its chains can fall
        back, the higher of each cost as they run and as they run fallen back."""
        costs = stage_costs(self._steps_of(everywhere), stage_of, len(self.segments))
        fallen = self.fallen_back(everywhere)
        if fallen == everywhere:
            return costs
        other = stage_costs(self._steps_of(fallen), stage_of, len(self.segments))
        return [StageCosts(max(a.kept, b.kept), max(a.forward, b.forward), max(a.backward, b.backward))
                for a, b in zip(costs, other)]

    def _steps_of(self, assignment: dict[str, str]) -> Steps:
        """The composed step of `assignment`, simulated once per planner for the units and
        options it takes (the same under every way of cutting segments: the options of
        other strategies than recompute, taken everywhere, are; `use_rows` forgets them)."""
        key = self._assignment_key(assignment)
        if key not in self._simulated:
            assignment = self.compatible(assignment)
            self._simulated[key] = steps(self.composed(assignment) if assignment else self.base)
        return self._simulated[key]

    def _stage_groups(self, most: int) -> list[list[int]]:
        count = len(self.segments)
        size = -(-count // most)
        return [list(range(first, min(first + size, count))) for first in range(0, count, size)]

    def stage_options(self, groups: list[list[int]]) -> list[tuple[str, dict[str, str], list[dict[str, str]], bool]]:
        """The options of the schedule's stages over `groups` (segment indexes): keep,
        every segment selective (where it can be, else full), every segment full, then
        per strategy other than recompute and row-split (and all of them together) its
        candidates inside the stage at their first option, the segments kept. Each as
        (name, the modes taken everywhere, those modes stage by stage, nestable: whether
        a span may rerun the stage so). A candidate whose nodes fall in two stages is in
        no option."""
        stage_of = self._node_stages(groups)
        by_stage: dict[str, int] = {}  # candidate key -> its stage
        for key, candidate in self.offered.items():
            stages = {stage_of[n] for n in candidate.nodes}
            if len(stages) == 1:
                by_stage[key] = stages.pop()
        other = {}  # strategy -> its candidates inside a stage, at their first option
        for key, candidate in self.offered.items():
            if candidate.strategy not in ("recompute", "row_split") and key in by_stage:
                other.setdefault(candidate.strategy, {})[key] = candidate.options[0]
        rewrites = [(name, modes) for name, modes in other.items()]
        if len(other) > 1:
            rewrites.append(("+".join(other), {k: v for modes in other.values() for k, v in modes.items()}))
        options = [("keep", {}, True), ("selective", self.extreme("selective"), False),
                   ("full", self.extreme("full"), True), *((name, modes, False) for name, modes in rewrites)]
        result = []
        for name, everywhere, nestable in options:
            per_stage: list[dict[str, str]] = [{} for _ in groups]
            for key, mode in everywhere.items():
                per_stage[by_stage[key]][key] = mode
            result.append((name, everywhere, per_stage, nestable))
        return result

    def _node_stages(self, groups: list[list[int]]) -> dict[str, int]:
        """Each graph node's stage: its segment's; a node in none, the next segment's
        (past the last one, the last stage)."""
        group_of = {i: k for k, group in enumerate(groups) for i in group}
        in_segment = {n: group_of[i] for i, segment in enumerate(self.segments) for n in segment.nodes}
        result, following = {}, len(groups) - 1
        for node in reversed(self.gm.graph.nodes):
            following = in_segment.get(node.name, following)
            result[node.name] = following
        return result

    def schedule_covers(self) -> bool:
        """Whether the schedule's stages offer every candidate's every option (recompute
        segments; other candidates of one option inside one stage): the flat search
        then finds nothing the schedule does not weigh, stage by stage."""
        options = self.stage_options(self._stage_groups(STAGES))
        inside = {k for _, everywhere, _, _ in options for k in everywhere}
        return all(c.strategy == "recompute" or (c.key in inside and len(c.options) == 1)
                   for c in self.offered.values())

    def scheduled(self, limit: int) -> tuple[dict[str, str], list[recompute.Segment], float] | None:
        """Modes and spans of least added seconds under `limit` (`schedule.solve_schedule`
        over `stages`), or None where the schedule finds none."""
        if STAGES not in self._stages:
            self._stages[STAGES] = self.stages()
        groups, stages, joined = self._stages[STAGES]
        overhead = recompute.overhead_seconds("full", self.input_device)
        found = schedule.solve_schedule(stages, limit, lambda s, j: (s, j) in joined, overhead)
        if found is not None and found.depth > DEPTH:  # nested too deep to rerun: flat segments alone
            found = schedule.solve_schedule(stages, limit, lambda s, j: False, overhead)
        return None if found is None else self.realised(groups, found)

    def realised(self, groups: list[list[int]], found: schedule.Schedule,
                 ) -> tuple[dict[str, str], list[recompute.Segment], float] | None:
        """The modes and spans of a schedule over the stages `groups` (from `stages`), with
        its estimated seconds; None where its spans do not all enclose their segments."""
        options = self.stage_options(groups)
        modes = {}
        for k, option in enumerate(found.options):
            modes.update(options[option][2][k])
        spans = [self.span(groups[s][0], groups[j][-1]) for s, j in found.spans]
        if any(span is None for span in spans):  # `spannable` and `span` disagree: a bug, not the user's
            log.warning("the schedule's spans %s do not all enclose their segments; planning without it", found.spans)
            return None
        return modes, spans, found.seconds

    def mode_seconds(self, modes: dict[str, str]) -> dict[str, float]:
        """The seconds each segment adds in its mode in `modes` (output -> mode)."""
        offered = self.offered
        return {out: offered[out].seconds[offered[out].options.index(mode)] for out, mode in modes.items()}

    def lowest_spans(self, modes: dict[str, str], limit: int) -> tuple[list[recompute.Segment], int]:
        """Spans around every segment recomputed in full (`modes`) of the lowest composed
        peak found, with that peak: the schedule of least estimated peak with every
        stage in full (bisected over the limit it is given: with one option the
        schedule's sums are the composed peaks of nearly every plan), and where the
        segments are few enough for its replays to be cheap, `nest_greedily`'s, if
        lower."""
        if LOWEST_STAGES not in self._stages:
            self._stages[LOWEST_STAGES] = self.stages(LOWEST_STAGES)
        groups, stages, joined = self._stages[LOWEST_STAGES]
        full = [s.only((2,), (True,)) for s in stages]
        low, high, found = 0, self.eager_peak, None
        while high - low > max(4096, self.eager_peak // 2000):
            middle = (low + high) // 2
            trial = schedule.solve_schedule(full, middle, lambda s, j: (s, j) in joined)
            trial = trial if trial is not None and trial.depth <= DEPTH else None
            low, high, found = (low, middle, trial) if trial is not None else (middle, high, found)
            if trial is not None and high <= limit:
                break
        spans = [self.span(groups[s][0], groups[j][-1]) for s, j in found.spans] if found else []
        best = (spans, self.peak_of(modes, spans))
        if len(self.segments) <= LOWEST_STAGES and best[1] > limit:
            greedy = self.nest_greedily(modes, limit)
            best = min(best, greedy, key=lambda pair: pair[1])
        return best

    def extreme(self, mode: str) -> dict[str, str]:
        return {s.output: mode if mode in s.modes() else s.modes()[-1] for s in self.segments}

    def compatible(self, assignment: dict[str, str]) -> dict[str, str]:
        """`assignment` less the candidates a rewrite of an earlier strategy covers
        (`registry.compatible`)."""
        return registry.compatible(self.offered, assignment)

    def composed(self, assignment: dict[str, str]) -> Costs:
        modes = list(self.alternatives)
        return self._composer({k: modes.index(v) for k, v in self.compatible(assignment).items()})

    def fallen_back(self, assignment: dict[str, str]) -> dict[str, str]:
        """`assignment` with its inverted chains that can fall back run fallen back (as a
        plan's fallback peak is profiled); `assignment` itself where none can."""
        if _FALLEN not in self.alternatives:
            return assignment
        return {k: _FALLEN if k in self._falls and v == "invert" else v for k, v in assignment.items()}

    def composed_peak(self, assignment: dict[str, str], spans: list[recompute.Segment] = ()) -> int:
        """The composed peak of `assignment` with `spans` around its segments: what a plan
        promises, the higher of its peak and its peak with its chains fallen back."""
        peak = self.peak_of(assignment, list(spans))
        fallen = self.fallen_back(assignment)
        return peak if fallen == assignment else max(peak, self.peak_of(fallen, list(spans)))

    def node_seconds(self) -> dict[str, float]:
        """Each node's forward seconds, timed once on the example inputs ({} where that
        run does not fit the device's memory: the roofline stands in)."""
        if self._node_seconds is None:
            with self.clock("time nodes"):
                self._node_seconds = self._timed_nodes()
        return self._node_seconds

    def _timed_nodes(self, probes: dict | None = None) -> dict[str, float]:
        """`node_seconds`, and compress's members timed alone beside it (`_compressed`);
        `probes`, more of `node_seconds`' probes."""
        timings = compress_timing.FormTimings(self.gm, next(iter(self.forms.values())), self.shapes) if self.groups else None
        try:
            with preserved_model_state(self.model):
                seconds = node_seconds(self.gm, self.inputs, probes=[timings.probes() if timings else {}, probes or {}])
        except torch.OutOfMemoryError:
            log.warning("timing the forward ran out of memory; plans are costed on the roofline alone")
            return {}
        self._compressed = timings.seconds() if timings else {}
        return seconds

    def compressed_seconds(self, node: str) -> float | None:
        """The seconds compressing `node` adds to a step, as timed (None where it was not)."""
        self.node_seconds()
        return self._compressed.get(node)

    def rerun_seconds(self, nodes, times: float = 1.0, move: float = 1.0) -> float:
        """Seconds of running `nodes` (names in the captured graph) forward once more,
        with `times` x their FLOPs and `move` x their bytes: each node's measured time
        scaled by the roofline."""
        roofline = ROOFLINES[self.device]
        measured = self.node_seconds()
        total = 0.0
        for n in nodes:
            flops, moved = self._work(n)
            total += (roofline.scaled(measured[n], flops, moved, times, move) if n in measured
                      else roofline.seconds(times * flops, move * moved))
        return total

    def _work(self, name: str) -> tuple[float, float]:
        """A node's forward FLOPs and bytes at the example batch, worked out once."""
        if name not in self._works:
            cost, batch = self.base.by_name[name], self.base.example_batch
            self._works[name] = (float(cost.fwd_flops.xreplace({BATCH: batch})),
                                 sum(float(b.xreplace({BATCH: batch})) for b in cost.nbytes))
        return self._works[name]

    def choices(self) -> tuple[list[Choice], dict[str, tuple[str, ...]]]:
        """The solver's choices over the candidates offered, and each one's options by name."""
        return [c.choice() for c in self.offered.values()], {k: c.options for k, c in self.offered.items()}

    def _compressed_forms(self, assignment: dict[str, str]) -> dict[str, str]:
        return {n: self.forms[assignment[g.key]][n] for g in self.groups if g.key in assignment for n in g.nodes}

    def widened(self, assignment: dict[str, int], options: dict[str, tuple[str, ...]], fits: Callable) -> dict[str, int]:
        """`assignment` with compress groups moved to wider options (index 1 is the
        widest), the groups whose quantization errs most first, as long as `fits`."""
        lossy = [k for k, v in assignment.items() if k.startswith(_COMPRESS) and v > 1]
        if not lossy:
            return assignment
        if self.sensitivity is None:
            narrowest = list(self.forms)[-1]
            with preserved_model_state(self.model):
                by_node = compress.sensitivity(self.gm, self.forms[narrowest], self.inputs, self.loss_fn)
            self.sensitivity = {g.key: sum(by_node.get(n, 0.0) for n in g.nodes) for g in self.groups}
        for key in sorted(lossy, key=lambda k: -self.sensitivity.get(k, 0.0)):
            while assignment[key] > 1:
                trial = {**assignment, key: assignment[key] - 1}
                if not fits(trial):
                    break
                assignment = trial
        return assignment

    def decisions(self, assignment: dict[str, str], spans: list[recompute.Segment] = ()) -> list[registry.Decision]:
        """What `assignment` (candidate key -> option) and `spans` (nested checkpoints
        around its segments) do, as a plan stores it."""
        chosen = [self.offered[k].decision(v) for k, v in self.compatible(assignment).items()]
        # the large weight gradients into .grad, but where a rewrite computes them itself (a
        # compressed or tiled convolution); a recomputed segment reruns the rewritten node
        covered = {n for d in chosen if d.strategy != "recompute" for n in d.nodes}
        into_grad = accumulate.decision({n: c for n, c in self.accumulated.items() if n not in covered})
        return into_grad + chosen + [registry.Decision("recompute", recompute.SPAN, span.nodes) for span in spans]

    def apply(self, assignment: dict[str, str], spans: list[recompute.Segment] = ()) -> fx.GraphModule:
        """The rewritten graph: segments recomputed (`spans` checkpointed around them),
        chains tiled or inverted, groups compressed."""
        return _rewritten(self.gm, self.decisions(assignment, spans), self.model, self.eval_gm)

    def plan(self, assignment: dict[str, str], budget: int | None, seconds: dict[str, float],
             spans: list[recompute.Segment] = ()) -> tuple[fx.GraphModule, Plan]:
        """The rewritten graph for `assignment` (with `spans` checkpointed around its
        segments) and its plan, profiled (verified) unless a profile of that very rewrite
        is at hand."""
        with self.clock("verify", f"{len(assignment)} rewrites, {len(spans)} spans"):
            return self._plan(assignment, budget, seconds, list(spans))

    def span_seconds(self, span: recompute.Segment) -> float:
        """Seconds a span adds: its nodes run forward once more (inner checkpoints without
        saving), and the checkpoint's own cost."""
        return self.rerun_seconds(span.nodes) + recompute.overhead_seconds("full", self.input_device)

    def _plan(self, assignment: dict[str, str], budget: int | None, seconds: dict[str, float],
              spans: list[recompute.Segment]) -> tuple[fx.GraphModule, Plan]:
        assignment = self.compatible(assignment)
        gm = self.apply(assignment, spans)
        known = []  # profiles of this very rewrite (recompute's records are composed, not profiled)
        if self.chains and assignment == {_INVERT + c.output: "invert" for c in self.chains}:
            known.append(self.inverted)
        for mode, costs in self.compressed.items():
            if self.groups and assignment == {g.key: mode for g in self.groups}:
                known.append(costs)
        for mode in _ROW_MODES:
            if self.tiled and assignment == {_ROWS + c.output: mode for c in self.tiled}:
                known.append(self.tiled_profiles[(self.row_granularity, mode)])
        if self.accumulated:  # those profiles are of the graph without weight gradients into .grad
            known = []
        rewritten = known[0] if known and not spans else self._profile(gm, {}) if assignment or spans else self.base
        simulation = simulate(rewritten)
        by_output = {s.output: s for s in self.segments if s.output in assignment}
        chains = {c.output: c for c in self.chains if _INVERT + c.output in assignment}
        fallback = None
        if any(c.can_fall_back for c in chains.values()):
            # the plan must hold after training too, when chains may keep their inputs instead
            with invert.assuming_fallback():
                fallback = simulate(self._profile(gm, {})).peak_bytes
        strategy: dict[str, tuple] = {}  # node -> (strategy, seconds, error factor[, compressed form])
        for out, segment in by_output.items():
            kept = segment.expensive if assignment[out] == "selective" else ()
            for n in segment.nodes:
                strategy[n] = ("keep" if n in kept else "recompute", seconds.get(out, 0.0) if n == out else 0.0, 1.0)
        for out, chain in chains.items():
            growth = 1.0
            for unit in reversed(chain.units):  # a unit's input is rebuilt through it and all after it
                growth *= unit.factor
                for n in unit.nodes:
                    strategy[n] = ("invert", seconds.get(_INVERT + out, 0.0) if n == out else 0.0, growth)
        forms = self._compressed_forms(assignment)
        for span in spans:  # its nodes rerun once more; its seconds at its output
            for n in span.nodes:
                name, added, growth, *form = strategy.get(n, ("recompute", 0.0, 1.0))
                strategy[n] = ("recompute", added + (self.span_seconds(span) if n == span.output else 0.0), growth, *form)
        for chain in self.tiled:
            if _ROWS + chain.output in assignment:
                for n in chain.nodes:
                    strategy[n] = ("row_split", seconds.get(_ROWS + chain.output, 0.0) if n == chain.output else 0.0, 1.0)
        for group in self.groups:
            if group.key in assignment:
                for n in group.nodes:
                    strategy[n] = ("compress", seconds.get(group.key, 0.0) if n == group.nodes[0] else 0.0, 1.0, forms[n])
        nodes = []
        for node in self.keep_all.nodes:
            if node.node in strategy:
                name, added, growth, *form = strategy[node.node]
                node = dataclasses.replace(node, strategy=name, seconds_added=added, error_factor=growth,
                                           compress_form=form[0] if form else "")
            nodes.append(node)
        plan = dataclasses.replace(
            self.keep_all, nodes=tuple(nodes), predicted_peak_bytes=simulation.peak_bytes,
            baseline_peak_bytes=self.eager_peak, budget_bytes=budget, peak_at=simulation.peak_at,
            peak_held_by=tuple((h.kind, h.node, h.nbytes) for h in peak_holders(rewritten)),
            decisions=tuple(self.decisions(assignment, spans)), granularity=self.granularity, absent=self.absent,
            timeline=step_timeline(simulation),
            row_granularity=self.row_granularity, fallback_peak_bytes=fallback,
        )
        return gm, plan


def _depth(spans: list[recompute.Segment]) -> int:
    """How many of `spans` (nested or disjoint) the node inside most of them is inside."""
    counts: dict[str, int] = {}
    for span in spans:
        for node in span.nodes:
            counts[node] = counts.get(node, 0) + 1
    return max(counts.values(), default=0)


def _optimize_for(model: nn.Module, budget: int, inputs: tuple, loss_fn: Callable, strategies: tuple[str, ...],
                  lossy: Lossy = Lossy()) -> fx.GraphModule:
    planner = _Planner(model, inputs, loss_fn, strategies, lossy, budget)
    try:
        return _plan_search(planner, budget, strategies, lossy)
    finally:
        log.info("planning took %.1f s: %s", sum(planner.clock.seconds.values()), planner.clock.summary(),
                 extra={"phases": dict(planner.clock.seconds)})


def _optimize_within(model: nn.Module, budget: int, inputs: tuple, loss_fn: Callable, strategies: tuple[str, ...],
                     lossy: Lossy, optimizer: torch.optim.Optimizer | None) -> fx.GraphModule:
    """`_optimize_for`, where with `optimizer` the budget is of device memory: what
    parameters, gradients and the optimizer's state hold is taken off it first, and
    the plan (or the BudgetError's) says so."""
    if optimizer is None:
        return _optimize_for(model, budget, inputs, loss_fn, strategies, lossy)
    split = held_outside_activations(model, optimizer)
    held = sum(b for _, b in split)
    parts = ", ".join(f"{what} {format_bytes(b)}" for what, b in split)
    try:
        optimized = _optimize_for(model, max(budget - held, 1), inputs, loss_fn, strategies, lossy)
    except BudgetError as error:
        minimum = error.minimum_bytes + held
        said = (f"budget_bytes={budget} ({format_bytes(budget)}) of device memory is below what the step holds besides "
                f"activations ({parts})" if budget <= held else
                f"budget_bytes={budget} ({format_bytes(budget)}) of device memory leaves {format_bytes(budget - held)} "
                f"for activations after {parts}, and {error}")
        raise BudgetError(f"{said}; the smallest device budget a plan reaches is {minimum} ({format_bytes(minimum)})",
                          minimum, dataclasses.replace(error.plan, device_split=split) if error.plan else None) from None
    optimized.plan = dataclasses.replace(optimized.plan, device_split=split)
    return optimized


def _plan_search(planner: _Planner, budget: int, strategies: tuple[str, ...], lossy: Lossy) -> fx.GraphModule:
    """The verified plan that adds the least time over every search, or BudgetError."""
    baseline = planner.eager_peak
    if budget >= baseline:
        gm, plan = planner.plan({}, budget, {})
        gm.plan = plan
        return gm
    if planner.accumulated and planner.keep_all.predicted_peak_bytes <= budget - _margin(budget) // 2:
        return _chosen(*planner.plan({}, budget, {}), budget)  # weight gradients into .grad suffice: no time added
    found, lowest = [], []
    # every way of cutting segments is searched with the invert chains and compress
    # groups beside it, and the plan that adds the least time wins (DenseNet-BC: whole
    # layers recomputed beat half layers at the same peak); row-split chains (costly in
    # time) join only where those find no plan: block-sized chains first, then joined
    # in pairs, whole-network ones last, each beside the ways of cutting segments in turn
    # until one finds a plan (a DenseNet's tiled layers need its fine segments beside them)
    for rows in (None, *row_split.GRANULARITIES) if "row_split" in strategies else (None,):
        if found:
            break
        if rows is not None and not planner.use_rows(rows):
            continue
        for granularity in recompute.GRANULARITIES if "recompute" in strategies else (None,):
            if rows is not None and found:  # each search beside row-split chains verifies tiled plans
                break
            if granularity is not None and not planner.use(granularity):
                continue
            if not planner.segments and not planner.chains and not planner.groups and not planner.tiled:
                continue
            if rows is None:
                best = min((_seconds_added(plan) for _, plan in found), default=None)
                outcomes = [_search(planner, budget, cheaper_than=best)]
            else:  # the most tiles first (the lowest peaks); fewer too (less halo time) once that fits
                beat = min(candidate.peak for candidate in lowest) if lowest else None
                outcomes = [_search(planner, budget, beat, tuple(_ROW_MODES)[-1:])]
                if isinstance(outcomes[0], tuple):
                    outcomes.append(_search(planner, budget, beat))
            for outcome in outcomes:
                if outcome is not None:
                    (found if isinstance(outcome, tuple) else lowest).append(outcome)
    if found:  # the verified plan that adds the least time
        gm, plan = min(found, key=lambda pair: _seconds_added(pair[1]))
        return _chosen(gm, plan, budget)
    verified: list[tuple[fx.GraphModule, Plan]] = []  # least composed peak first, until none can be lower
    for candidate in sorted(lowest, key=lambda c: c.peak):
        if verified and min(p.promised_peak_bytes for _, p in verified) <= candidate.peak:
            break
        verified.append(candidate.verify())
    if verified and min(p.promised_peak_bytes for _, p in verified) <= budget - _margin(budget) // 2:
        return _chosen(*min(verified, key=lambda pair: pair[1].promised_peak_bytes), budget)  # composed ran high
    witness = min((p for _, p in verified), key=lambda plan: plan.promised_peak_bytes) if verified else None
    reachable = witness.promised_peak_bytes if witness else simulate(planner.base).peak_bytes
    minimum = min(_smallest_budget(reachable), baseline)
    if witness is None or minimum == baseline:  # at the baseline, the graph unchanged
        witness = planner.plan({}, budget, {})[1]
    raise _budget_error(budget, minimum, strategies, lossy, dataclasses.replace(witness, budget_bytes=minimum))


def _seconds_added(plan: Plan) -> float:
    return sum(n.seconds_added for n in plan.nodes)


def _search(planner: _Planner, budget: int, beat: int | None = None,
            row_modes: tuple[str, ...] = tuple(_ROW_MODES), cheaper_than: float | None = None,
            ) -> tuple[fx.GraphModule, Plan] | _Lowest | None:
    """A verified plan for the planner's segments under `budget` (with its module), or
    else the lowest plan it could find (`_Lowest`: verified only if no search finds a
    plan); row-split chains are offered at the tile counts of `row_modes`. With `beat`
    (a row-split search after others failed), only the extreme plan of lowest composed
    peak is considered, and only if that peak is under `beat` (else None: nothing new).
    With `cheaper_than` (the estimated seconds of a verified plan found before), a
    solution estimated at no fewer seconds is not verified, and where solving finds no
    plan the extremes are not tried: None, since the plan found before stands."""
    with planner.clock("solve", f"{planner.granularity} segments"):  # less the profiles, pricing and verifications inside it
        planner.profile_modes(row_modes)  # and the candidates priced
        choices, options = planner.choices()
        return _solved(planner, budget, beat, choices, options, cheaper_than)


def _solved(planner: _Planner, budget: int, beat: int | None, choices: list[Choice],
            options: dict[str, tuple[str, ...]], cheaper_than: float | None) -> tuple[fx.GraphModule, Plan] | _Lowest | None:
    """`_search`'s solve over priced choices, and its verifications."""

    def modes_of(assignment: dict[str, int]) -> dict[str, str]:
        return {k: options[k][v - 1] for k, v in assignment.items()}

    def seconds_of(assignment: dict[str, int]) -> dict[str, float]:
        return {c.key: c.seconds[assignment[c.key]] for c in choices if c.key in assignment}

    def peak(assignment: dict[str, int]) -> int:
        return planner.composed_peak(modes_of(assignment))

    room = budget - _margin(budget) // 2  # what a verified plan's predicted peak must stay under
    limit = budget - _margin(budget)
    scheduled = beat is None and bool(planner.segments)  # the schedule solver is still to try

    def flat(descend: bool) -> tuple[fx.GraphModule, Plan] | None:
        nonlocal limit, scheduled
        for _ in range(3):
            solution = _solve_widest(choices, peak, limit, descend=descend, scheduled=scheduled)
            if not solution.fits:
                return None
            assignment = planner.widened(solution.assignment, options, lambda a: peak(a) <= limit)
            seconds = seconds_of(assignment)
            estimated = sum(seconds[k] for k in planner.compatible(modes_of(assignment)))
            if cheaper_than is not None and estimated >= cheaper_than:
                return None  # estimated no cheaper than the plan verified before: it could not be chosen
            if scheduled:  # nested checkpoints may cost less than the flat plan
                scheduled = False
                found = _scheduled(planner, budget, limit, cheaper_than=estimated)
                if found is not None:
                    return found
            gm, plan = planner.plan(modes_of(assignment), budget, seconds)
            if plan.promised_peak_bytes <= room:
                return gm, plan
            limit -= plan.promised_peak_bytes - solution.peak_bytes + _margin(budget) // 2  # composed ran low: tighten
        return None

    found = None
    if scheduled and planner.schedule_covers():
        scheduled = False  # the schedule weighs every choice, stage by stage: the flat search only where it fails
        found = _scheduled(planner, budget, limit, cheaper_than=cheaper_than)
        if found is None and cheaper_than is not None:
            return None  # and a plan was found before, which the flat search would hardly beat
    if found is None:
        found = flat(descend=False)
    if found is None and scheduled:
        scheduled = False
        found = _scheduled(planner, budget, limit, cheaper_than=cheaper_than)
    if found is None and cheaper_than is None:
        found = flat(descend=True)
    if found is not None:
        return found
    if cheaper_than is not None:  # a plan was found before, and no plan is found here by solving
        return None
    # Fall back on the extremes (every segment at its first, or at its last, option,
    # with the chains they leave; every chain alone), verified on the rewritten graph:
    # deterministic, so the minimum that an error names is a budget at which this plan
    # is found and fits.
    extremes = [{c.key: len(c.seconds) - 1 for c in choices}, {c.key: 1 for c in choices}]
    sources = [bool(planner.segments), bool(planner.chains), bool(planner.groups), bool(planner.tiled)]
    if sum(sources) > 1:
        extremes += [{c.key: 1 for c in choices if c.key.startswith(prefix)} for prefix, used
                     in ((_INVERT, planner.chains), (_COMPRESS, planner.groups)) if used]
        extremes.append({c.key: 1 for c in choices if c.key.startswith((_INVERT, _COMPRESS))})
    if planner.tiled:  # the chains at the most tiles first, what is left recomputed, inverted, compressed
        most = {c.key: len(c.seconds) - 1 for c in choices if c.key.startswith(_ROWS)}
        tiled = frozenset().union(*(c.members for c in choices if c.key.startswith(_ROWS)))
        extremes += [most, {**{c.key: len(c.seconds) - 1 for c in choices if not tiled & c.members}, **most}]
    extremes = [e for i, e in enumerate(extremes) if e not in extremes[:i]]
    # the extreme of lowest composed peak, verified; then each choice moved to a cheaper
    # option where the composed peak stays within the extreme's (a segment whose backward
    # comes after the peak can be kept), verified, and kept if its peak is no higher
    # (tiled chains beside segments compose approximately)
    extreme = min(extremes, key=peak)
    ceiling = peak(extreme)
    if beat is not None and ceiling >= beat:  # a search beside row-split chains: nothing new
        return None
    cheaper = relaxed(choices, extreme, lambda a: peak(a) <= ceiling)
    state = planner.snapshot()

    def flat() -> tuple[fx.GraphModule, Plan]:
        with planner.restored(state):
            gm, plan = planner.plan(modes_of(extreme), budget, seconds_of(extreme))
            if cheaper != extreme:
                gm2, plan2 = planner.plan(modes_of(cheaper), budget, seconds_of(cheaper))
                if plan2.promised_peak_bytes <= plan.promised_peak_bytes:
                    gm, plan = gm2, plan2
        return gm, plan

    lowest = _Lowest(ceiling, flat)
    if ceiling <= room:  # it may fit: verify it now
        gm, plan = flat()
        if plan.promised_peak_bytes <= room:
            return gm, plan
        lowest = _Lowest(plan.promised_peak_bytes, lambda: (gm, plan))
    if beat is None and planner.segments:
        nested = _nested(planner, budget, {c.key: c.seconds[-1] for c in choices}, limit)
        if isinstance(nested, tuple):
            return nested
        if nested.peak < lowest.peak:
            return nested
    return lowest


@dataclasses.dataclass(frozen=True)
class _Lowest:
    """The lowest plan a search reached where none fit: its peak (composed, until it is
    verified: verifying costs a profile, needed only if no search finds a plan) and how
    to verify it."""

    peak: int
    verify: Callable[[], tuple[fx.GraphModule, Plan]]


def _scheduled(planner: _Planner, budget: int, limit: int, cheaper_than: float | None = None,
               ) -> tuple[fx.GraphModule, Plan] | None:
    """The schedule of least added seconds (`_Planner.scheduled`: each segment's mode and
    nested spans around them) whose composed peak is within `limit`, verified: a plan
    under `budget`, or None (also where the schedule is estimated at no fewer seconds
    than `cheaper_than`). The schedule's sums err either way on mixed plans, so the
    limit it is given moves: down by what its plan's composed peak ran over, halfway
    back up where that leaves no schedule, down again by what verifying ran over."""
    room = budget - _margin(budget) // 2
    target, infeasible, over = limit, 0, None  # the limit given; highest with no schedule; lowest ran over
    for _ in range(_ROUNDS):
        found = planner.scheduled(target)
        if found is None:
            infeasible = target
            if over is None or over - target <= _margin(budget):
                return None
            target = (target + over) // 2
            continue
        modes, spans, estimated = found
        if cheaper_than is not None and estimated >= cheaper_than:
            return None
        composed = planner.composed_peak(modes, spans)
        log.debug("schedule under %d: %d spans, %.4f s, composed peak %d for limit %d", target, len(spans), estimated,
                  composed, limit)
        if composed > limit:  # the schedule's sums ran low
            over = target
            target = max(target - (composed - limit) - _margin(budget) // 2, (infeasible + target) // 2)
            continue
        gm, verified = planner.plan(modes, budget, planner.mode_seconds(modes), spans)
        if verified.promised_peak_bytes <= room:
            return gm, verified
        log.debug("schedule verified at %d, composed %d", verified.promised_peak_bytes, composed)
        overshoot = verified.promised_peak_bytes - composed + _margin(budget) // 2
        limit, target, over = limit - overshoot, target - overshoot, target
    return None


_ROUNDS = 8  # schedules tried, each under a limit moved by what the last one gave


def _nested(planner: _Planner, budget: int, full_seconds: dict[str, float], limit: int) -> tuple[fx.GraphModule, Plan] | _Lowest:
    """Where no flat plan fits: every segment recomputed in full, with nested
    checkpoints around them (`_Planner.lowest_spans`); a verified plan under `budget`,
    else the lowest plan the spans reach."""
    modes = {s.output: "full" for s in planner.segments}
    seconds = {out: full_seconds.get(out, 0.0) for out in modes}
    room = budget - _margin(budget) // 2
    state = planner.snapshot()
    lowest = None
    for _ in range(3):
        spans, composed = planner.lowest_spans(modes, limit)
        if composed > limit:  # the lowest the spans reach: verified only if needed

            def verify(spans=spans) -> tuple[fx.GraphModule, Plan]:
                with planner.restored(state):
                    return planner.plan(modes, budget, seconds, spans)

            return lowest if lowest is not None and lowest.peak <= composed else _Lowest(composed, verify)
        gm, verified = planner.plan(modes, budget, seconds, spans)
        if verified.promised_peak_bytes <= room:
            return gm, verified
        if lowest is None or verified.promised_peak_bytes < lowest.peak:
            lowest = _Lowest(verified.promised_peak_bytes, lambda pair=(gm, verified): pair)
        limit -= verified.promised_peak_bytes - composed + _margin(budget) // 2
    return lowest


def _solve_widest(choices: list[Choice], peak: Callable, limit: int, descend: bool = True, scheduled: bool = False):
    """`_solve_families` with the compress groups held to their widest option, then to
    the widest two, and so on: a narrower width is used only where the wider ones do
    not fit (widths cost about the same time; narrower ones err more)."""
    widths = max((len(c.seconds) - 1 for c in choices if c.key.startswith(_COMPRESS)), default=1)
    for allowed in range(1, widths + 1):
        held = [dataclasses.replace(c, seconds=c.seconds[: allowed + 1], saved_bytes=c.saved_bytes[: allowed + 1])
                if c.key.startswith(_COMPRESS) else c for c in choices]
        solution = _solve_families(held, peak, limit, descend, scheduled)
        if solution.fits or allowed == widths:
            return solution


def _solve_families(choices: list[Choice], peak: Callable, limit: int, descend: bool = True, scheduled: bool = False):
    """`solve` over all choices, and again without the invert chains, without the
    compress groups, and without both: the greedy search takes choices in rank order, so
    a cheap group can block a chain that would have done better, and the memory a group
    frees can lead it to segments that cost more than recompute alone needs (measured:
    ResNet-50 at 0.5 of its peak, 0.163 s added with two groups against 0.081 s with
    none). The fitting solution that adds the least time. The greedy search's descent
    (its last resort, a pass of evaluations per choice and option) runs only where no
    family fits without it, over all choices only, and only if `descend`. With
    `scheduled` (the schedule solver is to search the segments alone, nested too), the
    family without both is left to it."""
    present = [prefix for prefix in (_INVERT, _COMPRESS) if any(c.key.startswith(prefix) for c in choices)]
    dropped = [(prefix,) for prefix in present] + ([tuple(present)] if len(present) > 1 else [])
    if scheduled and present:  # the schedule solver searches the recompute segments alone, and nested too
        dropped = [d for d in dropped if set(d) != set(present)]
    families = [choices] + [rest for prefixes in dropped
                            if (rest := [c for c in choices if not c.key.startswith(prefixes)])]
    solutions = [solve(family, peak, limit, descend=False) for family in families]
    if descend and not any(s.fits for s in solutions):
        solutions.append(solve(choices, peak, limit))
    fitting = [s for s in solutions if s.fits]
    return min(fitting, key=lambda s: s.seconds) if fitting else min(solutions, key=lambda s: s.peak_bytes)


def _chosen(gm: fx.GraphModule, plan: Plan, budget: int) -> fx.GraphModule:
    log.info("plan: %d segments recomputed, %d spans checkpointed around segments, %d chains inverted, %d nodes "
             "compressed, %d chains row-split, %d weight gradients into .grad, predicted peak %s for budget %s",
             len(plan.segments), len(plan.spans), len(plan.inverted), len(plan.compressed), len(plan.row_split),
             len(plan.accumulated), format_bytes(plan.predicted_peak_bytes), format_bytes(budget))
    gm.plan = plan
    return gm


def _smallest_budget(peak: int) -> int:
    """The least budget under which a verified plan with this predicted peak is accepted."""
    budget = peak + _margin(peak) // 2
    while budget - _margin(budget) // 2 < peak:
        budget += peak - (budget - _margin(budget) // 2)
    return budget


def _shapes(gm: fx.GraphModule, costs: Costs, inputs: tuple) -> dict[str, tuple[int, ...]]:
    """Each node's (first) output shape, the tensor inputs' included (a float input
    has none: it took the next tensor input's shape, and a row-split chain took it
    for a tensor)."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = {name: tuple(value.shape) for name, value in zip(placeholders, inputs) if isinstance(value, torch.Tensor)}
    shapes.update({n.name: tuple(n.shapes[0]) for n in costs.nodes if n.shapes})
    return shapes


def _budget_error(budget: int, minimum: int, strategies: tuple[str, ...], lossy: Lossy = Lossy(),
                  plan: Plan | None = None) -> BudgetError:
    unused = [s for s in AVAILABLE_STRATEGIES if s not in strategies]
    ways = ["raise the budget", "use a smaller batch (rewriter.largest_batch)"]
    if unused:
        ways.append(f"allow strategies {unused}")
    if "compress" in strategies and not lossy:
        ways.append("allow lossy compression (compress_bits=4 or compress_error=0.05)")
    held = plan.unrewritable_at_peak() if plan is not None else ""
    return BudgetError(
        f"budget_bytes={budget} ({format_bytes(budget)}) is below the smallest reachable peak "
        f"{format_bytes(minimum)} ({minimum} bytes) for this model and input with strategies {strategies}"
        f"{'; ' + held if held else ''}; {', '.join(ways[:-1])} or {ways[-1]}",
        minimum,
        plan,
    )


class LazyOptimized(nn.Module):
    """What `optimize` returns without example inputs: plans on the first call for each
    input signature (shapes, dtypes, devices) and runs that plan's module; in eval mode
    or without gradients (no backward: nothing to plan), it runs the model itself. It
    has the model's state_dict keys and shares its parameters."""

    def __init__(self, model: nn.Module, budget: int, loss_fn: Callable, strategies: tuple[str, ...], lossy: Lossy = Lossy(),
                 verbose: bool = False, optimizer: torch.optim.Optimizer | None = None):
        super().__init__()
        recompute.adopt_structure(self, model)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_planned", {})
        self.budget_bytes = budget
        self._loss_fn = loss_fn
        self._strategies = strategies
        self._lossy = lossy
        self._verbose = verbose
        object.__setattr__(self, "_optimizer", optimizer)
        self.plan: Plan | None = None

    def forward(self, *args, **kwargs):
        if not self.training or not torch.is_grad_enabled():  # no backward: nothing to plan, the model as it is
            self._model.training = self.training
            return self._model(*args, **kwargs)
        inputs = bind_inputs(self._model, args, kwargs)
        key = tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t) for t in inputs)
        if key not in self._planned:
            with verbose_logging(self._verbose):
                self._planned[key] = _optimize_within(self._model, self.budget_bytes, inputs, self._loss_fn,
                                                      self._strategies, self._lossy, self._optimizer)
        module = self._planned[key]
        self.plan = module.plan
        return module(*inputs)


def optimize(
    model: nn.Module,
    budget_bytes: int | str,
    example_inputs: Any = None,
    *,
    strategies: str | tuple[str, ...] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    compress_bits: int | None = None,
    compress_error: float | None = None,
    verbose: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """A module that trains `model`'s own parameters to the same results with a training
    step whose peak activation memory stays under `budget_bytes` (an int, or "512MiB").

    With `example_inputs`, plans now and returns a GraphModule with `.plan`; without,
    returns a module that plans on the first call for each input signature.
    `strategies` chooses the strategies used (default: all of `STRATEGIES`; row-split
    is searched only where the others find no plan; "accumulate", which adds large
    weight gradients into `.grad` in place at no cost in time, is taken by every plan
    below the eager peak). Compression
    is lossless unless asked for: `compress_bits` (8, 4 or 2) lets the solver keep
    convolution, linear and BatchNorm inputs at 8 bits, or narrower down to that width
    where the budget needs it; `compress_error` (e.g.
    1e-2) gives each such tensor the fewest bits whose rounding error stays under
    that fraction of its largest magnitude. The forward stays exact either way. Raises
    BudgetError (with `.minimum_bytes`) when no plan fits. With `optimizer` (the one
    that will train `model`), `budget_bytes` is of device memory: parameters, their
    gradients and the optimizer's state (as it allocates it: Adam's two moments, SGD's
    momentum) are taken off it, the rest bounds the activation peak, and the plan's
    `device_split` shows the split. With `verbose`, each phase of
    planning and its seconds (and how far a long one is) go to standard error, as the
    "rewriter" logger's INFO records (logging configured by the caller is used as it
    is). Interrupted (Ctrl-C), it raises KeyboardInterrupt with `model` as it was.
    """
    budget = parse_budget(budget_bytes)
    chosen = _strategies(strategies)
    lossy = Lossy(compress_bits, compress_error)
    if lossy and "compress" not in chosen:
        raise InputError(f"compress_bits/compress_error ask for compression, but strategies={chosen} leaves it out")
    check_trainable(model)
    loss_fn = loss_fn or default_loss
    if example_inputs is None:
        return LazyOptimized(model, budget, loss_fn, chosen, lossy, verbose, optimizer)
    with verbose_logging(verbose):
        return _optimize_within(model, budget, as_input_tuple(example_inputs, model), loss_fn, chosen, lossy, optimizer)


def apply_plan(model: nn.Module, plan: Plan) -> fx.GraphModule:
    """Rewrite `model` as a stored `plan` says, without solving again."""
    check_trainable(model)
    captured = capture(model, plan.opaque, plan.absent, _inputs_shaped_as(model, plan))
    decisions = plan.decisions or _legacy_decisions(captured, plan)
    try:
        rewritten = _rewritten(captured.gm, decisions, model, captured.eval_gm)
    except ValueError as error:
        raise InputError(f"{error}; was the plan made for another model?") from None
    rewritten.plan = plan
    return rewritten


def _inputs_shaped_as(model: nn.Module, plan: Plan) -> tuple | None:
    """Inputs of the plan's shapes (float32, on the meta device) for a forward that
    branches on sizes; None where the plan's shapes do not give each of forward's inputs."""
    names = list(inspect.signature(model.forward).parameters)
    if sum(n not in plan.absent for n in names) != len(plan.input_shapes):
        return None
    shapes = iter(plan.input_shapes)
    return tuple(None if n in plan.absent else torch.empty(next(shapes), device="meta") for n in names)


def _rewritten(gm: fx.GraphModule, decisions, model: nn.Module, eval_gm: fx.GraphModule | None) -> fx.GraphModule:
    """`gm` with `decisions` carried out (`registry.apply`), always a new module with
    `model`'s state_dict keys, running `eval_gm` after `.eval()` (`trace.with_eval_path`)."""
    rewritten = registry.apply(gm, decisions)
    if rewritten is gm:
        rewritten = fx.GraphModule(gm, gm.graph, class_name=type(model).__name__)
    recompute.adopt_structure(rewritten, model)
    return with_eval_path(rewritten, eval_gm)


def _legacy_decisions(captured, plan: Plan) -> list[registry.Decision]:
    """The decisions of a plan written before plans stored them: each rewrite's nodes
    found again from the graph, cut as the plan says (its granularities)."""
    gm, opaque = captured.gm, captured.opaque
    segments = recompute.segments(gm, opaque, plan.granularity)
    by_output = {s.output: s for s in segments}
    unknown = [out for out, _ in plan.segments if out not in by_output] + [o for span in plan.spans for o in span if o not in by_output]
    if unknown:
        raise InputError(f"plan segments {unknown} are not segments of this model's graph; was the plan made for another model?")
    try:
        spans = [recompute.span(gm, segments, first, last, opaque) for first, last in plan.spans]
    except ValueError as error:
        raise InputError(f"plan spans {plan.spans}: {error}") from None
    if None in spans:
        raise InputError(f"plan spans {plan.spans} do not all enclose what they checkpoint in this model's graph; "
                         "was the plan made for another model?")
    decisions = [registry.Decision("recompute", mode, by_output[out].nodes) for out, mode in plan.segments]
    decisions += [registry.Decision("recompute", recompute.SPAN, span.nodes) for span in spans]
    if plan.row_split:
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        shapes = {**dict(zip(placeholders, plan.input_shapes)), **{n.node: n.shape for n in plan.nodes}}
        tiled = {c.output: c for c in row_split.chains(gm, shapes, opaque, plan.row_granularity)}
        for out, tiles, halo, axis in plan.row_split:
            if out not in tiled:
                raise InputError(f"row_split: no chain ends at node {out!r} in this graph; was the plan made for another model?")
            decisions.append(registry.Decision("row_split", f"rows{tiles}", tiled[out].nodes, (tiles, axis, halo)))
    if plan.inverted:
        candidates = invert.chains(gm, opaque, bound=math.inf)
        try:
            chains = [invert.chain_between(candidates, first, last) for first, last in plan.inverted]
        except KeyError as error:
            raise InputError(f"{error.args[0]}; was the plan made for another model?") from None
        decisions += [registry.Decision("invert", "invert", c.nodes, (c.input,)) for c in chains]
    decisions += [registry.Decision("compress", "compress", (node,), (form,)) for node, form in plan.compressed]
    return decisions
