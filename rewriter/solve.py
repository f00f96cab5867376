"""Choose one option per choice: least added seconds with a predicted peak within a limit.

Generic over where the options come from: a choice is a key and the seconds each of
its options adds (option 0 is "leave it as it is", adding nothing); `peak(assignment)`
predicts the peak of any assignment (key -> option index). Two choices whose
`members` meet (a recompute segment and an invert chain over the same nodes) are
never both taken. The solver never looks at a graph.

- Up to `EXACT_LIMIT` assignments: all of them, cheapest first; the first that fits
  is the optimum.
- Beyond: greedy by bytes saved per second added, the prefix that fits found by
  bisection, then each chosen option moved to a cheaper one where the whole still fits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from rewriter.phases import Progress

__all__ = ["Choice", "Solution", "solve", "relaxed", "EXACT_LIMIT"]

EXACT_LIMIT = 4096


@dataclass(frozen=True)
class Choice:
    key: str
    seconds: tuple[float, ...]  # seconds added by each option; option 0 adds 0
    saved_bytes: tuple[int, ...] = ()  # bytes each option takes off the kept memory (for ordering)
    members: frozenset = frozenset()  # what it rewrites: choices whose members meet exclude each other


def _conflicts(chosen: list[Choice]) -> bool:
    seen: set = set()
    for choice in chosen:
        if seen & choice.members:
            return True
        seen |= choice.members
    return False


@dataclass(frozen=True)
class Solution:
    """`fits`: the assignment of least added seconds whose peak is within the limit;
    else the assignment of lowest peak the search saw."""

    assignment: dict[str, int]  # only the keys with an option other than 0
    seconds: float
    peak_bytes: int
    evaluations: int
    fits: bool


def solve(choices: list[Choice], peak: Callable[[dict[str, int]], int], limit: int, descend: bool = True) -> Solution:
    """The assignment of least added seconds whose `peak` is at most `limit`. Without
    `descend`, the greedy search gives up where neither a ranked prefix nor an extreme
    fits, instead of descending (a pass of evaluations per choice and option)."""
    calls = 0
    lowest: tuple[int, dict[str, int]] | None = None
    progress = Progress("solve: plans evaluated")

    def evaluate(assignment: dict[str, int]) -> int:
        nonlocal calls, lowest
        calls += 1
        progress.tick(calls)
        value = peak(assignment)
        if lowest is None or value < lowest[0]:
            lowest = (value, dict(assignment))
        return value

    def seconds_of(assignment: dict[str, int]) -> float:
        by_key = {c.key: c for c in choices}
        return sum(by_key[k].seconds[o] for k, o in assignment.items())

    total = 1
    for choice in choices:
        total *= len(choice.seconds)
    if total <= EXACT_LIMIT:
        options = []
        for picks in itertools.product(*(range(len(c.seconds)) for c in choices)):
            if _conflicts([c for c, p in zip(choices, picks) if p]):
                continue
            seconds = sum(c.seconds[p] for c, p in zip(choices, picks))
            options.append((seconds, picks))
        options.sort(key=lambda item: (item[0], sum(1 for p in item[1] if p)))
        for seconds, picks in options:
            assignment = {c.key: p for c, p in zip(choices, picks) if p}
            predicted = evaluate(assignment)
            if predicted <= limit:
                return Solution(assignment, seconds, predicted, calls, True)
    else:
        found = _greedy(choices, evaluate, limit, descend)
        if found is not None:
            return Solution(found, seconds_of(found), evaluate(found), calls, True)
    return Solution(lowest[1], seconds_of(lowest[1]), lowest[0], calls, False)


def _greedy(choices, evaluate, limit, descend: bool = True) -> dict[str, int] | None:
    """Choices ranked by bytes saved per second of their best option; the shortest
    ranked prefix that fits (by bisection), or else the cheaper extreme (every choice at
    its first or its last option) that fits, or else coordinate descent on the peak;
    then each chosen option moved to a cheaper one where the rest still fits."""
    ranked = []
    for choice in choices:
        best = max(range(1, len(choice.seconds)), key=lambda o: choice.saved_bytes[o] if choice.saved_bytes else o)
        ratio = (choice.saved_bytes[best] if choice.saved_bytes else 1) / max(choice.seconds[best], 1e-12)
        ranked.append((ratio, choice, best))
    ranked.sort(key=lambda item: -item[0])
    by_key = {c.key: c for c in choices}
    cache: dict[frozenset, int] = {}

    def fits(assignment: dict[str, int]) -> bool:
        key = frozenset(assignment.items())
        if key not in cache:
            cache[key] = evaluate(assignment)
        return cache[key] <= limit

    def seconds(assignment: dict[str, int]) -> float:
        return sum(by_key[k].seconds[o] for k, o in assignment.items())

    def taken(pairs) -> dict[str, int]:
        """The pairs (choice, option) in order, less those that meet one taken before."""
        assignment, seen = {}, set()
        for choice, option in pairs:
            if not seen & choice.members:
                assignment[choice.key] = option
                seen |= choice.members
        return assignment

    def prefix(k: int) -> dict[str, int]:
        return taken((c, o) for _, c, o in ranked[:k])

    in_rank = [c for _, c, _ in ranked]
    extremes = [taken((c, 1) for c in in_rank), taken((c, len(c.seconds) - 1) for c in in_rank)]
    feasible_extremes = [e for e in extremes if fits(e)]
    if fits(prefix(len(ranked))):
        low, high = 0, len(ranked)
        while low < high:  # the shortest prefix that fits
            middle = (low + high) // 2
            if fits(prefix(middle)):
                high = middle
            else:
                low = middle + 1
        assignment = prefix(low)
    elif feasible_extremes:
        assignment = min(feasible_extremes, key=seconds)
    elif not descend:
        return None
    else:  # costs that do not add up: coordinate descent on the peak, two passes at most
        assignment, current = {}, evaluate({})
        for _ in range(2):
            for _, choice, _ in ranked:
                for option in range(len(choice.seconds)):
                    trial = {k: v for k, v in assignment.items() if k != choice.key}
                    if option:
                        trial[choice.key] = option
                        if _conflicts([by_key[k] for k in trial]):
                            continue
                    value = evaluate(trial) if trial != assignment else current
                    if value < current:
                        assignment, current = trial, value
                if current <= limit:
                    break
            if current <= limit:
                break
        if current > limit:
            return None
    return relaxed(choices, assignment, fits)


def relaxed(choices: list[Choice], assignment: dict[str, int], fits: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """`assignment` with each choice, dearest first, moved to the cheapest option
    (leaving it as it is included) with which the whole still `fits`. After a choice is
    left as it is, the next two are tried together, then four, and so on, back to one
    at a time where a group does not fit: the same result where leaving more choices
    as they are never lowers the peak, with a few evaluations where most can be left."""
    by_key = {c.key: c for c in choices}
    order = sorted(assignment, key=lambda k: -by_key[k].seconds[assignment[k]])
    index, group = 0, 1
    while index < len(order):
        if group > 1:
            keys = set(order[index: index + group])
            trial = {k: v for k, v in assignment.items() if k not in keys}
            if fits(trial):
                assignment, index, group = trial, index + group, 2 * group
            else:
                group = 1
            continue
        key = order[index]
        choice = by_key[key]
        cheaper = sorted((o for o in range(len(choice.seconds)) if choice.seconds[o] < choice.seconds[assignment[key]]),
                         key=lambda o: choice.seconds[o])
        for option in cheaper:
            trial = {k: v for k, v in assignment.items() if k != key}
            if option:
                trial[key] = option
            if fits(trial):
                assignment = trial
                break
        group = 2 if key not in assignment else 1
        index += 1
    return assignment
