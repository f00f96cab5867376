"""Recompute: drop the tensors a segment saves for backward and rerun the segment there.

A segment is a run of graph nodes between two cut points where a single tensor
crosses (a ResNet block, a VGG stage). `rewrite` (and `apply`, from a plan's
decisions) replaces each chosen segment by one `RecomputeSegment` call, a non-reentrant `torch.utils.checkpoint` over the segment's
own code:

- "selective": the outputs of expensive ops (convolution, matrix products) are kept
  through a selective-checkpoint policy; only the cheap ones (BatchNorm, activations,
  pooling, concatenation, elementwise) are rerun: the Memory-Efficient DenseNets trade.
- "full": everything inside is rerun.

BatchNorm running statistics and `num_batches_tracked` are updated once per step: the
recomputation runs between a snapshot and a restore of every buffer the segment's code
holds (a BatchNorm module's, or one its code reads itself: timm's BatchNormAct2d is
traced through and updates its statistics in the graph). Dropout draws the same masks: the RNG state is preserved for the rerun.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import statistics
import time
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from rewriter.cost_models.in_place import written_through
from rewriter.cost_models.runtime import synchronizer
from rewriter.passes.registry import Candidate, Decision, Pricing

__all__ = ["RecomputeSegment", "Segment", "MODES", "SPAN", "GRANULARITIES", "segments", "candidates", "apply", "rewrite",
           "segment_over", "adopt_structure", "replace_runs", "KEPT_OPS", "overhead_seconds", "norm_bytes", "span", "spannable"]

MODES = ("selective", "full")
SPAN = "span"  # a decision's option for a nested checkpoint around segments (`span`)

aten = torch.ops.aten
KEPT_OPS = frozenset({
    aten.convolution.default, aten._convolution.default, aten.mm.default, aten.addmm.default,
    aten.bmm.default, aten.baddbmm.default,
})


# What a selective checkpoint keeps bypasses saved-tensor hooks around it (the profiler
# counts those outputs as the checkpoint's own): torch 2.14 asks for this choice to be
# explicit, older versions have no such keyword and always bypass
_BYPASS_HOOKS = ({"respect_saved_tensors_hooks": False}
                 if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {})


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@dataclass(frozen=True)
class Segment:
    """Nodes `nodes` (graph order) whose only tensor output used later is `output`;
    `expensive` are the nodes whose outputs selective mode keeps; selective mode is
    offered only where no node changes a kept output in place (`selective_ok`)."""

    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    output: str
    expensive: tuple[str, ...] = ()
    selective_ok: bool = True

    def modes(self) -> tuple[str, ...]:
        return MODES if self.selective_ok else ("full",)


class _RestoreBatchNormStats:
    """Snapshot BatchNorm buffers on enter and restore them on exit, so that a rerun of
    the forward leaves running statistics as the first run left them."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = buffers
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        with torch.no_grad():  # (buffers need no detach: one op less each, many in a profile's rerun)
            self.saved = [(b, b.clone()) for b in self.buffers]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for buffer, value in self.saved:
                buffer.copy_(value)
        self.saved = []
        return False


