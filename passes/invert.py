"""Invert: run chains of invertible units (`passes/invert_chains.py`) saving only
their output for the backward.

`rewrite` (and `apply`, from a plan's decisions) replaces each chosen chain by one
`InvertChain` call, an autograd Function
that saves the chain's output (and per-channel statistics). Its backward walks the
units in reverse, from each unit's output: BatchNorm (InstanceNorm, GroupNorm: with
per-sample statistics; LayerNorm: per position) rebuilds its input and calls PyTorch's
own backward kernel, leaky_relu and ELU take their gradients straight
from the output, rearrangements and scalar maps undo themselves, and a coupling runs
G then F once each on rebuilt inputs (the RevNet order), each graph freed before the
next. A stack of couplings so keeps memory flat in depth. BatchNorm running
statistics are updated once: the forward uses the module's own kernel and momentum
rule, and reruns inside couplings are restored.

Each step checks the rebuild's error factors with the current weights: a chain whose
factors have grown past `MAX_AMPLIFICATION` keeps its input instead, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules.batchnorm import _BatchNorm

from rewriter.passes.invert_chains import (MAX_AMPLIFICATION, NORM_KINDS, Chain, Unit, calibrate, calibration_probes,
                                          chain_between, chains)
from rewriter.cost_models.in_place import mutates_an_input as _mutates_an_input
from rewriter.passes.recompute import _RestoreBatchNormStats
from rewriter.passes.registry import Candidate, Decision, Pricing

__all__ = ["Unit", "Chain", "InvertChain", "chains", "chain_between", "calibrate", "calibration_probes", "candidates", "apply",
           "rewrite", "KEY", "MAX_AMPLIFICATION", "assuming_fallback"]

log = logging.getLogger(__name__)


# ---- running a chain -----------------------------------------------------------------------
class _Index:
    """gm's nodes by name and their positions, worked out once per rewrite (a chain's
    units each look nodes up, and a long network has hundreds of chains)."""

    def __init__(self, gm: fx.GraphModule):
        self.by_name = {n.name: n for n in gm.graph.nodes}
        self.position = {name: i for i, name in enumerate(self.by_name)}


def _subgraph(gm: fx.GraphModule, names: tuple[str, ...], inputs: list[str], output: str,
              index: _Index | None = None) -> fx.GraphModule:
    """A GraphModule over gm's submodules running `names`, reading `inputs`, returning
    `output`; `index`: gm's `_Index`, if at hand."""
    graph = fx.Graph()
    index = _Index(gm) if index is None else index
    by_name = index.by_name
    env = {by_name[name]: graph.placeholder(name) for name in inputs}
    for node in (by_name[name] for name in sorted((n for n in names if n in by_name), key=index.position.__getitem__)):
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":
                env[arg] = graph.get_attr(arg.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[by_name[output]])
    return fx.GraphModule(gm, graph, class_name="Unit")


