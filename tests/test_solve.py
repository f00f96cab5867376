"""The solver against exhaustive search, on problems small enough to enumerate."""

import itertools
import random

import pytest

from rewriter.solve import EXACT_LIMIT, Choice, relaxed, solve


def brute_force(choices, peak, limit):
    """Independent of the solver: every assignment, the cheapest that fits."""
    best = None
    for picks in itertools.product(*(range(len(c.seconds)) for c in choices)):
        assignment = {c.key: p for c, p in zip(choices, picks) if p}
        if peak(assignment) > limit:
            continue
        seconds = sum(c.seconds[p] for c, p in zip(choices, picks))
        if best is None or seconds < best[0] - 1e-12:
            best = (seconds, assignment)
    return best


def random_problem(seed: int, n: int, options: int):
    rng = random.Random(seed)
    choices = [
        Choice(f"s{i}", (0.0, *sorted(rng.uniform(0.1, 3.0) for _ in range(options - 1))),
               (0, *sorted((rng.randint(1, 50) for _ in range(options - 1)))))
        for i in range(n)
    ]
    base = 100 * n
    saved = {c.key: [0] + [rng.randint(5, 60) for _ in range(options - 1)] for c in choices}
    pairs = [(rng.choice(choices).key, rng.choice(choices).key) for _ in range(n)]

    def peak(assignment):  # not additive: recomputing two neighbours costs a transient
        value = base - sum(saved[k][o] for k, o in assignment.items())
        value += sum(15 for a, b in pairs if a in assignment and b in assignment and a != b)
        return value

    return choices, peak, base


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("n,options", [(12, 2), (7, 3), (4, 3)])
def test_exact_on_small_problems(seed, n, options):
    choices, peak, base = random_problem(seed, n, options)
    for limit in (int(base * 0.95), int(base * 0.8), int(base * 0.6)):
        expected = brute_force(choices, peak, limit)
        solution = solve(choices, peak, limit)
        if expected is None:
            assert not solution.fits
            assert solution.peak_bytes > limit
        else:
            assert solution.fits and peak(solution.assignment) <= limit
            assert solution.seconds == pytest.approx(expected[0])


def test_greedy_fits_on_large_problems():
    choices, peak, base = random_problem(0, 60, 3)
    assert 3**60 > EXACT_LIMIT
    for limit in (int(base * 0.9), int(base * 0.7)):
        solution = solve(choices, peak, limit)
        assert solution.fits and peak(solution.assignment) <= limit
        assert solution.evaluations < 2 * 60 * 3 + 100  # two descent passes at most


def test_nothing_fits_reports_the_lowest_peak_seen():
    choices, peak, base = random_problem(3, 5, 2)
    solution = solve(choices, peak, 0)
    assert not solution.fits
    assert solution.peak_bytes == min(
        peak({c.key: p for c, p in zip(choices, picks) if p})
        for picks in itertools.product(*(range(len(c.seconds)) for c in choices))
    )


def _with_overlaps(choices, seed):
    """The same choices, where some share members (a chain inside a segment)."""
    rng = random.Random(seed)
    return [Choice(c.key, c.seconds, c.saved_bytes, frozenset({f"n{i}", f"n{rng.randrange(len(choices))}"}))
            for i, c in enumerate(choices)]


def _meet(choices, assignment) -> bool:
    members = [c.members for c in choices if c.key in assignment]
    return any(a & b for i, a in enumerate(members) for b in members[i + 1:])


@pytest.mark.parametrize("seed", range(10))
def test_choices_that_share_members_are_never_taken_together(seed):
    choices, peak, base = random_problem(seed, 10, 2)
    choices = _with_overlaps(choices, seed)
    for limit in (int(base * 0.9), int(base * 0.75)):
        best = None
        for picks in itertools.product((0, 1), repeat=len(choices)):
            assignment = {c.key: 1 for c, p in zip(choices, picks) if p}
            if not _meet(choices, assignment) and peak(assignment) <= limit:
                seconds = sum(c.seconds[1] for c in choices if c.key in assignment)
                best = seconds if best is None else min(best, seconds)
        solution = solve(choices, peak, limit)
        assert not _meet(choices, solution.assignment)
        assert solution.fits == (best is not None)
        if best is not None:
            assert solution.seconds == pytest.approx(best)


