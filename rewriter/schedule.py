"""Choose which checkpoints to keep: the least added seconds of a nested recompute
schedule over a chain of stages under a memory limit.

A dynamic programme over discretised memory in the manner of rotor (Beaumont et al.,
"Optimal checkpointing for heterogeneous chains", 2019; Rockmate, ICML 2023). Stages
are processed in order; for the stages s..t with `u` bytes held by what came before,
the least seconds are those of the best of

- an option of stage s (keep it, or its own recompute modes): the stage holds its
  `kept` bytes while s+1..t run, and its forward and backward must fit over `u`;
- a span s..j (s < j < t) checkpointed around its stages: its forward runs without
  saving, only stage j's `output` is held while j+1..t run, then s..j run again under
  the same `u`, solved the same way (nested spans inside it).

At the top level (t the last stage) every option may be taken; inside a span only the
options marked `nestable` (a selective checkpoint is not rerun inside another).
The solver never looks at a graph: the planner maps stages to segments and checks the
schedule it gets on the exact composed costs, tightening the limit where they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Stage", "Schedule", "solve_schedule", "estimate"]

_SPAN = 1 << 12  # choice codes: an option index, or _SPAN + j for a span ending at stage j


@dataclass(frozen=True)
class Stage:
    """One stage's options (option 0 leaves it as it is), each with the seconds it adds,
    the bytes it holds from its forward to its backward, and the highest bytes of its
    forward and of its backward above what the stages before it hold; `output`: the
    bytes held where a span ends at it; `rerun`: the seconds of its forward once more."""

    seconds: tuple[float, ...]
    kept: tuple[int, ...]
    forward: tuple[int, ...]
    backward: tuple[int, ...]
    nestable: tuple[bool, ...]
    output: int
    rerun: float


    def only(self, options: tuple[int, ...], nestable: tuple[bool, ...]) -> "Stage":
        """This stage with `options` alone (by index, in that order), nestable as said."""
        return Stage(*(tuple(getattr(self, f)[k] for k in options) for f in ("seconds", "kept", "forward", "backward")),
                     nestable, self.output, self.rerun)


@dataclass(frozen=True)
class Schedule:
    options: tuple[int, ...]  # per stage, its option
    spans: tuple[tuple[int, int], ...]  # (first stage, last stage), outer spans first
    seconds: float

    @property
    def depth(self) -> int:
        """How many spans the most deeply nested stage is inside."""
        return max((sum(1 for s, j in self.spans if s <= i <= j) for i in range(len(self.options))), default=0)


def solve_schedule(stages: list[Stage], limit: int, spannable: Callable[[int, int], bool], span_seconds: float = 0.0,
                   cells: int = 256) -> Schedule | None:
    """The schedule of least estimated seconds whose estimated peak is within `limit`
    (memory in `cells` steps), or None where none is; `spannable(s, j)`: whether a span
    may run from stage s to stage j; `span_seconds`: a span's own cost."""
    count = len(stages)
    if count == 0 or limit <= 0:
        return None
    quantum = limit / cells
    inf = np.inf
    index = np.arange(cells + 1)

    def cells_of(nbytes: float) -> int:
        return int(round(nbytes / quantum))

    def room(need: float) -> int:
        """The most cells held before a step needing `need` bytes over them fits."""
        return int(np.floor((limit - need) / quantum + 1e-9))

    kept = [[cells_of(b) for b in stage.kept] for stage in stages]
    fits = [[room(max(f, b)) for f, b in zip(stage.forward, stage.backward)] for stage in stages]
    output = [cells_of(stage.output) for stage in stages]
    full = [_span_option(s) for s in stages]  # a span's forward
    span_room = [room(s.forward[full[i]] + (stages[i - 1].output if i else 0)) for i, s in enumerate(stages)]
    rerun = np.concatenate([[0.0], np.cumsum([s.rerun for s in stages])])
    empty = np.zeros(cells + 1)

    def shifted(values: np.ndarray, by: int) -> np.ndarray:
        """values[u + by] at each u (`by` >= 0: bytes are never negative), inf past the end."""
        return np.concatenate([values[by:], np.full(min(by, cells + 1), inf)])

    def best(s: int, t: int, tail: Callable[[int], np.ndarray], after: np.ndarray, inner: bool,
             ) -> tuple[np.ndarray, np.ndarray]:
        """Least seconds for stages s..t over held cells, and the choice made; `after[j]`:
        the least seconds of stages j+1..t over cells, with stage j's output held."""
        value = np.full(cells + 1, inf)
        choice = np.full(cells + 1, -1, dtype=np.int32)
        stage = stages[s]
        for k in range(len(stage.seconds)):
            if inner and not stage.nestable[k]:
                continue
            trial = stage.seconds[k] + shifted(tail(s + 1), kept[s][k])
            trial[index > fits[s][k]] = inf
            better = trial < value
            value[better], choice[better] = trial[better], k
        ends = np.array([j for j in range(s + 1, t) if span_fit[s, j] >= 0 and spannable(s, j)], dtype=int)
        if len(ends):  # every span s..j at once
            trials = rows[s, ends] + after[ends] + (rerun[ends + 1] - rerun[s] + span_seconds)[:, None]
            trials[index[None, :] > span_fit[s, ends][:, None]] = inf
            first = trials.argmin(axis=0)  # the shortest of equal spans
            lowest = trials[first, index]
            better = lowest < value
            value[better], choice[better] = lowest[better], _SPAN + ends[first[better]]
        return value, choice

    # span_fit[s, j]: the most cells held before a span s..j whose forward fits (the least room of its stages)
    span_fit = np.full((count, count), -1)
    for s in range(count):
        span_fit[s, s:] = np.minimum.accumulate(span_room[s:])

    # inside spans: every range s..t, shortest first (none where no span may be taken)
    within: dict[tuple[int, int], np.ndarray] = {}
    rows = np.full((count, count, cells + 1), inf)  # rows[s, t] = within[(s, t)]
    chosen_within: dict[tuple[int, int], np.ndarray] = {}
    any_span = any(spannable(s, j) for s in range(count) for j in range(s + 1, count - 1))
    inner_after: dict[int, np.ndarray] = {}  # t -> after[j] of ranges ending at t, rows filled as they are solved
    for length in range(1, count) if any_span else ():
        for s in range(0, count - length):
            t = s + length - 1
            after = inner_after.setdefault(t, np.full((count, cells + 1), inf))
            within[(s, t)], chosen_within[(s, t)] = best(s, t, lambda r, t=t: within[(r, t)] if r <= t else empty,
                                                         after, True)
            rows[s, t] = within[(s, t)]
            if s > 0:  # a span ending at stage s - 1 holds its output while s..t run
                after[s - 1] = shifted(within[(s, t)], output[s - 1])
    # the top level: every suffix s..count-1
    top: dict[int, np.ndarray] = {count: empty}
    chosen_top: dict[int, np.ndarray] = {}
    top_after = np.full((count, cells + 1), inf)
    for s in range(count - 1, -1, -1):
        top[s], chosen_top[s] = best(s, count - 1, lambda r: top[r], top_after, False)
        if s > 0:
            top_after[s - 1] = shifted(top[s], output[s - 1])
    if not np.isfinite(top[0][0]):
        return None

    options = [0] * count
    spans: list[tuple[int, int]] = []

    def walk(s: int, t: int, held: int, table: dict, at: Callable) -> None:
        while s <= t:
            code = int(table[at(s, t)][held])
            if code < _SPAN:
                options[s] = code
                held += kept[s][code]
                s += 1
                continue
            j = code - _SPAN
            spans.append((s, j))
            walk(s, j, held, chosen_within, lambda a, b: (a, b))
            held += output[j]
            s = j + 1

    walk(0, count - 1, 0, chosen_top, lambda a, b: a)
    return Schedule(tuple(options), tuple(spans), float(top[0][0]))


