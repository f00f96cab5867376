"""The command line: `rewriter explain|plan|fit MODEL ...` (also `python -m rewriter`).

MODEL names a factory, the way uvicorn and torchrun name an entry point:
`package.module:factory` (imported; the working directory is on the path) or
`path/to/file.py:factory`. The factory is called with `--kwargs` (a JSON object) and
must return a torch.nn.Module (a module object itself is taken as it is). Inputs are
random tensors of the shapes given with `--input` (one per positional input of
forward). Planning logs its phases at INFO on standard error (`--quiet`: none).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

import rewriter
from rewriter.errors import BudgetError, RewriterError
from rewriter.plan import format_bytes
from rewriter.report import largest_fitting
from rewriter.pipeline import STRATEGIES, parse_budget

__all__ = ["main", "load_model", "parse_shape"]

log = logging.getLogger(__name__)

_EXAMPLES = """examples:
  rewriter explain torchvision.models:resnet50 --input 8x3x224x224
  rewriter plan examples/zoo/unet.py:UNet --budget 200MiB --input 4x3x256x256 --out unet_plan
  rewriter plan monai.networks.nets:UNet --kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
      "channels": [16, 32, 64], "strides": [2, 2]}' --budget 1GiB --input 1x1x96x96x96
  rewriter fit my_models.py:build --budget 8GiB --input 16x3x224x224
"""


_OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params),
    "adamw": lambda params: torch.optim.AdamW(params),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
}


def parse_shape(text: str) -> tuple[int, ...]:
    """(8, 3, 224, 224) from "8x3x224x224"."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(size <= 0 for size in shape):
        raise argparse.ArgumentTypeError(f"input shape {text!r}: write it as sizes joined by x, such as 8x3x224x224")
    return shape


def load_model(spec: str, kwargs: dict | None = None) -> nn.Module:
    """The module that `spec` ("package.module:factory" or "path/to/file.py:factory")
    names, built with `kwargs`."""
    target, colon, name = spec.rpartition(":")
    if not colon or not target or not name:
        raise RewriterError(f"MODEL={spec!r}: name a factory as package.module:factory or path/to/file.py:factory")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewriterError(f"MODEL={spec!r}: there is no file {str(path)!r}")
        found = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(found)
        sys.path.insert(0, str(path.resolve().parent))  # its own imports of modules beside it
        found.loader.exec_module(module)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise RewriterError(f"MODEL={spec!r}: cannot import {target!r} ({error})") from error
    if not hasattr(module, name):
        raise RewriterError(f"MODEL={spec!r}: {target!r} has no {name!r}")
    factory = getattr(module, name)
    model = factory if isinstance(factory, nn.Module) else factory(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise RewriterError(f"MODEL={spec!r}: {name}(...) returned {type(model).__name__}, not a torch.nn.Module")
    return model.train()  # a training step is what is planned


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rewriter", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
        description="Fit a CNN's training step into a memory budget: see where its activation memory goes "
                    "(explain), plan a rewrite under a budget (plan), or find the largest batch that fits (fit).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, budget: bool) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, epilog=_EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("model", metavar="MODEL", help="package.module:factory or path/to/file.py:factory")
        sub.add_argument("--input", action="append", type=parse_shape, required=True, metavar="SHAPE",
                         help="shape of a random input, such as 8x3x224x224; once per positional input of forward")
        sub.add_argument("--kwargs", type=json.loads, default={}, metavar="JSON",
                         help="keyword arguments for the factory, as a JSON object")
        sub.add_argument("--device", default="cpu", help="where the model and inputs live (default cpu)")
        sub.add_argument("--quiet", action="store_true", help="no progress on standard error")
        if name != "fit":
            sub.add_argument("--plot", metavar="PNG", help="also draw the step's live activation memory there "
                                                           "(needs matplotlib: pip install 'rewriter[plot]')")
        if budget:
            sub.add_argument("--budget", required=True, type=parse_budget,
                             help="peak activation memory of one training step, such as 2GiB, 500MB or 123456789")
            sub.add_argument("--strategies", nargs="+", choices=STRATEGIES, metavar="STRATEGY",
                             help=f"the strategies to use (default all: {', '.join(STRATEGIES)})")
            sub.add_argument("--optimizer", choices=sorted(_OPTIMIZERS),
                             help="make the budget one of device memory: parameters, gradients and this optimizer's "
                                  "state come off it (default: the budget is of activations)")
        return sub

    command("explain", "print each node's activation memory and the predicted peak of a training step", False)
    plan = command("plan", "plan a rewrite whose training step fits the budget; print it, and save it with --out", True)
    plan.add_argument("--compress-bits", type=int, choices=(2, 4, 8), help="allow lossy compression to this many bits")
    plan.add_argument("--out", metavar="DIR", help="save the rewritten module there (rewriter.load reads it)")
    command("fit", "the largest batch whose training step fits the budget, without and with rewriting", True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit status: 0 done, 1 a model or input that does not
    work, 2 a usage error (argparse's), 3 no plan fits the budget."""
    args = _parser().parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        model = load_model(args.model, args.kwargs).to(args.device)
        inputs = tuple(torch.randn(shape, device=args.device) for shape in args.input)
        optimizer = _OPTIMIZERS[args.optimizer](model.parameters()) if getattr(args, "optimizer", None) else None
        if args.command == "explain":
            plan = rewriter.explain(model, inputs)
            print(plan)
        elif args.command == "plan":
            optimized = rewriter.optimize(model, args.budget, inputs, strategies=args.strategies,
                                          compress_bits=args.compress_bits, optimizer=optimizer)
            plan = optimized.plan
            print(plan.summary())
            if args.out:
                print(f"saved to {rewriter.save(optimized, args.out)}")
        else:
            _fit(model, inputs, args.budget, args.strategies, optimizer)
        if getattr(args, "plot", None):
            plan.plot(args.plot)
            print(f"drawn in {args.plot}")
    except BudgetError as error:
        print(f"rewriter: {error}", file=sys.stderr)
        return 3
    except RewriterError as error:
        print(f"rewriter: {error}", file=sys.stderr)
        return 1
    return 0


def _fit(model: nn.Module, inputs: tuple, budget: int, strategies: list[str] | None,
         optimizer: torch.optim.Optimizer | None) -> None:
    """Print the largest batch that fits `budget` as the model is (predicted) and with a
    plan (`optimize` finds one: predicted, and verified as every plan is)."""
    plain = rewriter.largest_batch(model, inputs, budget, optimizer=optimizer)
    print(f"as it is:       batch {plain} fits {format_bytes(budget)} (predicted)")

    def plans(batch: int) -> bool:
        scaled = tuple(t.new_empty((batch, *t.shape[1:])).normal_() for t in inputs)
        try:
            rewriter.optimize(model, budget, scaled, strategies=strategies, optimizer=optimizer)
        except BudgetError:
            return False
        log.info("batch %d: a plan fits", batch)
        return True

    planned = largest_fitting(plans, 2**20, known=plain)  # what fits as it is is planned as it is
    print(f"with rewriter:  batch {planned} fits {format_bytes(budget)} (planned)")
