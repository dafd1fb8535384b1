"""Small networks for the offline data sets (MNIST-1D, digits) and tiny ones for tests.

The MNIST-1D CNN is Greydanus's (2020) ``ConvBase``: three stride-2 1-D convolutions of 25 channels
and a linear head (the paper's 94 % model); the MLP student is its 2x100 ``MLP``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdray.models.zoo import register_model, set_layout


class ConvNet1d(nn.Module):
    """Stride-2 1-D convolutions (ReLU after each), flatten, linear."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], channels: int = 25, depth: int = 3) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"a 1-D CNN needs inputs of shape (channels, length), got {tuple(input_shape)}")
        c_in, length = input_shape
        self.depth = depth
        for i in range(depth):
            k = 5 if i == 0 else 3
            conv = nn.Conv1d(c_in if i == 0 else channels, channels, k, stride=2, padding=1)
            self.add_module(f"block{i + 1}", nn.Sequential(conv, nn.ReLU(inplace=False)))
        self.flatten = nn.Flatten()
        with torch.no_grad():
            n = self._features(torch.zeros(1, c_in, length)).shape[1]
        self.fc = nn.Linear(n, num_classes)
        set_layout(self, [f"block{i + 1}" for i in range(depth)], "flatten")

    def _features(self, x: Tensor) -> Tensor:
        for i in range(self.depth):
            x = getattr(self, f"block{i + 1}")(x)
        return self.flatten(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self._features(x))


class MLP(nn.Module):
    """Flatten, then Linear+ReLU blocks, then a linear head.

    ``width`` sets every hidden layer to one size (keeping their number): a single number, so a search space
    can search it as a categorical (Optuna's choices cannot be lists such as ``hidden``)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], hidden: list[int] | tuple[int, ...] = (100, 100),
                 dropout: float = 0.0, width: int | None = None):
        super().__init__()
        if not hidden:
            raise ValueError("an MLP needs at least one hidden layer")
        if width is not None:
            if int(width) < 1:
                raise ValueError(f"width must be at least 1, got {width}")
            hidden = [int(width)] * len(hidden)
        self.flatten = nn.Flatten()
        fan_in = math.prod(input_shape)
        for i, h in enumerate(hidden):
            layers: list[nn.Module] = [nn.Linear(fan_in, h), nn.ReLU(inplace=False)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            self.add_module(f"block{i + 1}", nn.Sequential(*layers))
            fan_in = h
        self.fc = nn.Linear(fan_in, num_classes)
        self.n_blocks = len(hidden)
        set_layout(self, [f"block{i + 1}" for i in range(len(hidden))], f"block{len(hidden)}")

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        for i in range(self.n_blocks):
            x = getattr(self, f"block{i + 1}")(x)
        return self.fc(x)


class ConvNet2d(nn.Module):
    """Small 2-D CNN for small images (8x8 digits, 28x28 MNIST): conv-BN-ReLU stages, pooling between."""

    def __init__(
        self, num_classes: int, input_shape: tuple[int, ...], widths: list[int] | tuple[int, ...] = (32, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"a 2-D CNN needs inputs of shape (channels, height, width), got {tuple(input_shape)}")
        c = input_shape[0]
        for i, w in enumerate(widths):
            layers: list[nn.Module] = [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
            c = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)
        self.n_stages = len(widths)
        set_layout(self, [f"stage{i + 1}" for i in range(len(widths))], "flatten")

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.n_stages):
            x = getattr(self, f"stage{i + 1}")(x)
        return self.fc(self.dropout(self.flatten(self.pool(x))))


# -- registrations ---------------------------------------------------------------------------------
register_model("mnist1d_cnn", "mnist1d", (1, 40), "MNIST-1D CNN teacher (Greydanus 2020), 3x25 channels")(ConvNet1d)
register_model(
    "mnist1d_cnn_wide", "mnist1d", (1, 40), "wide MNIST-1D CNN teacher, 3x128 channels", channels=128
)(ConvNet1d)
register_model("mnist1d_cnn_small", "mnist1d", (1, 40), "small MNIST-1D CNN student, 3x8 channels", channels=8)(
    ConvNet1d
)
register_model("mnist1d_mlp", "mnist1d", (1, 40),
               "MNIST-1D MLP student, 2x100 hidden (Greydanus 2020); option width: N for 2xN")(MLP)
register_model("mlp", "any", (1, 40), "MLP on flattened inputs; option hidden: [sizes]")(MLP)
register_model("small_cnn", "image", (1, 8, 8), "small 2-D CNN for small images; option widths: [channels]")(ConvNet2d)
register_model("digits_cnn", "image", (1, 8, 8), "2-D CNN teacher for 8x8 digits, 32/64 channels")(ConvNet2d)
register_model("digits_mlp", "any", (1, 8, 8), "MLP student for 8x8 digits, 1x32 hidden", hidden=(32,))(MLP)
# Tiny models for tests: in the real registry so every test can parametrize over all models.
register_model("test_mlp", "test", (1, 16), "tiny MLP for tests", hidden=(8, 8))(MLP)
register_model("test_cnn1d", "test", (1, 16), "tiny 1-D CNN for tests", channels=4, depth=2)(ConvNet1d)
