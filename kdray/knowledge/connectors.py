"""Learned connectors from a student tap's shape to a teacher tap's: FitNets' regressors (a 1x1 convolution or a
linear map, and RepDistiller's conv-BN-ReLU ``ConvReg``), which other hint losses build on."""
from __future__ import annotations

import math

from torch import Tensor, nn

from kdray.knowledge.tensors import resize_to


class Regressor(nn.Module):
    """FitNets' learned regressor r(·) from a student feature shape to a teacher feature shape.

    Same rank and spatial maps: a 1x1 convolution (Conv1d/Conv2d/Conv3d) changes the channel count, then
    adaptive pooling matches the spatial size. Vectors: a linear layer. Ranks that differ (an MLP
    student against a CNN teacher): flatten, linear, reshape to the teacher's shape.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) == len(t) and 2 <= len(s) <= 4:
            conv = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}[len(s)]
            self.kind = "conv1x1"
            self.proj: nn.Module = conv(s[0], t[0], kernel_size=1)
        elif len(s) == len(t) == 1:
            self.kind = "linear"
            self.proj = nn.Linear(s[0], t[0])
        else:
            self.kind = "flatten-linear"
            self.proj = nn.Linear(math.prod(s), math.prod(t))

    def forward(self, f_s: Tensor) -> Tensor:
        """(B, *student shape) tap -> (B, *teacher shape)."""
        if self.kind == "conv1x1":
            return resize_to(self.proj(f_s), self.teacher_shape[1:])
        if self.kind == "linear":
            return self.proj(f_s)
        return self.proj(f_s.flatten(1)).view(f_s.shape[0], *self.teacher_shape)

    def describe(self) -> str:
        return {"conv1x1": "conv 1x1, then pooling", "linear": "linear"}.get(self.kind, "flatten, linear")


class ConvRegressor(nn.Module):
    """RepDistiller's FitNets regressor ``ConvReg`` (``models/util.py``): a convolution, BatchNorm, ReLU.

    The convolution follows RepDistiller's rule for the spatial sizes: student twice the teacher's size, a 3x3
    convolution with stride 2; half of it, a 4x4 transposed convolution with stride 2; otherwise larger or
    equal, a convolution of kernel ``1 + s - t`` (1x1 for equal sizes). Any other pair (a student map smaller
    than the teacher's but not half of it) is refused: RepDistiller raises too. 1-D and 3-D maps take the same
    rule with Conv1d / Conv3d (RepDistiller has only 2-D).
    """

    kind = "conv_bn_relu"

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) != len(t) or not 2 <= len(s) <= 4:
            raise ValueError(f"the conv_bn_relu regressor needs feature maps of one rank, got {describe_shape(s)} and "
                             f"{describe_shape(t)}")
        rank = len(s) - 1
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        deconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[rank]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
        ss, ts = s[1:], t[1:]
        if all(a == 2 * b for a, b in zip(ss, ts)):
            layer: nn.Module = conv(s[0], t[0], kernel_size=3, stride=2, padding=1)
            self.conv_kind = "conv 3x3 stride 2"
        elif all(2 * a == b for a, b in zip(ss, ts)):
            layer = deconv(s[0], t[0], kernel_size=4, stride=2, padding=1)
            self.conv_kind = "transposed conv 4x4 stride 2"
        elif all(a >= b for a, b in zip(ss, ts)):
            kernel = tuple(1 + a - b for a, b in zip(ss, ts))
            layer = conv(s[0], t[0], kernel_size=kernel)
            self.conv_kind = f"conv {'x'.join(map(str, kernel))}"
        else:
            raise ValueError(f"RepDistiller's rule maps a student map larger than, equal to or half the teacher's "
                             f"size, not {describe_shape(s)} to {describe_shape(t)}; use `regressor: linear` "
                             "(a 1x1 convolution, "
                             "then adaptive pooling to the teacher's size)")
        self.proj = nn.Sequential(layer, bn(t[0]), nn.ReLU())

    def describe(self) -> str:
        return self.conv_kind

    def forward(self, f_s: Tensor) -> Tensor:
        """(B, C_s, *spatial) tap -> (B, C_t, *spatial)."""
        return self.proj(f_s)


def describe_shape(shape: tuple[int, ...]) -> str:
    """(C, H, W) as "C channels, HxW"."""
    if len(shape) == 1:
        return f"{shape[0]} features"
    return f"{shape[0]} channels, {'x'.join(map(str, shape[1:]))}"


REGRESSORS = ("auto", "conv_bn_relu", "linear")


def make_regressor(kind: str, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """FitNets' regressor: ``conv_bn_relu`` (:class:`ConvRegressor`), ``linear`` (:class:`Regressor`), or
    ``auto``: conv_bn_relu between image maps (C, H, W) on both sides, linear for everything else (vectors,
    1-D maps, token sequences (hidden, tokens), an MLP against a CNN)."""
    if kind == "auto":
        kind = "conv_bn_relu" if len(student_shape) == len(teacher_shape) == 3 else "linear"
    if kind == "conv_bn_relu":
        return ConvRegressor(student_shape, teacher_shape)
    if kind == "linear":
        return Regressor(student_shape, teacher_shape)
    raise ValueError(f"unknown regressor {kind!r}; choose one of {', '.join(REGRESSORS)}")
