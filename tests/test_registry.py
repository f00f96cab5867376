"""The strategy contract: candidates of every strategy in one shape, one rule where they meet."""

import pytest

from rewriter.passes.registry import REGISTRY, Candidate, compatible


def _candidate(strategy: str, key: str, nodes: tuple[str, ...]) -> Candidate:
    return Candidate(strategy, key, nodes, nodes[-1], ("on",), (1.0,), (8,))


def test_the_earlier_strategy_keeps_a_shared_node():
    offered = {c.key: c for c in (
        _candidate("compress", "compress:a", ("a", "b")),
        _candidate("invert", "invert:c", ("b", "c")),
        _candidate("recompute", "c", ("c", "d")),
        _candidate("compress", "compress:e", ("e",)),
    )}
    chosen = {"compress:a": "on", "invert:c": "on", "c": "on", "compress:e": "on"}
    # recompute covers c: the invert chain over b, c goes, so the group over a, b stays
    assert compatible(offered, chosen) == {"compress:a": "on", "c": "on", "compress:e": "on"}
    assert compatible(offered, {"compress:a": "on", "invert:c": "on"}) == {"invert:c": "on"}


def test_a_candidate_names_a_registered_strategy_and_prices_each_option():
    assert REGISTRY == ("recompute", "row_split", "invert", "compress")
    with pytest.raises(ValueError, match="strategy='tile'"):
        Candidate("tile", "k", ("a",), "a", ("on",), (1.0,), (8,))
    with pytest.raises(ValueError, match="one price per option"):
        Candidate("recompute", "k", ("a",), "a", ("selective", "full"), (1.0,), (8, 8))
    choice = _candidate("recompute", "k", ("a", "b")).choice()
    assert (choice.seconds, choice.saved_bytes, choice.members) == ((0.0, 1.0), (0, 8), frozenset({"a", "b"}))
