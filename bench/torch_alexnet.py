"""The paper's two-tower AlexNet written independently in PyTorch, for the benchmark's
comparisons, and the copy of a `keras_alexnet.AlexNet`'s weights into it.

The network is `keras_alexnet.model`'s function layer for layer, in PyTorch's own idiom
(NCHW maps, grouped convolutions, ``nn.LocalResponseNorm``)::

    conv1 Conv2d(3, 96, 11, stride 4)            ReLU  LRN per tower  MaxPool(3, 2)
    conv2 Conv2d(96, 256, 5, padding 2, groups)  ReLU  LRN per tower  MaxPool(3, 2)
    conv3 Conv2d(256, 384, 3, padding 1)         ReLU       (reads both towers)
    conv4 Conv2d(384, 384, 3, padding 1, groups) ReLU
    conv5 Conv2d(384, 256, 3, padding 1, groups) ReLU  MaxPool(3, 2)
    fc6 Linear(256*6*6, 4096) ReLU Dropout   fc7 Linear(4096, 4096) ReLU Dropout   fc8

``groups`` is the number of towers (2 in the paper): a grouped convolution feeds input
channels ``[:C/2]`` to output channels ``[:F/2]``, as the Keras towers do.

LRN: the paper's ``b_i = a_i / (k + alpha * sum_j a_j^2)^beta`` over ``n`` channels;
``nn.LocalResponseNorm(size, alpha, beta, k)`` divides its ``alpha`` by ``size`` (it
averages the squares, zero-padding the window at the edges), so the paper's
``(n=5, alpha=1e-4, beta=0.75, k=2)`` is ``LocalResponseNorm(5, alpha=5e-4, beta=0.75,
k=2.0)``. Each tower normalises its own channels, as on the paper's two GPUs and in
`keras_alexnet` (a window never reaches into the other tower): the NCHW maps are viewed
as ``(N * towers, C / towers, H, W)`` around the LRN.

`state_from_keras` turns the Keras model's tower weights into this module's state dict
(kernels HWIO -> OIHW, towers concatenated along the output channels, fc6's inputs
re-ordered from Keras' per-tower ``(h, w, c)`` flattening to PyTorch's ``(c, h, w)``),
so both frameworks compute the same function on the same weights
(tests/test_bench.py checks it under both oneDNN settings).

Imports only torch and numpy; the Keras model is handed in.
"""

import numpy as np
import torch
from torch import nn

CONV = ("conv1", "conv2", "conv3", "conv4", "conv5")
DENSE = ("fc6", "fc7", "fc8")
GROUPED = ("conv2", "conv4", "conv5")  # the convolutions that see only their own tower


