"""The trainable tensors of whole models, generated from their architectures (no framework, no weights).

A model here is its variables' names and float32 shapes, in the order a framework creates them: conv
kernels HWIO (TensorFlow's layout), batch-norm gamma and beta (their moving statistics are not trainable and
not pushed), dense kernels (in, out) and biases.

- `resnet50`: ResNet-50 v1 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1:
  a 7x7/64 stem, then [3, 4, 6, 3] bottleneck blocks of 1x1, 3x3, 1x1 convolutions with widths 64, 128,
  256, 512 and expansion 4, a projection shortcut in each stage's first block, a 1000-way fc layer), as
  torchvision and TF's official models build it: convolutions without bias, each followed by batch norm.
  53 convolutions + 53 x (gamma, beta) + fc kernel and bias = 161 tensors, 25,557,032 parameters (the
  `num_params` torchvision's ResNet50_Weights documents), 102.2 MB of float32. Keras's ResNet50 gives its
  convolutions biases as well (214 tensors, 25.6 M parameters); the bytes differ by 0.1 %.
- `small_cnn`: a VGG-style CIFAR-10 network of our own: four stages of three 3x3 conv + batch norm
  (32, 64, 128, 128 channels), global average pooling, a 256-unit dense layer and a 10-way one:
  12 x 3 + 2 x 2 = 40 tensors, 960,170 parameters, 3.8 MB.
- `tiny_cnn`: `small_cnn`'s 40 tensors at 4, 8, 8, 8 channels (a few KiB), for the quick smoke profile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Model:
    name: str  # the key of MODELS and the variables' prefix
    title: str  # for the report
    shapes: dict[str, Shape]  # variable name (without the prefix) -> float32 shape, in creation order

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def nbytes(self) -> int:
        return 4 * self.parameters


def _conv_bn(shapes: dict[str, Shape], name: str, size: int, cin: int, cout: int) -> None:
    shapes[f"{name}_conv/kernel"] = (size, size, cin, cout)
    shapes[f"{name}_bn/gamma"] = (cout,)
    shapes[f"{name}_bn/beta"] = (cout,)


def _dense(shapes: dict[str, Shape], name: str, cin: int, cout: int) -> None:
    shapes[f"{name}/kernel"] = (cin, cout)
    shapes[f"{name}/bias"] = (cout,)


def resnet50() -> Model:
    """Keras's layer names (conv2_block1_1_conv, ...), torchvision's variables (no conv bias)."""
    shapes: dict[str, Shape] = {}
    _conv_bn(shapes, "conv1", 7, 3, 64)
    cin = 64
    for stage, (blocks, width) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)), start=2):
        for block in range(1, blocks + 1):
            prefix = f"conv{stage}_block{block}"
            if block == 1:
                _conv_bn(shapes, f"{prefix}_0", 1, cin, 4 * width)  # projection shortcut
            _conv_bn(shapes, f"{prefix}_1", 1, cin, width)
            _conv_bn(shapes, f"{prefix}_2", 3, width, width)
            _conv_bn(shapes, f"{prefix}_3", 1, width, 4 * width)
            cin = 4 * width
    _dense(shapes, "predictions", cin, 1000)
    return Model("resnet50", "ResNet-50", shapes)


def _cnn(name: str, title: str, widths: tuple[int, int, int, int]) -> Model:
    shapes: dict[str, Shape] = {}
    cin = 3
    for stage, width in enumerate(widths, start=1):
        for layer in range(1, 4):
            _conv_bn(shapes, f"block{stage}_{layer}", 3, cin, width)
            cin = width
    _dense(shapes, "dense", cin, 256)
    _dense(shapes, "predictions", 256, 10)
    return Model(name, title, shapes)


def small_cnn() -> Model:
    return _cnn("small_cnn", "small CNN", (32, 64, 128, 128))


def tiny_cnn() -> Model:
    return _cnn("tiny_cnn", "tiny CNN", (4, 8, 8, 8))


MODELS: dict[str, Callable[[], Model]] = {"resnet50": resnet50, "small_cnn": small_cnn, "tiny_cnn": tiny_cnn}
