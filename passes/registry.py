"""The strategies behind one contract, and the one rule for where their rewrites meet.

Each strategy module offers `candidates(pricing, found, modes) -> list[Candidate]`:
the units it could rewrite (`found`: its recompute segments, invert chains, compress
groups or row-split chains), each with its options priced in seconds and bytes from
the one profile (`Pricing`); and an `apply` that carries chosen options out on a copy
of the graph. `REGISTRY` lists the strategies in the order their rewrites nest: where
candidates of two strategies share a node, the earlier strategy's is kept
(`compatible`), since a recomputed segment reruns whatever is inside it, and a tiled
chain runs its nodes in its own code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rewriter.cost_models.node_costs import Costs
from rewriter.solve import Choice

__all__ = ["REGISTRY", "Candidate", "Pricing", "compatible"]

REGISTRY = ("recompute", "row_split", "invert", "compress")


@dataclass(frozen=True)
class Candidate:
    """One unit a strategy can rewrite: `key` names it in plans and the solver, `nodes`
    are the graph nodes it covers, `outputs` the nodes whose records a composed plan
    takes from the profile of the chosen option; per option (by name), the seconds it
    adds to a step and the saved bytes it takes off (for ranking)."""

    strategy: str
    key: str
    nodes: tuple[str, ...]
    outputs: str | tuple[str, ...]
    options: tuple[str, ...]
    seconds: tuple[float, ...]
    saved_bytes: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.strategy not in REGISTRY:
            raise ValueError(f"strategy={self.strategy!r} is not one of {REGISTRY}")
        if not len(self.options) == len(self.seconds) == len(self.saved_bytes):
            raise ValueError(f"candidate {self.key!r}: one price per option, got {len(self.options)} options, "
                             f"{len(self.seconds)} seconds and {len(self.saved_bytes)} byte counts")

    def choice(self) -> Choice:
        """The solver's view: option 0 leaves the unit as it is, option i is `options[i - 1]`."""
        return Choice(self.key, (0.0, *self.seconds), (0, *self.saved_bytes), frozenset(self.nodes))


@dataclass(frozen=True)
class Pricing:
    """What every candidate is priced from: the captured graph's one profile (`base`),
    the bytes autograd saves per owning node, each node's output shape, the device,
    and `rerun_seconds(nodes, times=1.0, move=1.0)`: the seconds of running `nodes`
    forward once more with `times` x their FLOPs and `move` x their bytes."""

    base: Costs
    saved_by_owner: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    device: object
    rerun_seconds: Callable[..., float]

    def saved(self, nodes: Iterable[str]) -> int:
        """Bytes autograd saves that `nodes` own."""
        return sum(self.saved_by_owner.get(n, 0) for n in nodes)


def compatible(candidates: dict[str, Candidate], assignment: dict[str, str]) -> dict[str, str]:
    """`assignment` (candidate key -> option) less the candidates that share a node with
    a chosen candidate of a strategy earlier in `REGISTRY`."""
    taken: set[str] = set()
    kept: dict[str, str] = {}
    for strategy in REGISTRY:
        chosen = {k: v for k, v in assignment.items()
                  if candidates[k].strategy == strategy and not taken & set(candidates[k].nodes)}
        kept.update(chosen)
        taken |= {n for k in chosen for n in candidates[k].nodes}
    return {k: v for k, v in assignment.items() if k in kept}