class RecomputeSegment(nn.Module):
    """Runs a segment under non-reentrant checkpointing.

    `checkpointed_code` is a GraphModule over the owner's own submodules; it is kept
    out of the module tree (no parameter, buffer or state_dict key of its own), so the
    rewritten model has the state_dict keys of the original.
    """

    rerun_ended: list = []  # callables, each called with the segment as its rerun ends (stopped early too)

    def __init__(self, code, mode: str, buffers: list[torch.Tensor] | None = None, keeps_output: bool = False):
        """`code` runs the segment: a GraphModule over the owner's submodules, or any
        callable (an exported module's method), then with `buffers`, the buffers it
        holds. `keeps_output`: the output comes from an op whose outputs selective mode
        keeps, so the checkpoint holds it until the segment's backward."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        object.__setattr__(self, "checkpointed_code", code)
        object.__setattr__(self, "_restored", buffers)
        self.mode = mode
        self.keeps_output = keeps_output and mode == "selective"

    def forward(self, *inputs):
        return self.run(self.checkpointed_code, *inputs)

    def inner(self) -> list["RecomputeSegment"]:
        """The segments this one's code calls: checkpoints nested in this one."""
        code = self.checkpointed_code
        return [m for m in code.modules() if isinstance(m, RecomputeSegment)] if isinstance(code, nn.Module) else []

    def codes(self) -> list[nn.Module]:
        """Its code and its nested segments' codes: every module its checkpoint runs."""
        return [self.checkpointed_code] + [c for inner in self.inner() for c in inner.codes()]

    def code_parameters(self) -> list[nn.Parameter]:
        """The parameters the segment's code uses, nested segments' included (not
        registered on this module)."""
        found = {id(p): p for p in self.checkpointed_code.parameters()}
        for inner in self.inner():
            found.update((id(p), p) for p in inner.code_parameters())
        return list(found.values())

    def stat_buffers(self) -> list[torch.Tensor]:
        """The buffers its rerun restores: every buffer its code holds (BatchNorm
        statistics and counts, and any other a module or the code itself updates),
        nested segments' included (the rerun of an outer segment runs its inner ones
        forward too)."""
        if self._restored is not None:
            return list(self._restored)
        found = {id(b): b for b in self.checkpointed_code.buffers()}
        for inner in self.inner():
            found.update((id(b), b) for b in inner.stat_buffers())
        return list(found.values())

    def run(self, code, *inputs, stat_buffers: list[torch.Tensor] | None = None):
        """Checkpoint `code` (the segment's code, or a stand-in with the same signature,
        then with `stat_buffers` the stand-ins of `self.stat_buffers()`)."""
        norms = self.stat_buffers() if stat_buffers is None else stat_buffers
        if torch.compiler.is_compiling():
            # traced by torch.compile: dynamo takes a checkpoint whose context is the
            # selective policy's own (no restore around the rerun: the compiled graph
            # recomputes values, not the buffers' updates, which run once)
            selective = functools.partial(create_selective_checkpoint_contexts, _keep_expensive)
            return checkpoint(code, *inputs, use_reentrant=False, preserve_rng_state=True,
                              **({"context_fn": selective} if self.mode == "selective" else {}))

        def contexts():
            if self.mode == "selective":
                forward_context, recompute_context = create_selective_checkpoint_contexts(_keep_expensive)
            else:
                forward_context, recompute_context = contextlib.nullcontext(), contextlib.nullcontext()
            @contextlib.contextmanager
            def recompute():  # the restore must run outside the selective-checkpoint mode
                try:
                    with _RestoreBatchNormStats(norms), recompute_context:
                        yield
                finally:  # (stopped early, too) a selective checkpoint lets go of what it kept
                    for observer in RecomputeSegment.rerun_ended:
                        observer(self)

            return forward_context, recompute()

        return checkpoint(code, *inputs, use_reentrant=False, preserve_rng_state=True, context_fn=contexts,
                          **(_BYPASS_HOOKS if self.mode == "selective" else {}))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class _Probe(nn.Module):
    """A small segment (BatchNorm, ReLU, 1x1 convolution) to time the checkpoint's own cost on."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.norm(x)))


_OVERHEAD: dict[tuple[str, str], float] = {}


def overhead_seconds(mode: str, device: torch.device | str = "cpu", count: int = 16, rounds: int = 5) -> float:
    """Seconds one RecomputeSegment in `mode` adds to a training step beyond rerunning
    its nodes: the checkpoint's hooks, the RNG state kept for the rerun, the BatchNorm
    snapshot and restore, and in selective mode the policy's dispatch on every op. Timed
    once per process, mode and device type: `count` small segments in a row, trained
    checkpointed and plain in turns for `rounds` rounds, less one plain forward (the
    rerun); the medians' difference per segment, at least 0."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    device = torch.device(device)
    key = (mode, device.type)
    if key not in _OVERHEAD:
        synchronize = synchronizer(device.type)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            probes = [_Probe().to(device) for _ in range(count)]
            segments = [RecomputeSegment(p, mode) for p in probes]
            x = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)

        def seconds(blocks, train: bool = True) -> float:
            synchronize()
            start = time.perf_counter()
            with torch.set_grad_enabled(train):
                y = x
                for block in blocks:
                    y = block(y)
                if train:
                    y.sum().backward()
            synchronize()
            return time.perf_counter() - start

        times: dict[str, list[float]] = {"plain": [], "checkpointed": [], "forward": []}
        for round_ in range(rounds + 1):
            measured = {"plain": seconds(probes), "checkpointed": seconds(segments), "forward": seconds(probes, False)}
            for name, value in measured.items() if round_ else ():  # round 0 warms up
                times[name].append(value)
        median = {name: statistics.median(values) for name, values in times.items()}
        _OVERHEAD[key] = max(0.0, (median["checkpointed"] - median["plain"] - median["forward"]) / count)
    return _OVERHEAD[key]


