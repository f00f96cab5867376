"""The strategies behind one contract, and the one rule for where their rewrites meet.

Each strategy module offers the same two functions:

- `candidates(pricing, found, ...) -> list[Candidate]`: the units it could rewrite
  (`found`: its recompute segments, invert chains, compress groups or row-split
  chains), each with its options priced in seconds and bytes from the one profile
  (`Pricing`);
- `apply(gm, decisions) -> GraphModule`: a copy of `gm` with its `Decision`s carried
  out (each names the nodes it covers, so applying a stored plan finds nothing anew);
  `gm` is not modified.

`REGISTRY` lists the strategies in the order their rewrites nest: where candidates of
two strategies share a node, the earlier strategy's is kept (`compatible`), since a
recomputed segment reruns whatever is inside it, and a tiled chain runs its nodes in
its own code; `apply` runs them in that order. A fifth strategy is a module with
those two functions and its name here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import fx

from rewriter.cost_models.node_costs import Costs
from rewriter.solve import Choice

__all__ = ["REGISTRY", "Candidate", "Decision", "Pricing", "compatible", "apply"]

REGISTRY = ("accumulate", "recompute", "row_split", "invert", "compress")


@dataclass(frozen=True)
class Decision:
    """One rewrite of a plan: `strategy` does `option` over `nodes` (names in the
    captured graph, in graph order; the last is the output); `detail` is what else its
    `apply` needs, in JSON types (an invert chain's input node, a row-split chain's
    tiles, axis and halo share, a compress group's form per node)."""

    strategy: str
    option: str
    nodes: tuple[str, ...]
    detail: tuple = ()

    def __post_init__(self) -> None:
        if self.strategy not in REGISTRY:
            raise ValueError(f"strategy={self.strategy!r} is not one of {REGISTRY}")
        if not self.nodes:
            raise ValueError(f"a {self.strategy} decision ({self.option!r}) covers no node")

    @property
    def output(self) -> str:
        return self.nodes[-1]


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
    details: tuple[tuple, ...] = ()  # per option, the Decision's detail (none: ())

    def __post_init__(self) -> None:
        if self.strategy not in REGISTRY:
            raise ValueError(f"strategy={self.strategy!r} is not one of {REGISTRY}")
        if not len(self.options) == len(self.seconds) == len(self.saved_bytes):
            raise ValueError(f"candidate {self.key!r}: one price per option, got {len(self.options)} options, "
                             f"{len(self.seconds)} seconds and {len(self.saved_bytes)} byte counts")

    def choice(self) -> Choice:
        """The solver's view: option 0 leaves the unit as it is, option i is `options[i - 1]`."""
        return Choice(self.key, (0.0, *self.seconds), (0, *self.saved_bytes), frozenset(self.nodes))

    def decision(self, option: str) -> Decision:
        """What taking `option` (one of `options`) does, as a plan stores it."""
        index = self.options.index(option)
        return Decision(self.strategy, option, self.nodes, self.details[index] if self.details else ())


@dataclass(frozen=True)
class Pricing:
    """What every candidate is priced from: the captured graph's one profile (`base`),
    the bytes autograd saves per owning node, each node's output shape, the device,
    `rerun_seconds(nodes, times=1.0, move=1.0)`: the seconds of running `nodes`
    forward once more with `times` x their FLOPs and `move` x their bytes, and
    `compressed_seconds(node)`: the seconds compressing the node adds to a step, as
    measured (passes.compress_timing; None where it was not)."""

    base: Costs
    saved_by_owner: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    device: object
    rerun_seconds: Callable[..., float]
    compressed_seconds: Callable[[str], float | None] = lambda node: None

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


def apply(gm: fx.GraphModule, decisions: Iterable[Decision]) -> fx.GraphModule:
    """`gm` with `decisions` carried out, strategy by strategy in `REGISTRY` order
    (`gm` itself where there are none). `gm` is not modified."""
    decisions = list(decisions)
    for strategy in REGISTRY:
        mine = [d for d in decisions if d.strategy == strategy]
        if mine:
            gm = importlib.import_module(f"rewriter.passes.{strategy}").apply(gm, mine)
    return gm
