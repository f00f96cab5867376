"""Accumulate: large weight gradients added into `.grad` in place (accumulate_ops).

Where a Linear's or a convolution's weight is a sizeable share of the step's peak, its
gradient, computed whole and then added into `.grad`, can be what holds the peak (a
VGG classifier's, a late ResNet convolution's at small inputs). Rewritten, the node
calls `accumulate_ops.linear` or `accumulate_ops.conv` on its own module (through a
`get_attr`): same parameters, same state_dict, the same gradients in `.grad`, and no
weight-sized temporary (a convolution's in `chunks` slices of output channels).

It takes no memory and little time (a Linear's `addmm_` saves eager's sum into `.grad`:
VGG-11-BN's step at 0.84x eager's; a convolution's slices cost a few percent: ResNet-18
at 64x64, 1.04x), so the planner offers it as no choice and prices it at nothing:
with "accumulate" among the strategies, every plan below the baseline takes it for
each eligible node (`eligible`) that no other rewrite covers but recompute (a
compressed or tiled convolution computes its own weight gradient); a recomputed
segment reruns the rewritten node as it is. It is applied first (`registry.REGISTRY`)
and keeps every node's name.
"""

from __future__ import annotations

import math
import operator

from torch import fx, nn

from rewriter.cost_models.node_costs import Costs
from rewriter.passes import accumulate_ops
from rewriter.passes.layers import computes_as
from rewriter.passes.registry import Candidate, Decision, Pricing

__all__ = ["eligible", "candidates", "apply", "rewrite", "SHARE", "MAX_CHUNKS"]

SHARE = 0.01  # a weight is rewritten where its gradient is at least this share of the eager peak
MAX_CHUNKS = 16  # a convolution's weight gradient in at most this many slices


def _kind(module: nn.Module) -> type | None:
    """The class of `accumulate_ops.KINDS` that `module` computes as (its own, or a
    torch.nn base of a subclass that changes only how it is made: `layers.computes_as`)."""
    kind = computes_as(module)
    return kind if kind in accumulate_ops.KINDS else None


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The Linear, zero-padded Conv1d/2d/3d or ungrouped ConvTranspose1d/2d/3d (or a
    subclass that computes as one, `_kind`) a node calls on one input (a transposed
    convolution: no `output_size`), whose weight trains."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    module = gm.get_submodule(node.target)
    kind = _kind(module)
    if kind is None or not module.weight.requires_grad:
        return None
    if kind is not nn.Linear and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        return None
    if kind in accumulate_ops.TRANSPOSED and module.groups != 1:
        return None
    return module


def eligible(gm: fx.GraphModule, eager: Costs, peak: int) -> dict[str, int]:
    """Node -> chunks (1 for a Linear) of each node worth rewriting: a Linear or
    convolution (`_module`) whose weight gradient is at least `SHARE` of `peak` (the
    eager peak, bytes), and whose weight no other node reads (a shared weight's
    gradients are summed before they reach `.grad`, and two stand-in zeros summed
    take a whole tensor); a convolution's slices each at most that share where
    `MAX_CHUNKS` (or its output channels) allow."""
    floor = max(1, int(SHARE * peak))
    readers: dict[int, int] = {}  # parameter -> nodes that read it
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            value = operator.attrgetter(node.target)(gm)
            for p in value.parameters() if isinstance(value, nn.Module) else (value,):
                readers[id(p)] = readers.get(id(p), 0) + 1
    found = {}
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if module is None or node.name not in eager.by_name:
            continue
        if readers[id(module.weight)] > 1:  # a shared weight: autograd sums its gradients before AccumulateGrad
            continue
        nbytes = module.weight.numel() * module.weight.element_size()
        if nbytes < floor:
            continue
        linear = isinstance(module, nn.Linear)
        chunks = 1 if linear else min(max(2, math.ceil(nbytes / floor)), MAX_CHUNKS, module.weight.shape[0])
        if linear or chunks > 1:
            found[node.name] = chunks
    return found


def candidates(pricing: Pricing, found: dict[str, int]) -> list[Candidate]:
    """None: the planner takes every eligible node (it costs no time; see the module
    docstring) rather than choosing among them."""
    return []


def apply(gm: fx.GraphModule, decisions: list[Decision]) -> fx.GraphModule:
    """`rewrite` as `decisions` say (detail: each node's chunks)."""
    return rewrite(gm, {n: int(c) for d in decisions for n, c in zip(d.nodes, d.detail, strict=True)})


def decision(chosen: dict[str, int]) -> list[Decision]:
    """The plan's record of `chosen` (node -> chunks, in graph order as `eligible` finds
    them); none where nothing is chosen."""
    return [Decision("accumulate", "in_place", tuple(chosen), tuple(chosen.values()))] if chosen else []


def rewrite(gm: fx.GraphModule, chosen: dict[str, int]) -> fx.GraphModule:
    """A new GraphModule where each node in `chosen` (node -> chunks) adds its weight's
    gradient into `.grad` in place. `gm` is not modified; parameters are shared; every
    node keeps its name (the module each one reads is a new `get_attr` node)."""
    from rewriter.passes.recompute import adopt_structure

    present = {n.name: n for n in gm.graph.nodes}
    wrong = [n for n in chosen if n not in present or _module(gm, present[n]) is None]
    if wrong:
        raise ValueError(f"accumulate: nodes {wrong} are no Linear or convolution whose weight this pass can rewrite")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    new = adopt_structure(fx.GraphModule(gm, fx.Graph(), class_name=type(gm).__name__), gm)
    for node in gm.graph.nodes:
        if node.name not in chosen:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        layer = graph.create_node("get_attr", node.target, name=f"rewriter_layer_{node.name}")
        if isinstance(gm.get_submodule(node.target), nn.Linear):
            call = graph.create_node("call_function", accumulate_ops.linear, (env[node.args[0]], layer), name=node.name)
        else:
            call = graph.create_node("call_function", accumulate_ops.conv, (env[node.args[0]], layer, chosen[node.name]),
                                     name=node.name)
        call.meta = dict(node.meta)
        env[node] = call
    new.graph = graph
    new.recompile()
    return new

