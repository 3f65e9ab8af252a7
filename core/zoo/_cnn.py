"""Image classifiers with the real ResNet-18 and MobileNetV2 topologies at reduced width, for 3x32x32
(CIFAR-sized) inputs: stems keep stride 1 so the spatial size is 32 -> 4 at the head.

Untrained, but seeded, with non-trivial norm parameters and BatchNorm statistics measured on random
images (see ``_common``), so folding BatchNorm and compressing convolutions change real numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from regc.zoo._common import ZooModel, calibrate_batchnorm, randomize_norm_affine, seeded


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, a residual add, then ReLU.

    The shortcut is the identity, or a 1x1 conv-BN ``downsample`` when the stride or width changes.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18Style(nn.Module):
    """ResNet-18 (4 stages of 2 basic blocks, widths w, 2w, 4w, 8w) with a 3x3 stride-1 stem.

    Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``fc``).
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: nearest multiple of ``divisor``, never below 90% of ``v``."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (absent when ``expand == 1``), 3x3 depthwise conv, 1x1 linear
    projection; a residual add when stride is 1 and the width is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion t, channels c, repeats n, first stride s): torchvision's table, with the second stage at
# stride 1 (and a stride-1 stem) for 32x32 inputs.
_MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2Style(nn.Module):
    """MobileNetV2 (17 inverted residual blocks, ReLU6, dropout + linear head) scaled by ``width_mult``.

    Module names follow torchvision (``features.N.conv``, ``classifier.1``).
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 0.5):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * width_mult)
        layers: list[nn.Module] = [_conv_bn_relu6(3, cin, 3)]
        for t, c, n, s in _MOBILENETV2_STAGES:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _image_classifier(name: str, module: nn.Module) -> ZooModel:
    """Randomize norms, calibrate BatchNorm on 8 random images, and take 2 more as example input."""
    randomize_norm_affine(module)
    calibrate_batchnorm(module, torch.randn(8, 3, 32, 32))
    return ZooModel(
        name=name,
        module=module,
        example_inputs=(torch.randn(2, 3, 32, 32),),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )


def resnet18_style(num_classes: int = 10, width: int = 16, seed: int = 0) -> ZooModel:
    """ResNet-18 topology at base width ``width`` on a (2, 3, 32, 32) batch ``x``; output ``logits``."""
    with seeded(seed):
        return _image_classifier("resnet18_style", ResNet18Style(num_classes, width))


def mobilenetv2_style(num_classes: int = 10, width_mult: float = 0.5, seed: int = 0) -> ZooModel:
    """MobileNetV2 topology at ``width_mult`` on a (2, 3, 32, 32) batch ``x``; output ``logits``."""
    with seeded(seed):
        return _image_classifier("mobilenetv2_style", MobileNetV2Style(num_classes, width_mult))