_EXPENSIVE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_EXPENSIVE_FUNCTIONS = frozenset({
    torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
    torch.nn.functional.linear, torch.matmul, torch.mm, torch.bmm, torch.conv2d,
})
_COMPUTE = ("call_module", "call_function", "call_method")


def _is_expensive(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _EXPENSIVE_MODULES)
    return node.op == "call_function" and node.target in _EXPENSIVE_FUNCTIONS


GRANULARITIES = ("coarse", "fine", "module")


def _scope(node: fx.Node) -> str | None:
    """The innermost module whose forward made `node` (None at the top level)."""
    stack = list(node.meta.get("nn_module_stack", {}))
    if node.op == "call_module" and stack and stack[-1].split("@")[0] == node.target:
        stack.pop()  # the leaf module itself ("relu@1": its second call)
    return stack[-1] if stack else None


def _ends_scope(node: fx.Node, following: fx.Node | None) -> bool:
    """Whether `node` is the last node of its module's call: the next compute node was
    made outside that module (or there is none). Top-level nodes end no call, so any of
    them may end a run."""
    scope = _scope(node)
    if scope is None or following is None:
        return True
    return scope not in following.meta.get("nn_module_stack", {})


def segments(gm: fx.GraphModule, opaque: tuple[str, ...] = (), granularity: str = "coarse") -> list[Segment]:
    """Candidate segments, disjoint, in graph order. A run of compute nodes closes after
    an expensive op (conv, linear, matmul), or after a run of two or more cheap ops whose
    output several nodes read, where

    - "coarse": a single tensor crosses the cut after it (a ResNet block, a VGG layer);
    - "fine": a single value made inside the run is used after it, whatever the run
      reads from before (half a DenseNet layer: its bottleneck, then the rest);
    - "module": as "fine", but only where a module call ends (after the node ends its
      innermost module's call): whole DenseNet layers, as per-block checkpointing.

    Not candidates: a run that changes one of its inputs in place, or whose input a
    later node changes in place (the checkpoint keeps its inputs for the rerun), or that
    calls an opaque leaf (module paths in `opaque`: its code is not known to rerun alike)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    nodes, position, last_use, mutated_at = _order(gm)
    found: list[Segment] = []
    start, live, expensive = 0, set(), False
    for i, node in enumerate(nodes):
        live = {v for v in live | {node} if last_use[v] > i}
        expensive = expensive or _is_expensive(gm, node)
        mutated_next = i + 1 < len(nodes) and node in mutated_at and i + 1 in mutated_at[node]
        if granularity != "coarse":
            # a cheap value the run begins with that later nodes read too (a DenseNet
            # block's input) stays out of it: it could never be recomputed inside
            while start < i and last_use[nodes[start]] > i and not _is_expensive(gm, nodes[start]):
                start += 1
            expensive = any(_is_expensive(gm, m) for m in nodes[start:i + 1])
        run = nodes[start:i + 1]
        escaping = live if granularity == "coarse" else {m for m in run if last_use[m] > i}
        closes = escaping == {node} and not mutated_next
        if granularity == "module":
            closes = closes and _ends_scope(node, nodes[i + 1] if i + 1 < len(nodes) else None)
        # a run of cheap ops closes too where its single output fans out (a ResNet stem's
        # pooling, read by both branches of the first block): else the block joins it
        branches = (closes and len(run) > 1 and len(node.users) > 1
                    and not any(u.target is operator.getitem for u in node.users))  # one tensor, not a tuple's parts
        if closes and (expensive or branches) or i == len(nodes) - 1:
            outside = _rerun_inputs(run, start, mutated_at, opaque)
            if closes and outside is not None:
                expensive_nodes = {m for m in run if _is_expensive(gm, m)}
                # selective mode keeps these outputs: none may be written over later, in the
                # run or after it, directly or through an identity or a view (timm RegNetY)
                selective_ok = not any(m in mutated_at for m in expensive_nodes)
                found.append(Segment(
                    tuple(m.name for m in run), tuple(a.name for a in outside), node.name,
                    tuple(m.name for m in run if m in expensive_nodes), selective_ok,
                ))
            start, expensive = i + 1, False
    return found


def candidates(pricing: Pricing, found: list[Segment], modes: tuple[str, ...] = MODES) -> list[Candidate]:
    """Each segment in each of its modes among `modes`: the seconds of rerunning what
    the mode does not keep (and the checkpoint's own cost), the bytes it saves."""
    offered = []
    for segment in found:
        options = tuple(m for m in segment.modes() if m in modes)
        seconds, saved = [], []
        for mode in options:
            kept = segment.expensive if mode == "selective" else ()
            rerun = [n for n in segment.nodes if n not in kept]  # rerun once more in backward
            seconds.append(pricing.rerun_seconds(rerun) + overhead_seconds(mode, pricing.device))
            saved.append(pricing.saved(rerun))
        if options:
            offered.append(Candidate("recompute", segment.output, segment.nodes, segment.output, options,
                                     tuple(seconds), tuple(saved)))
    return offered


def _rerun_inputs(run: list[fx.Node], start: int, mutated_at: dict[fx.Node, list[int]],
                  opaque: tuple[str, ...]) -> list[fx.Node] | None:
    """The outside nodes a run (starting at position `start`) reads, or None where it
    cannot be rerun alike: a node from `start` on changes one of them in place, or the
    run calls an opaque leaf."""
    members = set(run)
    outside = list(dict.fromkeys(a for m in run for a in m.all_input_nodes if a not in members and a.op != "get_attr"))
    if any(m in mutated_at and any(start <= j for j in mutated_at[m]) for m in outside):
        return None
    if any(m.op == "call_module" and m.target in opaque for m in run):
        return None
    return outside


def input_sizes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes that compute from the sizes of the graph's inputs and the model's state
    alone (`h, w = x.shape[-2:]`, arithmetic and comparisons on them, the assertions of
    traced branches): no activation memory, and any segment may read them from outside,
    wherever they sit (torchvision's segmentation models read the input's size at the
    start and upsample to it at the end). None is ever rerun inside a checkpoint, where
    an assertion of the state could not run on a profile's fake state."""
    found: set[fx.Node] = set()
    for n in gm.graph.nodes:
        inputs = n.all_input_nodes
        if n.op != "call_function" or not inputs:
            continue
        if n.target is getattr and n.args[1] == "shape" and inputs[0].op == "placeholder":
            found.add(n)
        elif (n.target is torch._assert or getattr(n.target, "__module__", None) in ("_operator", "operator")) \
                and all(a in found or a.op == "get_attr" for a in inputs):
            found.add(n)
    return found


def _order(gm: fx.GraphModule):
    """The compute nodes in order (less `input_sizes`), each one's position, the
    position of its last use (past the end: used by the output), and the positions that
    change its memory in place (directly, or through identities and views of it)."""
    sizes = input_sizes(gm)
    nodes = [n for n in gm.graph.nodes if n.op in _COMPUTE and n not in sizes]
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max([position.get(u, len(nodes)) for u in n.users] or [position[n]]) for n in nodes}
    mutated_at: dict[fx.Node, list[int]] = {}
    for i, n in enumerate(nodes):
        for written in written_through(gm, n):  # through identities and views too
            mutated_at.setdefault(written, []).append(i)
    return nodes, position, last_use, mutated_at


