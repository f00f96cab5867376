"""RevNet-style net: hand-written additive couplings y1 = x1 + F(x2), y2 = x2 + G(y1)."""

import torch
from torch import nn

__all__ = ["RevNetStyle"]


def _residual_fn(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
    )


class AdditiveCoupling(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.f = _residual_fn(channels // 2)
        self.g = _residual_fn(channels // 2)

    def forward(self, x):
        x1, x2 = torch.chunk(x, 2, dim=1)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=1)


class RevNetStyle(nn.Module):
    def __init__(self, channels: int = 32, depth: int = 4, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.couplings = nn.Sequential(*[AdditiveCoupling(channels) for _ in range(depth)])
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.head(self.couplings(self.stem(x)))
