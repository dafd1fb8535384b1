"""CIFAR-style networks of the KD benchmarks (CRD / RepDistiller, Tian et al. 2020).

* ``resnet8 ... resnet110``: He et al. 2016's CIFAR ResNets, 3 stages of BasicBlocks, 16/32/64 channels,
  depth = 6n + 2. ``resnet8x4`` / ``resnet32x4`` are the 4x wider (32/64/128/256) variants.
* ``wrn_16_k`` / ``wrn_40_k``: Zagoruyko & Komodakis 2016's wide ResNets, depth = 6n + 4, widen factor k.
* ``mobilenetv2_half`` / ``mobilenetv2_cifar``: Sandler et al. 2018's MobileNetV2 (inverted residuals,
  expansion 6) at width 0.5 (CRD's ``mobile_half``) and 1.0, with CIFAR strides: its three stages have the
  ResNets' resolutions (32, 16, 8), so hint layers ``layer1..3`` pair with a ResNet teacher's.

Inputs (3, 32, 32) are the design point; the global pooling is adaptive, so other sizes work too.
"""
from __future__ import annotations

from torch import Tensor, nn

from kdray.models.zoo import register_model, set_layout


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class CifarResNet(nn.Module):
    def __init__(
        self, num_classes: int, input_shape: tuple[int, ...], depth: int = 20, filters: tuple[int, ...] = (16, 16, 32,
                                                                                                           64)
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if len(input_shape) != 3:
            raise ValueError(f"a CIFAR ResNet needs (channels, height, width) inputs, got {tuple(input_shape)}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = filters[0]
        for i, (planes, stride) in enumerate(zip(filters[1:], (1, 2, 2))):
            blocks = [BasicBlock(inplanes if j == 0 else planes, planes, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(inplanes, num_classes)
        _init(self)
        set_layout(self, ["layer1", "layer2", "layer3"], "flatten")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


class WideBasic(nn.Module):
    """Pre-activation block of the wide ResNet."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.drop(self.relu2(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(
        self, num_classes: int, input_shape: tuple[int, ...], depth: int = 16, widen_factor: int = 1,
            drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        if len(input_shape) != 3:
            raise ValueError(f"a WRN needs (channels, height, width) inputs, got {tuple(input_shape)}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(input_shape[0], ch[0], 3, padding=1, bias=False)
        for i, stride in enumerate((1, 2, 2)):
            blocks = [WideBasic(ch[i] if j == 0 else ch[i + 1], ch[i + 1], stride if j == 0 else 1,
                                drop_rate) for j in range(n)]
            self.add_module(f"block{i + 1}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(ch[3], num_classes)
        _init(self)
        set_layout(self, ["block1", "block2", "block3"], "flatten")

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn1(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection; a residual when shapes match."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(nn.Module):
    # (expansion, channels, blocks, stride) per stage; the stage boundaries follow the resolution
    STAGES = (((1, 16, 1, 1), (6, 24, 2, 1)),
              ((6, 32, 3, 2),),
              ((6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1)))

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width_mult: float = 1.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"a CIFAR MobileNetV2 needs (channels, height, width) inputs, got {tuple(input_shape)}")

        def ch(c: int) -> int:
            return max(8, int(round(c * width_mult / 8)) * 8)

        inp = ch(32)
        self.conv1 = nn.Sequential(nn.Conv2d(input_shape[0], inp, 3, 1, 1, bias=False), nn.BatchNorm2d(inp),
                                   nn.ReLU6(inplace=True))
        for i, stage in enumerate(self.STAGES):
            blocks = []
            for t, c, n, s in stage:
                for j in range(n):
                    blocks.append(InvertedResidual(inp, ch(c), s if j == 0 else 1, t))
                    inp = ch(c)
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        last = 1280
        self.head = nn.Sequential(nn.Conv2d(inp, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last, num_classes)
        _init(self)
        set_layout(self, ["layer1", "layer2", "layer3"], "flatten")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(self.head(x))))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


CIFAR = (3, 32, 32)
for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", "cifar", CIFAR, f"CIFAR ResNet-{_depth} (16/32/64 channels)", depth=_depth)(
        CifarResNet
    )
for _depth in (8, 32):
    register_model(
        f"resnet{_depth}x4", "cifar", CIFAR, f"CIFAR ResNet-{_depth}x4 (32/64/128/256 channels, CRD benchmark)",
        depth=_depth, filters=(32, 64, 128, 256),
    )(CifarResNet)
for _depth, _widths in ((16, (1, 2, 4, 8)), (40, (1, 2, 4))):
    for _k in _widths:
        register_model(
            f"wrn_{_depth}_{_k}", "cifar", CIFAR, f"wide ResNet WRN-{_depth}-{_k}", depth=_depth, widen_factor=_k
        )(WideResNet)
register_model("mobilenetv2_half", "cifar", CIFAR, "CIFAR MobileNetV2, width 0.5 (CRD's mobile_half)",
               width_mult=0.5)(CifarMobileNetV2)
register_model("mobilenetv2_cifar", "cifar", CIFAR, "CIFAR MobileNetV2, width 1.0; option width_mult")(CifarMobileNetV2)