class _Step:
    """A unit, ready to run: `code(x)` its forward; `inverse(out, info)` its input."""

    def __init__(self, unit: Unit, code, modules: list[nn.Module], module: nn.Module | None = None,
                 inplace: bool = False, f=None, g=None, inverse_dims: tuple[int, ...] | None = None,
                 branches: list[list["_Step"]] | None = None):
        """`code` runs the unit (a GraphModule over the owner's submodules, or any
        callable: an exported module's method); `modules`, the submodules it calls;
        `module`, the one whose weights the inverse reads (BatchNorm, PReLU); `f`, `g`:
        a coupling's functions; `inverse_dims`: the permutation undoing a permute;
        `branches`: a fork-join's steps per piece."""
        self.unit, self.code, self.modules, self.module = unit, code, modules, module
        self.inplace, self.f, self.g, self.inverse_dims = inplace, f, g, inverse_dims
        self.branches = branches or []
        self.moves = Chain((unit,)).can_fall_back  # its error factor can grow with training: a possible anchor

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, unit: Unit, index: _Index | None = None) -> "_Step":
        """`index`: gm's `_Index`, if at hand."""
        index = _Index(gm) if index is None else index
        by_name = index.by_name
        node = by_name[unit.output]
        modules = list({id(m): m for m in (gm.get_submodule(by_name[n].target) for n in unit.nodes
                                           if by_name[n].op == "call_module")}.values())
        module = gm.get_submodule(node.target) if node.op == "call_module" and unit.kind != "coupling" else None
        inplace = any(_mutates_an_input(gm, by_name[n]) for n in unit.nodes)
        f = g = inverse_dims = None
        if unit.kind == "coupling":
            chunk = by_name[unit.nodes[0]]
            x2 = next(u for u in chunk.users if u.args[1] == 1)
            y1 = next(by_name[n] for n in unit.nodes if by_name[n].target in (operator.add, torch.add) and x2 not in by_name[n].args)
            f_out = next(a for a in y1.args if a.name in unit.f)
            g_out = next(a for u in x2.users if u.name in unit.nodes and u.target in (operator.add, torch.add) for a in u.args if a is not x2)
            f = _subgraph(gm, unit.f, [x2.name], f_out.name, index)
            g = _subgraph(gm, unit.g, [y1.name], g_out.name, index)
        if unit.kind == "rearrange" and unit.arg[0] == "permute":
            dims = node.args[1:] if node.op == "call_method" else node.args[1]
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            inverse_dims = tuple(sorted(range(len(dims)), key=lambda i: dims[i]))
        branches = [[cls.from_graph(gm, u, index) for u in branch] for branch in unit.branches]
        code = _subgraph(gm, unit.nodes, [unit.input], unit.output, index)
        return cls(unit, code, modules, module, inplace, f, g, inverse_dims, branches)

    def _cut(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A fork-join's pieces of `tensor` (its input, output or gradient), as its split makes them."""
        how, size, dim = self.unit.arg
        return torch.chunk(tensor, size, dim) if how == "chunk" else torch.split(tensor, size, dim)

    def _branch_infos(self, info: tuple) -> list[list[tuple]]:
        """A fork-join's flat `info`, per branch and step (BatchNorm keeps two tensors)."""
        rest, found = list(info), []
        for branch in self.branches:
            found.append([])
            for step in branch:
                count = 2 if step.unit.kind in NORM_KINDS else 0
                found[-1].append(tuple(rest[:count]))
                rest = rest[count:]
        return found

    def parameters(self) -> list[nn.Parameter]:
        found = {id(p): p for m in self.modules for p in m.parameters()}
        if isinstance(self.code, nn.Module):  # parameters a function reads through get_attr
            found.update({id(p): p for p in self.code.parameters()})
        return [p for p in found.values() if p.requires_grad]

    def norms(self) -> list[nn.Module]:
        return [m for m in self.modules if isinstance(m, _BatchNorm)]

    def forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The unit's output, and what its backward needs beyond the output: a
        BatchNorm's batch mean and inverse std, from the same kernel and with the same
        running-statistics update as `nn.BatchNorm` itself."""
        if self.unit.kind == "fork_join":
            outs, infos = [], []
            for branch, piece in zip(self.branches, self._cut(inp)):
                for step in branch:
                    piece, info = step.forward(piece)
                    infos.extend(info)
                outs.append(piece)
            return torch.cat(outs, self.unit.arg[2]), tuple(infos)
        if self.unit.kind == "instance_norm":  # as torch.instance_norm runs it: a batch norm of one sample
            norm, (n, c) = self.module, inp.shape[:2]
            out, mean, invstd = torch.native_batch_norm(
                inp.contiguous().view(1, n * c, *inp.shape[2:]), _repeated(norm.weight, n), _repeated(norm.bias, n),
                None, None, True, 0.0, norm.eps)
            return out.view(inp.shape), (mean, invstd)
        if self.unit.kind == "group_norm":
            norm, (n, c) = self.module, inp.shape[:2]
            out, mean, rstd = torch.native_group_norm(inp.contiguous(), norm.weight, norm.bias, n, c, inp[0, 0].numel(),
                                                      norm.num_groups, norm.eps)
            return out, (mean, rstd)
        if self.unit.kind == "layer_norm":
            norm = self.module
            out, mean, rstd = torch.native_layer_norm(inp, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            return out, (mean, rstd)
        if self.unit.kind != "batch_norm":
            return self.code(inp), ()
        bn = self.module
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # a cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        out, mean, invstd = torch.native_batch_norm(
            inp, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, momentum, bn.eps)
        return out, (mean, invstd)

    def backward(self, out: torch.Tensor, grad: torch.Tensor, info: tuple, shape: torch.Size, rebuild: bool,
                 given: torch.Tensor | None = None):
        """From the unit's output alone: the gradient of its input, its parameters'
        gradients [(parameter, gradient)], and (if `rebuild`) its input; `given`: the
        input, kept (an anchor, for a unit whose rebuild would err too much), not rebuilt."""
        kind, arg = self.unit.kind, self.unit.arg
        if kind == "fork_join":  # each piece back through its branch, then joined again
            grads, inputs, pairs = [], [], []
            for branch, piece, piece_grad, infos in zip(self.branches, self._cut(out), self._cut(grad), self._branch_infos(info)):
                for j in reversed(range(len(branch))):
                    piece_grad, found, rebuilt = branch[j].backward(piece, piece_grad, infos[j], piece.shape, rebuild=j > 0 or rebuild)
                    pairs += found
                    piece = rebuilt
                grads.append(piece_grad)
                inputs.append(piece)
            dim = arg[2]
            return torch.cat(grads, dim), pairs, torch.cat(inputs, dim) if rebuild else None
        if kind == "leaky_relu":  # PyTorch's own kernels, each one pass
            grad_in = torch.ops.aten.leaky_relu_backward(grad, out, arg[0], True)
            return grad_in, [], F.leaky_relu(out, 1.0 / arg[0]) if rebuild else None
        if kind == "elu":
            grad_in = torch.ops.aten.elu_backward(grad, arg[0], 1, 1, True, out)
            return grad_in, [], (self.inverse(out, info, shape) if given is None else given) if rebuild else None
        if kind == "prelu":
            inp = self.inverse(out, info, shape) if given is None else given
            weight = self.module.weight
            slope = weight.reshape(1, -1, *([1] * (out.dim() - 2))) if weight.numel() > 1 else weight
            grad_in = grad * slope
            torch.where(out > 0, grad, grad_in, out=grad_in)
            params = []
            if weight.requires_grad:
                contribution = grad * inp
                contribution.masked_fill_(out > 0, 0)
                dims = [d for d in range(out.dim()) if d != 1] if weight.numel() > 1 else list(range(out.dim()))
                params.append((weight, contribution.sum(dims).reshape(weight.shape)))
            return grad_in, params, inp
        if kind == "batch_norm":  # rebuild the input in one pass, then BatchNorm's own backward kernel
            inp = self.inverse(out, info, shape) if given is None else given
            bn, (mean, invstd) = self.module, info
            wanted = [True, bn.weight is not None and bn.weight.requires_grad, bn.bias is not None and bn.bias.requires_grad]
            grad_in, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad, inp, bn.weight, None, None, mean, invstd, True, bn.eps, wanted)
            params = [(p, g) for p, g in ((bn.weight, grad_weight), (bn.bias, grad_bias)) if g is not None]
            return grad_in, params, inp if rebuild else None
        if kind in ("instance_norm", "group_norm"):
            inp = self.inverse(out, info, shape) if given is None else given
            norm, (n, c), (mean, invstd) = self.module, out.shape[:2], info
            wanted = [True, norm.weight is not None and norm.weight.requires_grad,
                      norm.bias is not None and norm.bias.requires_grad]
            if kind == "group_norm":
                grad_in, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
                    grad.contiguous(), inp, mean, invstd, norm.weight, n, c, out[0, 0].numel(), norm.num_groups, wanted)
            else:
                flat = (1, n * c, *out.shape[2:])
                grad_in, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                    grad.contiguous().view(flat), inp.view(flat), _repeated(norm.weight, n), None, None, mean, invstd, True,
                    norm.eps, wanted)
                grad_in = grad_in.view(out.shape)
                grad_weight, grad_bias = (None if g is None else g.view(n, c).sum(0) for g in (grad_weight, grad_bias))
            params = [(p, g) for p, g in ((norm.weight, grad_weight), (norm.bias, grad_bias)) if g is not None]
            return grad_in, params, inp if rebuild else None
        if kind == "layer_norm":
            inp = self.inverse(out, info, shape) if given is None else given
            norm, (mean, rstd) = self.module, info
            wanted = [True, norm.weight is not None and norm.weight.requires_grad,
                      norm.bias is not None and norm.bias.requires_grad]
            grad_in, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
                grad, inp, norm.normalized_shape, mean, rstd, norm.weight, norm.bias, wanted)
            params = [(p, g) for p, g in ((norm.weight, grad_weight), (norm.bias, grad_bias)) if g is not None]
            return grad_in, params, inp if rebuild else None
        # affine maps and rearrangements: the gradient goes back through the same linear map
        if kind == "affine":
            op, value, side = arg
            factor = value if op == "mul" else 1.0 / value if op == "div" else -1.0 if (op, side) == ("sub", "right") else 1.0
            grad_in = grad * factor if factor != 1.0 else grad
        else:
            grad_in = self.inverse(grad, info, shape)
        return grad_in, [], self.inverse(out, info, shape) if rebuild else None

    def coupling_backward(self, out: torch.Tensor, grad: torch.Tensor, rebuild: bool):
        """The RevNet backward: G then F each run once, with autograd, on rebuilt
        inputs; each one's graph freed before the next is built."""
        own = self.parameters()
        y1, y2 = torch.chunk(out, 2, dim=1)
        grad_y1, grad_y2 = torch.chunk(grad, 2, dim=1)
        with torch.enable_grad():
            leaf = y1.detach().requires_grad_()
            g = self.g(leaf)
            found_g = torch.autograd.grad(g, [leaf, *own], grad_y2, allow_unused=True)
        x2 = y2 - g.detach()
        del g, leaf
        grad_y1 = grad_y1 + found_g[0]
        with torch.enable_grad():
            leaf = x2.detach().requires_grad_()
            f = self.f(leaf)
            found_f = torch.autograd.grad(f, [leaf, *own], grad_y1, allow_unused=True)
        grad_in = torch.cat([grad_y1, grad_y2 + found_f[0]], dim=1)
        inp = torch.cat([y1 - f.detach(), x2], dim=1) if rebuild else None
        del f, leaf
        pairs = [(p, a if b is None else b if a is None else a + b) for p, a, b in zip(own, found_g[1:], found_f[1:])]
        return grad_in, pairs, inp

    def inverse(self, out: torch.Tensor, info: tuple, shape: torch.Size) -> torch.Tensor:
        """The unit's input rebuilt from its output, in the output's dtype (under
        autocast a BatchNorm's bfloat16 output rebuilt with float32 parameters is
        float32: its backward kernel takes it in the dtype its gradient has)."""
        return self._inverse(out, info, shape).to(out.dtype)

    def _inverse(self, out: torch.Tensor, info: tuple, shape: torch.Size) -> torch.Tensor:
        kind, arg = self.unit.kind, self.unit.arg
        if kind == "leaky_relu":  # leaky_relu with the reciprocal slope
            return F.leaky_relu(out, 1.0 / arg[0])
        if kind == "elu":
            rebuilt = torch.log1p(out / arg[0])
            return torch.where(out > 0, out, rebuilt, out=rebuilt)
        if kind == "prelu":
            weight = self.module.weight
            weight = weight.reshape(1, -1, *([1] * (out.dim() - 2))) if weight.numel() > 1 else weight
            rebuilt = out / weight
            return torch.where(out > 0, out, rebuilt, out=rebuilt)
        if kind == "batch_norm":  # x = y / (gamma * invstd) + (mean - beta / (gamma * invstd))
            mean, invstd = info
            bn, view = self.module, (1, -1) + (1,) * (out.dim() - 2)
            scale = 1.0 / (invstd if bn.weight is None else bn.weight * invstd)
            shift = mean if bn.bias is None else mean - bn.bias * scale
            return torch.mul(out, scale.reshape(view)).add_(shift.reshape(view))  # (addcmul: no symbolic-shape meta)
        if kind in ("instance_norm", "group_norm"):  # the same, per sample and channel
            norm, (n, c) = self.module, out.shape[:2]
            mean, invstd = _per_channel(info, n, c)
            view = (n, c) + (1,) * (out.dim() - 2)
            scale = 1.0 / (invstd if norm.weight is None else norm.weight * invstd)
            shift = mean if norm.bias is None else mean - norm.bias * scale
            return torch.mul(out, scale.reshape(view)).add_(shift.reshape(view)).contiguous()
        if kind == "layer_norm":  # x = (y - beta) / gamma / rstd + mean, per position
            norm, (mean, rstd) = self.module, info
            rebuilt = out.clone() if norm.bias is None else out - norm.bias
            if norm.weight is not None:
                rebuilt.div_(norm.weight)
            return rebuilt.div_(rstd).add_(mean)
        if kind == "affine":
            op, value, side = arg
            if op == "mul":
                return out / value
            if op == "div":
                return out * value
            if op == "add":
                return out - value
            return out + value if side == "left" else value - out  # x - b, or b - x
        if kind == "rearrange":
            if arg[0] == "reshape":
                return out.reshape(shape)
            if arg[0] == "permute":
                return out.permute(self.inverse_dims)
            if arg[0] == "pixel_shuffle":
                return F.pixel_unshuffle(out, arg[1])
            return F.pixel_shuffle(out, arg[1])
        if kind == "coupling":
            y1, y2 = torch.chunk(out, 2, dim=1)
            x2 = y2 - self.g(y1)
            x1 = y1 - self.f(x2)
            return torch.cat([x1, x2], dim=1)
        raise ValueError(f"unit kind {kind!r} has no inverse")

    def factor(self, out: torch.Tensor, info: tuple) -> torch.Tensor | float:
        """The error amplification of this step's inverse with the current values (a
        0-dim tensor where it depends on them)."""
        kind = self.unit.kind
        if kind == "fork_join":  # the worst piece; an ELU inside a branch keeps its calibrated factor
            worst = 1.0
            for branch, piece, infos in zip(self.branches, self._cut(out), self._branch_infos(info)):
                growth = 1.0
                for j, step in enumerate(branch):
                    growth = growth * (step.factor(piece, infos[j]) if step.unit.kind != "elu" or j == len(branch) - 1 else step.unit.factor)
                worst = torch.maximum(torch.as_tensor(worst, dtype=torch.float32), torch.as_tensor(growth, dtype=torch.float32))
            return worst
        if kind in NORM_KINDS:
            std = 1.0 / (info[1] if kind in ("batch_norm", "layer_norm") else _per_channel(info, *out.shape[:2])[1])
            if self.module.weight is not None:
                std = std / self.module.weight.detach().abs()
            return std.max().clamp(min=1.0)
        if kind == "prelu":
            weight = self.module.weight.detach()
            return torch.where(weight > 0, 1.0 / weight, torch.full_like(weight, math.inf)).max().clamp(min=1.0)
        if kind == "elu":
            alpha = self.unit.arg[0]
            return (alpha / (out.detach().min() + alpha)).clamp(min=1.0)
        return self.unit.factor


_FALLBACK = [False]  # whether chains run on fake tensors act as fallen back (`assuming_fallback`)


def _anchors(steps: list[_Step], factors: list[float]) -> list[int] | None:
    """The steps whose inputs to keep (anchors) so that no rebuilt tensor's error grows
    past `MAX_AMPLIFICATION`: walking back from the output, where the product of the
    factors since the last anchor passes the bound, the nearest step after it whose
    factor moves with training (its input kept, the product starts again below it;
    the steps between have fixed factors, whose product the chain's cut bounds).
    None where that cannot hold (a fork-join's own branches past the bound): the
    chain's input is kept and the chain rerun instead."""
    anchors, product, nearest = [], 1.0, None
    for index in reversed(range(len(steps))):
        product *= factors[index]
        if steps[index].moves:
            nearest = index
        if product > MAX_AMPLIFICATION:
            if nearest is None or steps[nearest].unit.kind == "fork_join":
                return None
            anchors.append(nearest)
            product = math.prod(factors[index:nearest])
            nearest = None
    return sorted(anchors)


@contextlib.contextmanager
def assuming_fallback():
    """Inside, chains run on fake tensors (the cost model's profile) as they run when
    their weights have moved past the error bound (those that can: `can_fall_back`):
    keeping their input instead of their output, so that a plan can promise its
    budget after training too."""
    _FALLBACK[0] = True
    try:
        yield
    finally:
        _FALLBACK[0] = False


def _repeated(tensor: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A per-channel parameter for `n` samples laid side by side (torch.instance_norm's view)."""
    return None if tensor is None else tensor.repeat(n)


def _per_channel(info: tuple, n: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An InstanceNorm's or GroupNorm's (mean, inverse std), per sample and channel (n, c)."""
    mean, invstd = info
    groups = mean.numel() // n
    return tuple(t.reshape(n, groups).repeat_interleave(c // groups, dim=1) for t in (mean, invstd))


class _InvertFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain: "InvertChain", x: torch.Tensor, *params):
        ctx.chain = chain
        infos, shapes, factors, held, inp = [], [], [], {}, x
        for index, step in enumerate(chain.steps):
            if step.moves:  # a possible anchor: held until the factors are known
                held[index] = inp
            out, info = step.forward(inp)
            infos.append(info)
            shapes.append(inp.shape)
            factors.append(step.factor(out, info))
            inp = out
        # values are unknown while the cost model traces on fake tensors: the plan's check
        # holds, and the plan is profiled once more with every chain fallen back
        if isinstance(out, FakeTensor):
            anchors = (sorted(held) if not any(s.unit.kind == "fork_join" for s in chain.steps if s.moves) else None
                       ) if _FALLBACK[0] and chain.can_fall_back else []
        else:
            anchors = _anchors(chain.steps, [float(f) for f in factors])
            if anchors != []:
                log.warning("invert chain ending at %s: rebuilding would amplify rounding error past %g-fold with the "
                            "current weights; %s is kept instead this step (within the plan's budget: its fallback peak)",
                            chain.steps[-1].unit.output, MAX_AMPLIFICATION,
                            "its input" if anchors is None else
                            "the input of each of " + ", ".join(chain.steps[i].unit.output for i in anchors))
        ctx.fallback = anchors is None
        ctx.anchors = [] if anchors is None else anchors
        if ctx.fallback:
            ctx.save_for_backward(x)
        else:
            ctx.save_for_backward(out, *(t for info in infos for t in info), *(held[i] for i in ctx.anchors))
        ctx.counts = [len(info) for info in infos]
        ctx.shapes = shapes
        return out

    @staticmethod
    def backward(ctx, grad):
        chain: InvertChain = ctx.chain
        saved = ctx.saved_tensors
        params = chain.params
        param_grads: dict[int, torch.Tensor] = {}
        with _RestoreBatchNormStats(chain.stat_buffers()):
            if ctx.fallback:
                with torch.enable_grad():
                    leaf = saved[0].detach().requires_grad_()
                    value = leaf
                    for step in chain.steps:
                        value = step.code(value.clone() if step.inplace else value)
                    results = torch.autograd.grad(value, [leaf, *params], grad, allow_unused=True)
                return (None, results[0], *results[1:])
            out, rest = saved[0], list(saved[1:])
            infos = []
            for count in ctx.counts:
                infos.append(tuple(rest[:count]))
                rest = rest[count:]
            kept = dict(zip(ctx.anchors, rest))  # the anchors' inputs
            for index in reversed(range(len(chain.steps))):
                step = chain.steps[index]
                if step.unit.kind == "coupling":
                    grad, pairs, inp = step.coupling_backward(out, grad, rebuild=index > 0)
                    del out
                else:  # elementwise units: the gradient straight from the output
                    grad, pairs, inp = step.backward(out, grad, infos[index], ctx.shapes[index], rebuild=index > 0,
                                                     given=kept.pop(index, None))
                    del out
                for p, g in pairs:
                    if g is not None:
                        param_grads[id(p)] = g if id(p) not in param_grads else param_grads[id(p)] + g
                out = inp
        return (None, grad, *(param_grads.get(id(p)) for p in params))


class InvertChain(nn.Module):
    """Runs a chain of invertible units, saving only its output for the backward.

    The units' code are GraphModules over the owner's submodules, kept out of the
    module tree (no parameter or state_dict key of their own)."""

    def __init__(self, steps: list[_Step]):
        super().__init__()
        object.__setattr__(self, "steps", steps)

    @property
    def params(self) -> list[nn.Parameter]:
        seen, found = set(), []
        for step in self.steps:
            for p in step.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    found.append(p)
        return found

    def code_parameters(self) -> list[nn.Parameter]:
        return self.params

    @property
    def can_fall_back(self) -> bool:
        """Whether training can move this chain's error factors past the bound: a unit
        whose factor depends on weights or values (a normalisation's std / |gamma|,
        PReLU's slope, ELU's range); couplings, fixed slopes and rearrangements cannot
        (`Chain.can_fall_back`)."""
        return any(step.moves for step in self.steps)

    def stat_buffers(self) -> list[torch.Tensor]:
        return [b for step in self.steps for m in step.norms() for b in m.buffers()]

    def codes(self) -> list[nn.Module]:
        """Every module the units run, forward or inverse (a fork-join's branches too)."""
        found: list[nn.Module] = []

        def walk(steps: list[_Step]) -> None:
            for step in steps:
                found.extend(m for m in (step.code, step.module, step.f, step.g, *step.modules) if isinstance(m, nn.Module))
                for branch in step.branches:
                    walk(branch)

        walk(self.steps)
        return found

    def forward(self, x):
        # without autograd, or with BatchNorm in eval mode (the inverse needs batch
        # statistics), the units run as they are
        if not torch.is_grad_enabled() or not all(m.training for step in self.steps for m in step.norms()):
            for step in self.steps:
                x = step.code(x)
            return x
        return _InvertFunction.apply(self, x, *self.params)

    def extra_repr(self) -> str:
        return ", ".join(s.unit.kind for s in self.steps)


KEY = "invert:"  # a chain's candidate key: this prefix and the chain's output


def candidates(pricing: Pricing, found: list[Chain]) -> list[Candidate]:
    """Each chain, inverted: every unit is inverted in backward (an elementwise pass
    over its bytes, twice: rebuild and gradient) and a coupling's F and G run once
    more; it saves what its members own but its output."""
    offered = []
    for chain in found:
        coupled = [n for u in chain.units if u.kind == "coupling" for n in u.f + u.g]
        seconds = pricing.rerun_seconds(chain.nodes, move=2.0) + pricing.rerun_seconds(coupled)
        saved = pricing.saved(n for n in chain.nodes if n != chain.output)
        offered.append(Candidate("invert", KEY + chain.output, chain.nodes, chain.output, ("invert",), (seconds,), (saved,),
                                 ((chain.input,),)))
    return offered


def apply(gm: fx.GraphModule, decisions: list[Decision]) -> fx.GraphModule:
    """`rewrite` as `decisions` say: each chain's units (detail: its input node) worked
    out over its nodes alone. ValueError where they are no invertible chain of `gm`."""
    found = chains(gm, bound=math.inf)
    picked = []
    for decision in decisions:
        try:
            chain = chain_between(found, decision.detail[0], decision.output)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        if chain.nodes != decision.nodes:
            raise ValueError(f"the invertible chain from {decision.detail[0]!r} to {decision.output!r} covers nodes "
                             f"{chain.nodes[:4]}..., not the plan's {decision.nodes[:4]}...")
        picked.append(chain)
    return rewrite(gm, [c.output for c in picked], picked)


def rewrite(gm: fx.GraphModule, chosen: list[str], all_chains: list[Chain]) -> fx.GraphModule:
    """A new GraphModule where each chain whose output is in `chosen` runs as an
    InvertChain. `gm` is not modified; parameters are shared. Chains whose nodes are
    no longer in `gm` (inside a recomputed segment) are skipped."""
    from rewriter.passes.recompute import replace_runs

    present = {n.name for n in gm.graph.nodes}
    by_output = {c.output: c for c in all_chains if c.output in chosen and all(n in present for n in c.nodes)}
    targets = {out: f"rewriter_invert_{i}" for i, out in enumerate(by_output)}
    index = _Index(gm)

    def call(new: fx.GraphModule, graph: fx.Graph, chain: Chain, value) -> fx.Node:
        new.add_submodule(targets[chain.output], InvertChain([_Step.from_graph(gm, u, index) for u in chain.units]))
        node = graph.create_node("call_module", targets[chain.output], (value(chain.input),), name=chain.output)
        node.meta["rewriter"] = {"strategy": "invert", "nodes": chain.nodes}
        return node

    return replace_runs(gm, list(by_output.values()), call)
