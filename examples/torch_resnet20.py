"""ResNet-20 in PyTorch with the parameter names of examples/resnet20.cnn, and a round trip
of its weights between the two: torch -> cnnc with `set_params(state_dict())`, cnnc -> torch
with `load_state_dict({**params, **buffers})`.

    python examples/torch_resnet20.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import cnnc


class Basic(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:  # the 1x1 projection shortcut
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet20(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(Basic(inplanes, planes, stride),
                                        Basic(planes, planes, 1), Basic(planes, planes, 1)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def round_trip(module: cnnc.Module, seed: int = 0) -> float:
    """torch's weights into cnnc and back; the largest difference of their outputs."""
    torch.manual_seed(seed)
    net = ResNet20().eval()
    module.set_params(net.state_dict())  # torch -> cnnc, running statistics included
    net.load_state_dict({name: torch.from_numpy(np.array(value))  # and back
                         for name, value in {**module.params, **module.buffers}.items()})
    x = np.random.default_rng(seed).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    return float(np.abs(module.forward(x) - want).max())


if __name__ == "__main__":
    here = Path(__file__).parent
    m = cnnc.compile(here / "resnet20.cnn")
    print(f"largest difference between torch and cnnc: {round_trip(m):.2e}")
    sys.exit(0)