def test_greedy_never_takes_choices_that_share_members():
    choices, peak, base = random_problem(1, 60, 3)
    choices = _with_overlaps(choices, 1)
    for limit in (int(base * 0.95), int(base * 0.85)):
        solution = solve(choices, peak, limit)
        assert not _meet(choices, solution.assignment)
        assert solution.fits and peak(solution.assignment) <= limit


def test_relaxed_moves_each_choice_to_its_cheapest_option_that_still_fits():
    choices = [Choice("a", (0.0, 1.0, 3.0)), Choice("b", (0.0, 2.0, 5.0)), Choice("c", (0.0, 4.0))]
    saved = {"a": (0, 10, 20), "b": (0, 5, 30), "c": (0, 50)}

    def fits(assignment):
        return 100 - sum(saved[k][o] for k, o in assignment.items()) <= 50

    # 50 bytes must be saved. From every choice at its dearest option (saving 100), the
    # dearest first: b (5 s) drops (a and c save 70), c (4 s) stays (a alone saves 20),
    # a (3 s) drops (c alone saves 50)
    assert relaxed(choices, {"a": 2, "b": 2, "c": 1}, fits) == {"c": 1}
    # without c, a and b save exactly 50: neither can move
    assert relaxed(choices[:2], {"a": 2, "b": 2}, fits) == {"a": 2, "b": 2}
    loose = {"a": (0, 10, 20), "b": (0, 40, 45)}

    def fits_loose(assignment):
        return 100 - sum(loose[k][o] for k, o in assignment.items()) <= 50

    # b cannot drop (a saves 20) but moves to option 1 (60 saved); then a moves to its
    # option 1 (50 saved), not to nothing (40)
    assert relaxed(choices[:2], {"a": 2, "b": 2}, fits_loose) == {"a": 1, "b": 1}


def one_at_a_time(choices, assignment, fits):
    """Independent of the solver: `relaxed` as its contract states it, a choice at a time."""
    by_key = {c.key: c for c in choices}
    for key in sorted(assignment, key=lambda k: -by_key[k].seconds[assignment[k]]):
        choice = by_key[key]
        for option in sorted((o for o in range(len(choice.seconds)) if choice.seconds[o] < choice.seconds[assignment[key]]),
                             key=lambda o: choice.seconds[o]):
            trial = {k: v for k, v in assignment.items() if k != key}
            if option:
                trial[key] = option
            if fits(trial):
                assignment = trial
                break
    return assignment


@pytest.mark.parametrize("seed", range(30))
def test_relaxed_tries_choices_in_groups_with_the_result_of_one_at_a_time(seed):
    # an additive peak: leaving more choices as they are never lowers it
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    choices = [Choice(f"s{i}", (0.0, *sorted(rng.uniform(0.1, 3.0) for _ in range(2)))) for i in range(n)]
    saved = {c.key: (0, rng.randint(1, 30), rng.randint(31, 60)) for c in choices}
    limit = rng.randint(0, 60 * n)

    def fits(assignment):
        return 60 * n - sum(saved[k][o] for k, o in assignment.items()) <= limit

    start = {c.key: 2 for c in choices}
    assert relaxed(choices, start, fits) == one_at_a_time(choices, start, fits)


def test_relaxed_needs_few_evaluations_where_most_choices_can_be_left():
    choices = [Choice(f"s{i}", (0.0, 1.0 + i)) for i in range(512)]
    calls = []

    def fits(assignment):
        calls.append(1)
        return {"s0", "s1", "s2"} <= set(assignment)  # the three cheapest are needed, the rest can be left

    assert relaxed(choices, {c.key: 1 for c in choices}, fits) == {"s0": 1, "s1": 1, "s2": 1}
    assert len(calls) < 64  # one at a time: 512
