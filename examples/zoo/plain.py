"""Plain stacks: VGG-style, MobileNetV2, a BatchNorm→LeakyReLU→conv chain, a high-resolution FCN."""

from torch import nn

__all__ = ["VGGStyle", "MobileNetV2", "BNLeakyChain", "HighResFCN"]


class VGGStyle(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), convs_per_stage=2, num_classes: int = 10):
        super().__init__()
        layers, channels = [], 3
        for width in widths:
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, output channels, repeats, stride), as in the paper
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, width_mult: float = 1.0, num_classes: int = 10):
        super().__init__()
        channels = int(32 * width_mult)
        layers = [nn.Conv2d(3, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU6(inplace=True)]
        for expand, out, repeats, stride in self.SETTINGS:
            out = max(8, int(out * width_mult))
            for i in range(repeats):
                layers.append(InvertedResidual(channels, out, stride if i == 0 else 1, expand))
                channels = out
        last = max(320, int(1280 * width_mult))
        layers += [nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BNLeakyChain(nn.Module):
    """Pre-activation blocks BatchNorm → LeakyReLU → conv, the shape invertible nets use."""

    def __init__(self, channels: int = 64, depth: int = 8, slope: float = 0.1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        blocks = []
        for _ in range(depth):
            blocks += [nn.BatchNorm2d(channels), nn.LeakyReLU(slope), nn.Conv2d(channels, channels, 3, padding=1)]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class HighResFCN(nn.Module):
    """A fully convolutional net that keeps full resolution: dense prediction on large images."""

    def __init__(self, channels: int = 16, depth: int = 6, out_channels: int = 2):
        super().__init__()
        layers, c = [], 3
        for i in range(depth):
            layers += [nn.Conv2d(c, channels, 3, padding=2 ** (i % 3), dilation=2 ** (i % 3)), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            c = channels
        layers.append(nn.Conv2d(c, out_channels, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)
