"""Well-known convolutional architectures written as plain torch modules (torchvision's and
the papers' layer lists, no downloads), with random weights and batch norms whose running
statistics are far from the identity, so that an import that folds or normalizes wrongly
shows in its numbers."""

from __future__ import annotations

import torch
from torch import nn


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


# -- ResNet (torchvision's ResNet-18, and the CIFAR ResNet-20 of He et al.) -------------------

class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm; a 1x1 strided conv + BN on the shortcut where the
    shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            _bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride),
                         *(BasicBlock(cout, cout, 1) for _ in range(blocks - 1)))


class ResNet18(nn.Module):
    """torchvision.models.resnet18: 7x7/2 stem, 3x3/2 max pool, four stages of two blocks."""

    def __init__(self, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = _bn(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _stage(w, w, 2, 1)
        self.layer2 = _stage(w, 2 * w, 2, 2)
        self.layer3 = _stage(2 * w, 4 * w, 2, 2)
        self.layer4 = _stage(4 * w, 8 * w, 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20: a 3x3 stem, three stages of three blocks (16, 32, 64)."""

    def __init__(self, classes: int = 10, blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = _bn(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(16, 16, blocks, 1)
        self.layer2 = _stage(16, 32, blocks, 2)
        self.layer3 = _stage(32, 64, blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# -- MobileNetV2 ------------------------------------------------------------------------------

def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1
                   ) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                                   bias=False), _bn(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; a residual when the shape
    stays."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(cin, hidden, 1, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), _bn(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def _divisible(value: float, by: int = 8) -> int:
    rounded = max(by, int(value + by / 2) // by * by)
    return rounded + by if rounded < 0.9 * value else rounded


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2's layer table (t, c, n, s), scaled by `width`; the
    first stride is 1 for small (CIFAR-sized) images."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 10, width: float = 0.5, first_stride: int = 1) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [_conv_bn_relu6(3, cin, 3, first_stride)]
        for t, c, n, s in self.SETTINGS:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# -- SqueezeNet 1.1 ---------------------------------------------------------------------------

class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand1: int, expand3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    """torchvision.models.squeezenet1_1: ceil-mode 3x3/2 max pools between fire modules,
    dropout, a 1x1 conv classifier, ReLU and an adaptive average pool."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(inplace=True), pool(),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# -- a darknet (tiny-YOLO) backbone -------------------------------------------------------------

def _dark(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), _bn(cout),
                         nn.LeakyReLU(0.1, inplace=True))


class DarknetTiny(nn.Module):
    """tiny-YOLOv2's backbone: conv + BN + LeakyReLU(0.1) blocks with 2x2/2 max pools, the
    stride-1 2x2 max pool that keeps the size (padded on the right and bottom only), and a
    1x1 conv head. Its widths are tiny-YOLO's (16 to 1024) divided by 16 / `width`."""

    def __init__(self, outputs: int = 30, width: int = 4) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        cin = 3
        for i in range(5):
            layers += [_dark(cin, w << i), nn.MaxPool2d(2, 2)]
            cin = w << i
        layers += [_dark(cin, w << 5), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(2, 1),
                   _dark(w << 5, w << 6), _dark(w << 6, w << 5, 1),
                   nn.Conv2d(w << 5, outputs, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# -- weights ----------------------------------------------------------------------------------

# Sample shapes: SqueezeNet's 66 x 66 makes every ceil-mode pool's last window a partial
# one (32 → 16 → 8 → 4; 64 x 64 would divide evenly); darknet's 96 x 96 leaves 3 x 3 for the
# stride-1 pool.
MODELS = {"resnet18": (ResNet18, (3, 64, 64)), "resnet20": (ResNet20, (3, 32, 32)),
          "mobilenetv2": (MobileNetV2, (3, 32, 32)), "squeezenet11": (SqueezeNet11, (3, 66, 66)),
          "darknet": (DarknetTiny, (3, 96, 96))}


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` with seeded random weights and batch norms whose scale, shift and running
    statistics are all random (running variances from 0.5 to 2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model `name` of MODELS with random weights, in eval mode, and its sample shape."""
    cls, shape = MODELS[name]
    return randomized(cls(), seed).eval(), shape
