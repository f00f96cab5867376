"""Small nets that each exercise one hard case for a graph rewriter."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DropoutNet", "SharedModuleNet", "InplaceNet", "DataDependentNet"]


class DropoutNet(nn.Module):
    """Dropout between convolutions and in the classifier: masks must be drawn once."""

    def __init__(self, channels: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.drop1 = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.drop1(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.dropout(x.mean((2, 3)), p=0.5, training=self.training)
        return self.fc(x)


class SharedModuleNet(nn.Module):
    """One conv block called twice: its parameters get two gradient contributions."""

    def __init__(self, channels: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.block(self.block(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class InplaceNet(nn.Module):
    """In-place ops: ReLU(inplace=True), `x += y`, `mul_` on a fresh tensor."""

    def __init__(self, channels: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        y += x
        y = self.relu(y)
        z = y * 2.0
        z.mul_(0.5)
        return self.fc(z.mean((2, 3)))


class Gate(nn.Module):
    """Data-dependent control flow: symbolic tracing cannot follow the `if`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return torch.relu(y)
        return torch.tanh(y)


class DataDependentNet(nn.Module):
    def __init__(self, channels: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.gate = Gate(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.gate(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))