def estimate(stages: list[Stage], options: tuple[int, ...], spans: tuple[tuple[int, int], ...]) -> int:
    """The peak the schedule solver's sums give for a schedule (spans nested or
    disjoint): its stages forward and backward in turn, each span's forward without
    saving, its output held while what follows runs, then its stages again."""
    peak = 0

    def run(s: int, t: int, held: int, around: tuple[int, int] | None) -> None:
        nonlocal peak
        while s <= t:
            outer = [j for a, j in spans if a == s and j <= t and (a, j) != around]
            if outer:
                j = max(outer)
                for i in range(s, j + 1):
                    nest = _span_option(stages[i])
                    peak = max(peak, held + stages[i].forward[nest] + (stages[i - 1].output if i else 0))
                run(j + 1, t, held + stages[j].output, around)
                run(s, j, held, (s, j))
                return
            k = options[s]
            peak = max(peak, held + stages[s].forward[k], held + stages[s].backward[k])
            held += stages[s].kept[k]
            s += 1

    run(0, len(stages) - 1, 0, None)
    return peak


def _span_option(stage: Stage) -> int:
    """The option a span's forward runs its stage in: the nestable one keeping least."""
    return max(range(len(stage.seconds)), key=lambda k: (stage.nestable[k], -stage.kept[k]))
