"""torchvision's ImageNet architectures by name, with ``num_classes`` set and KD layouts declared.

Built with ``torchvision.models.get_model(name, weights=None, num_classes=...)``: random init. The
stage outputs listed here are where the spatial resolution halves (the usual hint layers); the
embedding layer is the last feature map (relational knowledge average-pools it to a vector).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from kdray.models.zoo import register_model, set_layout

# name -> (stage outputs, embedding layer)
LAYOUTS: dict[str, tuple[list[str], str]] = {
    "resnet18": (["layer1", "layer2", "layer3", "layer4"], "avgpool"),
    "resnet34": (["layer1", "layer2", "layer3", "layer4"], "avgpool"),
    "resnet50": (["layer1", "layer2", "layer3", "layer4"], "avgpool"),
    "mobilenet_v2": (["features.3", "features.6", "features.13", "features.18"], "features"),
    "mobilenet_v3_small": (["features.1", "features.3", "features.8", "features.12"], "avgpool"),
    "mobilenet_v3_large": (["features.3", "features.6", "features.12", "features.16"], "avgpool"),
    "shufflenet_v2_x0_5": (["stage2", "stage3", "stage4", "conv5"], "conv5"),
    "shufflenet_v2_x1_0": (["stage2", "stage3", "stage4", "conv5"], "conv5"),
    "efficientnet_b0": (["features.2", "features.3", "features.5", "features.8"], "avgpool"),
    "regnet_y_400mf": (["trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4"],
                       "avgpool"),
}


def _factory(arch: str):
    def build(num_classes: int, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
        if len(input_shape) != 3 or input_shape[0] != 3:
            raise ValueError(f"torchvision's {arch} needs RGB images (3, H, W), got inputs of shape "
                             f"{tuple(input_shape)}")
        if options.get("weights"):
            raise ValueError(
                f"pretrained weights for {arch} are not supported here (they need a download and 1000 classes); "
                "train the teacher with `kdray teacher` or load a kdray checkpoint"
            )
        from torchvision.models import get_model  # here: importing torchvision.models costs ~1 s (torch._dynamo)

        net = get_model(arch, weights=None, num_classes=num_classes, **{k: v for k,
                                                                        v in options.items() if k != "weights"})
        stages, emb = LAYOUTS[arch]
        return set_layout(net, stages, emb)

    build.__name__ = f"torchvision_{arch}"
    return build


for _arch in LAYOUTS:
    register_model(_arch, "torchvision", (3, 64, 64), f"torchvision {_arch} (random init)")(_factory(_arch))