def span(gm: fx.GraphModule, segments: list[Segment], first: str, last: str, opaque: tuple[str, ...] = ()) -> Segment | None:
    """The segments from the one ending at `first` to the one ending at `last`, with the
    nodes between them, as one segment to checkpoint around their own checkpoints (a
    nested checkpoint: Chen et al. 2016), in full mode; None where a value made inside
    is used after it other than the last one's output, where a later node changes an
    input of it in place, or where it calls an opaque leaf."""
    outputs = [s.output for s in segments]
    if first not in outputs or last not in outputs or outputs.index(first) > outputs.index(last):
        raise ValueError(f"span {first!r}..{last!r}: both must end segments, in graph order")
    nodes, position, last_use, mutated_at = _order(gm)
    named = {n.name: n for n in nodes}
    start, end = position[named[segments[outputs.index(first)].nodes[0]]], position[named[last]]
    run = nodes[start:end + 1]
    if {m for m in run if last_use[m] > end} != {named[last]}:
        return None
    outside = _rerun_inputs(run, start, mutated_at, opaque)
    if outside is None:
        return None
    return Segment(tuple(m.name for m in run), tuple(a.name for a in outside), last, selective_ok=False)


def segment_over(gm: fx.GraphModule, nodes: tuple[str, ...], what: str = "segment", order=None) -> Segment:
    """The segment of `gm` over `nodes` (graph order, as a plan stores them); ValueError
    where they are not all in `gm`, or where a value made inside other than the last
    node's is used after them (a plan made for another model). `order`: `_order(gm)`,
    if at hand."""
    order, position, last_use, mutated_at = order or _order(gm)
    named = {n.name: n for n in order}
    missing = [n for n in nodes if n not in named]
    if missing:
        raise ValueError(f"{what} over {nodes[0]!r}..{nodes[-1]!r}: nodes {missing[:4]} are not in this graph")
    run = [named[n] for n in nodes]
    start, end = position[run[0]], position[run[-1]]
    if [position[m] for m in run] != list(range(start, end + 1)):
        raise ValueError(f"{what} over {nodes[0]!r}..{nodes[-1]!r}: its nodes are not one run of the graph")
    escaping = sorted(m.name for m in run if last_use[m] > end and m is not run[-1])
    if escaping:
        raise ValueError(f"{what} over {nodes[0]!r}..{nodes[-1]!r}: values {escaping[:4]} made inside it are used after it")
    members = set(run)
    outside = [a for a in dict.fromkeys(a for m in run for a in m.all_input_nodes) if a not in members and a.op != "get_attr"]
    expensive = {m for m in run if _is_expensive(gm, m)}
    selective_ok = not any(m in mutated_at for m in expensive)
    return Segment(tuple(nodes), tuple(a.name for a in outside), nodes[-1],
                   tuple(m.name for m in run if m in expensive), selective_ok and what == "segment")