class TowerLRN(nn.Module):
    """``nn.LocalResponseNorm`` applied to each tower's channels separately.

    ``alpha`` is the paper's (multiplying the plain sum); PyTorch's module gets
    ``alpha * size``.
    """

    def __init__(self, towers, size=5, alpha=1e-4, beta=0.75, k=2.0):
        super().__init__()
        self.towers = towers
        self.norm = nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=k)

    def forward(self, x):
        n, c, h, w = x.shape
        return self.norm(x.reshape(n * self.towers, c // self.towers, h, w)).reshape(n, c, h, w)


class AlexNet(nn.Module):
    """AlexNet with ``towers`` (1 or 2) towers; widths are totals over the towers.

    Args:
        num_classes: outputs of fc8.
        image_size: side of the square input (pool5's side follows from it).
        conv_filters: conv1..conv5 output channels.
        fc_units: fc6 and fc7 units.
        towers: 2 for the paper's grouped layers and per-tower LRN.
        lrn: ``(size, alpha, beta, k)`` in the paper's convention, or ``None`` for none.
        dropout: dropout rate after fc6 and fc7.
    """

    def __init__(self, num_classes=1000, image_size=227, conv_filters=(96, 256, 384, 384, 256),
                 fc_units=(4096, 4096), towers=2, lrn=(5, 1e-4, 0.75, 2.0), dropout=0.5):
        super().__init__()
        f1, f2, f3, f4, f5 = conv_filters
        self.conv1 = nn.Conv2d(3, f1, 11, stride=4)
        self.conv2 = nn.Conv2d(f1, f2, 5, padding=2, groups=towers)
        self.conv3 = nn.Conv2d(f2, f3, 3, padding=1)
        self.conv4 = nn.Conv2d(f3, f4, 3, padding=1, groups=towers)
        self.conv5 = nn.Conv2d(f4, f5, 3, padding=1, groups=towers)
        self.norm1 = TowerLRN(towers, *lrn) if lrn else nn.Identity()
        self.norm2 = TowerLRN(towers, *lrn) if lrn else nn.Identity()
        self.pool = nn.MaxPool2d(3, 2)
        side = (image_size - 11) // 4 + 1  # conv1: valid 11x11/4; conv2-conv5 keep the size
        for _ in range(3):  # pool1, pool2, pool5: 3x3/2, floor
            side = (side - 3) // 2 + 1
        self.pool5_side = side
        self.fc6 = nn.Linear(f5 * side * side, fc_units[0])
        self.fc7 = nn.Linear(fc_units[0], fc_units[1])
        self.fc8 = nn.Linear(fc_units[1], num_classes)
        self.drop = nn.Dropout(dropout)
        self.relu = nn.ReLU()

    def forward(self, x):
        """Logits of NCHW images ``x``."""
        x = self.pool(self.norm1(self.relu(self.conv1(x))))
        x = self.pool(self.norm2(self.relu(self.conv2(x))))
        x = self.relu(self.conv3(x))
        x = self.relu(self.conv4(x))
        x = self.pool(self.relu(self.conv5(x)))
        x = torch.flatten(x, 1)
        x = self.drop(self.relu(self.fc6(x)))
        x = self.drop(self.relu(self.fc7(x)))
        return self.fc8(x)


def _suffixes(towers):
    return ("",) if towers == 1 else ("_a", "_b")


def arch_from_keras(model):
    """The `AlexNet` constructor arguments matching a `keras_alexnet.AlexNet`.

    Raises:
        ValueError: for variants this module does not write (LRN across towers, tanh,
            input scaling, conv1 padding, adaptive pooling, other pooling).
    """
    unsupported = {
        "lrn_across_towers": model.lrn_across_towers, "activation": model.activation,
        "input_scale": model.input_scale, "conv1_padding": model.conv1_padding,
        "adaptive_pool": model.adaptive_pool, "pool": (model.pool_size, model.pool_stride)}
    expected = {"lrn_across_towers": False, "activation": "relu", "input_scale": None,
                "conv1_padding": 0, "adaptive_pool": None, "pool": (3, 2)}
    different = {k: v for k, v in unsupported.items() if v != expected[k]}
    if different:
        raise ValueError(
            f"bench.torch_alexnet writes the paper's network only. Received: {different}")
    towers = model.towers
    suffixes = _suffixes(towers)

    def total(name, attr):
        return int(sum(getattr(model.get_layer(name + s), attr) for s in suffixes))

    return dict(
        num_classes=int(model.num_classes), image_size=int(model.image_size),
        conv_filters=[total(name, "filters") for name in CONV],
        fc_units=[total(name, "units") for name in ("fc6", "fc7")], towers=towers,
        lrn=[5, model.lrn_alpha, model.lrn_beta, model.lrn_bias] if model.use_lrn else None,
        dropout=float(model.dropout_rate))


def state_from_keras(model):
    """``{name: float32 array}``: the `AlexNet` state dict holding ``model``'s weights.

    Each tower's kernels are concatenated along the output channels (tower a first, the
    order of Keras' concatenations and of PyTorch's groups); fc6's rows are re-ordered
    from the per-tower ``(h, w, c)`` flattening to PyTorch's ``(c, h, w)``.
    """
    import keras

    towers = model.towers
    suffixes = _suffixes(towers)

    def weights(name):
        layers = [model.get_layer(name + s) for s in suffixes]
        kernel = np.concatenate([keras.ops.convert_to_numpy(x.kernel) for x in layers], -1)
        bias = np.concatenate([keras.ops.convert_to_numpy(x.bias) for x in layers], -1)
        return kernel.astype(np.float32), bias.astype(np.float32)

    state = {}
    for name in CONV:
        kernel, bias = weights(name)
        state[f"{name}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        state[f"{name}.bias"] = bias
    for name in DENSE:
        kernel, bias = weights(name) if name != "fc8" else (
            keras.ops.convert_to_numpy(model.get_layer("fc8").kernel).astype(np.float32),
            keras.ops.convert_to_numpy(model.get_layer("fc8").bias).astype(np.float32))
        if name == "fc6":
            pool5 = model.get_layer("pool5" + suffixes[0]).output.shape  # (N, P, P, C/towers)
            side, per_tower = int(pool5[1]), int(pool5[3])
            # Keras row of PyTorch input (c, h, w): tower c // per_tower, then (h, w, c').
            c, h, w = np.meshgrid(np.arange(per_tower * towers), np.arange(side),
                                  np.arange(side), indexing="ij")
            rows = ((c // per_tower) * side * side * per_tower
                    + (h * side + w) * per_tower + c % per_tower)
            kernel = kernel[rows.ravel()]
        state[f"{name}.weight"] = np.ascontiguousarray(kernel.T)
        state[f"{name}.bias"] = bias
    return state


def from_keras(model):
    """An `AlexNet` (eval mode) with ``model``'s weights."""
    net = AlexNet(**arch_from_keras(model))
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state_from_keras(model).items()})
    return net.eval()
