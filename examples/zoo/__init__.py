"""The model zoo for tests, examples and benchmarks, written here (torchvision is not required).

`ZOO` maps a name to a `ZooModel`: how to build it, and two input shapes, a test size
at which a CPU training step takes well under a second, and a realistic size for
benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from examples.zoo.densenet import DenseNetBC
from examples.zoo.plain import BNLeakyChain, HighResFCN, MobileNetV2, VGGStyle
from examples.zoo.resnet import resnet18_style, resnet50_style
from examples.zoo.revnet import RevNetStyle
from examples.zoo.small import DataDependentNet, DropoutNet, InplaceNet, SharedModuleNet
from examples.zoo.unet import UNet

__all__ = ["ZOO", "ZooModel"]


@dataclass(frozen=True)
class ZooModel:
    name: str
    build_test: Callable[[], nn.Module]
    test_shape: tuple[int, ...]
    build_bench: Callable[[], nn.Module]
    bench_shape: tuple[int, ...]

    def test_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build_test().train()

    def test_input(self, batch: int | None = None, seed: int = 1) -> torch.Tensor:
        shape = self.test_shape if batch is None else (batch, *self.test_shape[1:])
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def bench_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build_bench().train()

    def bench_input(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(self.bench_shape, generator=torch.Generator().manual_seed(seed))


_MODELS = [
    ZooModel("resnet18", lambda: resnet18_style(width=16), (4, 3, 64, 64), resnet18_style, (32, 3, 224, 224)),
    ZooModel("resnet50", lambda: resnet50_style(width=8), (4, 3, 64, 64), resnet50_style, (32, 3, 224, 224)),
    ZooModel("densenet_bc", lambda: DenseNetBC(growth=6, blocks=(3, 4, 6, 4)), (4, 3, 32, 32), DenseNetBC, (64, 3, 32, 32)),
    ZooModel("vgg", lambda: VGGStyle(widths=(16, 32, 64, 64)), (4, 3, 32, 32), VGGStyle, (64, 3, 224, 224)),
    ZooModel("mobilenet_v2", lambda: MobileNetV2(width_mult=0.25), (4, 3, 64, 64), MobileNetV2, (64, 3, 224, 224)),
    ZooModel("unet", lambda: UNet(base=8, levels=3), (2, 3, 64, 64), UNet, (4, 3, 512, 512)),
    ZooModel("bn_leaky_chain", lambda: BNLeakyChain(channels=16, depth=6), (4, 3, 32, 32), BNLeakyChain, (64, 3, 64, 64)),
    ZooModel("revnet", lambda: RevNetStyle(channels=16, depth=4), (4, 3, 32, 32), lambda: RevNetStyle(channels=64, depth=16), (64, 3, 64, 64)),
    ZooModel("highres_fcn", lambda: HighResFCN(channels=8, depth=4), (1, 3, 128, 128), HighResFCN, (1, 3, 1024, 1024)),
    ZooModel("dropout", DropoutNet, (4, 3, 32, 32), lambda: DropoutNet(channels=128), (64, 3, 64, 64)),
    ZooModel("shared_module", SharedModuleNet, (4, 3, 32, 32), lambda: SharedModuleNet(channels=128), (64, 3, 64, 64)),
    ZooModel("inplace", InplaceNet, (4, 3, 32, 32), lambda: InplaceNet(channels=128), (64, 3, 64, 64)),
    ZooModel("data_dependent", DataDependentNet, (4, 3, 32, 32), lambda: DataDependentNet(channels=128), (64, 3, 64, 64)),
]

ZOO: dict[str, ZooModel] = {m.name: m for m in _MODELS}