def apply(gm: fx.GraphModule, decisions: list[Decision]) -> fx.GraphModule:
    """`rewrite` as `decisions` say: each segment's nodes in its mode, each span's (option
    `SPAN`) checkpointed around them. ValueError where the nodes do not make a segment."""
    order = _order(gm)
    segments = [segment_over(gm, d.nodes, "segment", order) for d in decisions if d.option != SPAN]
    spans = [segment_over(gm, d.nodes, "span", order) for d in decisions if d.option == SPAN]
    chosen = {d.output: d.option for d in decisions if d.option != SPAN}
    return rewrite(gm, chosen, segments, spans)


def norm_bytes(gm: fx.GraphModule, segment: Segment) -> int:
    """Bytes of the buffers a segment's code holds (`RecomputeSegment.stat_buffers`):
    the copies its rerun takes."""
    names = set(segment.nodes)
    found: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.name not in names:
            continue
        held = [gm.get_submodule(node.target)] if node.op == "call_module" else []
        held += [operator.attrgetter(a.target)(gm) for a in node.all_input_nodes if a.op == "get_attr"]
        for value in held:
            if isinstance(value, nn.Module):
                found.update((id(b), b) for b in value.buffers())
            elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                found[id(value)] = value
    return sum(b.numel() * b.element_size() for b in found.values())


def rewrite(gm: fx.GraphModule, chosen: dict[str, str], all_segments: list[Segment],
            spans: list[Segment] = ()) -> fx.GraphModule:
    """A new GraphModule where each segment named in `chosen` (output name -> mode) runs
    as a RecomputeSegment, and each of `spans` (from `span`: nested or disjoint) as one
    more around what it covers, innermost first. `gm` is not modified; parameters are
    shared."""
    by_output = {s.output: s for s in all_segments if s.output in chosen}
    targets = {out: f"rewriter_recompute_{i}" for i, out in enumerate(by_output)}
    new = _checkpointed(gm, gm, list(by_output.values()), chosen, targets)
    for index, outer in enumerate(sorted(spans, key=lambda s: len(s.nodes))):
        names = {n.name for n in new.graph.nodes}
        present = Segment(tuple(n for n in outer.nodes if n in names), outer.inputs, outer.output, selective_ok=False)
        new = _checkpointed(new, gm, [present], {outer.output: "full"}, {outer.output: f"rewriter_span_{index}"})
    return new


