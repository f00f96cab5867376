"""Which node's memory autograd keeps for the backward, and who keeps it.

`saved_tensors(costs, batch)` attributes every saved storage to the node that
allocated it: a node's output kept by its consumers, or memory a node keeps for its
own backward (BatchNorm's batch statistics, max-pool indices, dropout masks). A
storage saved by two consumers is counted once; a saved view counts toward the
storage it views, so views add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from rewriter.cost_models.node_costs import Costs

__all__ = ["SavedTensor", "saved_tensors", "value_storages"]


@dataclass(frozen=True)
class SavedTensor:
    owner: str  # node name that allocated the storage
    nbytes: int
    held_by: tuple[str, ...]  # node names whose backward needs it


def value_storages(costs: Costs) -> dict[tuple[str, int], int | None]:
    """The storage uid under every output element (None: memory from before the step)."""
    storage: dict[tuple[str, int], int | None] = {}
    for node in costs.nodes:
        for k, ref in enumerate(node.outputs):
            if ref[0] == "new":
                storage[(node.name, k)] = ref[1]
            elif ref[0] == "value":
                storage[(node.name, k)] = storage.get((ref[1], ref[2]))
            else:
                storage[(node.name, k)] = None
    return storage


def saved_tensors(costs: Costs, batch: int | None = None) -> list[SavedTensor]:
    """Every storage held for the backward, largest first."""
    batch = costs.example_batch if batch is None else batch
    storage = value_storages(costs)
    owner: dict[int, str] = {}
    for node in costs.nodes:
        for ref in node.outputs:
            if ref[0] == "new":
                owner[ref[1]] = node.name
        for uid in node.internal:
            owner[uid] = node.name
    holders: dict[int, list[str]] = {}
    for node in costs.nodes:
        for ref in node.saved:
            uid = ref[1] if ref[0] == "new" else storage.get((ref[1], ref[2]))
            if uid is not None and node.name not in holders.setdefault(uid, []):
                holders[uid].append(node.name)
    size = costs.sizes_at(batch)
    found = [
        SavedTensor(owner[uid], size[uid], tuple(names))
        for uid, names in holders.items()
        if uid in owner
    ]
    return sorted(found, key=lambda s: (-s.nbytes, s.owner))