def _checkpointed(gm: fx.GraphModule, original: fx.GraphModule, runs: list[Segment], modes: dict[str, str],
                  targets: dict[str, str]) -> fx.GraphModule:
    """`gm` with each of `runs` as a RecomputeSegment call to the submodule `targets[output]`."""

    def call(new: fx.GraphModule, graph: fx.Graph, segment: Segment, value) -> fx.Node:
        code, outside = _segment_code(gm, segment)
        keeps_output = segment.output in segment.expensive
        new.add_submodule(targets[segment.output], RecomputeSegment(code, modes[segment.output], keeps_output=keeps_output))
        node = graph.create_node("call_module", targets[segment.output], tuple(value(n.name) for n in outside), name=segment.output)
        node.meta["rewriter"] = {"strategy": "recompute", "mode": modes[segment.output], "nodes": segment.nodes}
        return node

    return adopt_structure(replace_runs(gm, runs, call), original)


def replace_runs(gm: fx.GraphModule, runs: list, call) -> fx.GraphModule:
    """A copy of `gm` (its structure adopted) where each run (with `.nodes` and `.output`)
    is one node made by `call(new, graph, run, value)`, put where the run's output was;
    `value(name)` is the new graph's node for an outside node of `gm`. Other nodes are
    copied as they are. `gm` is not modified."""
    member = {name: run for run in runs for name in run.nodes}
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    new = adopt_structure(fx.GraphModule(gm, fx.Graph(), class_name=type(gm).__name__), gm)
    for node in gm.graph.nodes:
        run = member.get(node.name)
        if run is None:
            env[node.name] = graph.node_copy(node, lambda n: env[n.name])
        elif node.name == run.output:
            env[node.name] = call(new, graph, run, env.__getitem__)
    new.graph = graph
    new.recompile()
    return new


def adopt_structure(new: nn.Module, source: nn.Module) -> nn.Module:
    """Make `new`'s top-level submodules, parameters and buffers `source`'s own objects,
    in `source`'s order (what `new` has beyond them follows), so that both have the
    same state_dict keys in the same order and share every parameter."""
    for table, own in (("_modules", source._modules), ("_parameters", source._parameters), ("_buffers", source._buffers)):
        current = getattr(new, table)
        extra = {k: v for k, v in current.items() if k not in own}
        current.clear()
        current.update(own)
        current.update(extra)
    new._non_persistent_buffers_set = set(source._non_persistent_buffers_set)
    return new


def _segment_code(gm: fx.GraphModule, segment: Segment) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The segment as a GraphModule over gm's submodules, and the outside nodes it reads."""
    names = set(segment.nodes)
    inside = {n for n in gm.graph.nodes if n.name in names}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outside: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node not in inside:
            continue
        for arg in node.all_input_nodes:
            if arg in env:
                continue
            if arg.op == "get_attr":
                env[arg] = graph.get_attr(arg.target)
            else:
                outside.append(arg)
                env[arg] = graph.placeholder(arg.name)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[next(n for n in inside if n.name == segment.output)])
    return fx.GraphModule(gm, graph, class_name="Segment"), outside


def spannable(gm: fx.GraphModule, segments: list[Segment], starts: list[int], ends: list[int],
              opaque: tuple[str, ...] = ()) -> set[tuple[int, int]]:
    """The pairs (s, j), s in `starts`, j in `ends`, s < j (segment indexes), for which
    `span` over segments s..j is not None, worked out in one pass per start."""
    nodes, position, last_use, mutated_at = _order(gm)
    named = {n.name: n for n in nodes}
    found = set()
    for s in starts:
        start = position[named[segments[s].nodes[0]]]
        reach, p, blocked = -1, start, False  # the furthest use of a node absorbed so far
        for j in sorted(e for e in ends if e > s):
            end = position[named[segments[j].output]]
            while p <= end and not blocked:
                node = nodes[p]
                outside = [a for a in node.all_input_nodes if a.op != "get_attr" and position.get(a, -1) < start]
                blocked = (any(a in mutated_at and any(k >= start for k in mutated_at[a]) for a in outside)
                           or node.op == "call_module" and node.target in opaque)
                if p < end:
                    reach = max(reach, last_use[node])
                p += 1
            if blocked:
                break
            if reach <= end < last_use[nodes[end]]:
                found.add((s, j))
            reach = max(reach, last_use[nodes[end]])
    return found
