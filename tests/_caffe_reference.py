"""An independent float64 NumPy forward pass of Caffe's bvlc_alexnet, with Caffe's semantics.

Written from Caffe's layer definitions, not from the converter: NCHW blobs, weights as
Caffe stores them (``(O, I / group, kh, kw)`` convolutions, ``(O, I)`` inner products),
grouped convolutions by slicing the input channels and the filters into ``group``
equal parts, ReLU, cross-channel LRN over the whole blob (``scale = k + alpha / n *
sum`` over the ``n`` channels centred on each, zero-padded at the ends, ``out = x *
scale ** -beta``), MAX pooling with Caffe's ceil rounding of the output size, and fc6 on
the C, H, W flatten of pool5. Input pixels are BGR, as Caffe's were.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def convolution(x, weight, bias, *, stride=1, pad=0, group=1):
    """Caffe's ``Convolution``: ``x`` ``(N, C, H, W)``, ``weight`` ``(O, C / group, k, k)``."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = weight.shape[-1]
    # (N, C, H', W', k, k) patches taken every `stride` pixels
    patches = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    n, _, oh, ow = patches.shape[:4]
    cin, cout = x.shape[1] // group, weight.shape[0] // group
    outputs = []
    for g in range(group):
        p = patches[:, g * cin:(g + 1) * cin].transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)
        w = weight[g * cout:(g + 1) * cout].reshape(cout, -1)
        outputs.append((p @ w.T).reshape(n, oh, ow, cout).transpose(0, 3, 1, 2))
    return np.concatenate(outputs, axis=1) + bias[None, :, None, None]


def relu(x):
    return np.maximum(x, 0.0)


def lrn(x, *, local_size, alpha, beta, k):
    """Caffe's ``LRN`` ACROSS_CHANNELS over all of ``x``'s channels."""
    half = (local_size - 1) // 2
    squares = np.pad(x * x, ((0, 0), (half, half), (0, 0), (0, 0)))
    window = sum(squares[:, i:i + x.shape[1]] for i in range(local_size))
    return x * (k + alpha / local_size * window) ** -beta


def max_pool(x, *, kernel=3, stride=2):
    """Caffe's MAX ``Pooling`` without padding: ``ceil((H - kernel) / stride) + 1`` outputs,
    the last windows clipped at the border."""
    n, c, h, w = x.shape
    oh = -(-(h - kernel) // stride) + 1
    ow = -(-(w - kernel) // stride) + 1
    out = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * stride:min(i * stride + kernel, h),
                                j * stride:min(j * stride + kernel, w)].max(axis=(2, 3))
    return out


def forward(blobs, bgr, *, lrn_params):
    """Logits of bvlc_alexnet for ``bgr`` pixels ``(N, 3, 227, 227)`` (mean subtracted).

    ``blobs`` maps ``conv1``..``fc8`` to ``(weight, bias)`` float arrays in Caffe's
    shapes; ``lrn_params`` is ``dict(local_size=, alpha=, beta=, k=)`` as in the prototxt.
    Computes in float64.
    """
    b = {name: (np.asarray(w, np.float64), np.asarray(c, np.float64).reshape(-1))
         for name, (w, c) in blobs.items()}
    x = np.asarray(bgr, np.float64)
    x = relu(convolution(x, *b["conv1"], stride=4))
    x = max_pool(lrn(x, **lrn_params))
    x = relu(convolution(x, *b["conv2"], pad=2, group=2))
    x = max_pool(lrn(x, **lrn_params))
    x = relu(convolution(x, *b["conv3"], pad=1))
    x = relu(convolution(x, *b["conv4"], pad=1, group=2))
    x = relu(convolution(x, *b["conv5"], pad=1, group=2))
    x = max_pool(x).reshape(x.shape[0], -1)  # C, H, W order
    for name in ("fc6", "fc7", "fc8"):
        weight, bias = b[name]
        x = x @ weight.reshape(weight.shape[-2], weight.shape[-1]).T + bias
        if name != "fc8":
            x = relu(x)
    return x


# bvlc_alexnet's parametrised layers and Caffe's (weight, bias) shapes for 1000 classes,
# written out from models/bvlc_alexnet/deploy.prototxt (not taken from the converter).
BLOB_SHAPES = {
    "conv1": ((96, 3, 11, 11), (96,)),
    "conv2": ((256, 48, 5, 5), (256,)),
    "conv3": ((384, 256, 3, 3), (384,)),
    "conv4": ((384, 192, 3, 3), (384,)),
    "conv5": ((256, 192, 3, 3), (256,)),
    "fc6": ((4096, 9216), (4096,)),
    "fc7": ((4096, 4096), (4096,)),
    "fc8": ((1000, 4096), (1000,)),
}


def random_blobs(seed):
    """Random float32 bvlc_alexnet blobs: He-scaled weights (std sqrt(2 / fan_in), so the
    activations keep their scale and about half the ReLUs fire), fc8 scaled down to give
    logits of a few units on pixels of std ~50, biases N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for name, (weight_shape, bias_shape) in BLOB_SHAPES.items():
        std = np.sqrt(2.0 / np.prod(weight_shape[1:])) * (0.05 if name == "fc8" else 1.0)
        blobs[name] = (rng.standard_normal(weight_shape, dtype=np.float32) * np.float32(std),
                       rng.standard_normal(bias_shape, dtype=np.float32) * np.float32(0.1))
    return blobs


def random_pixels(seed, batch=2):
    """Mean-subtracted RGB test pixels ``(batch, 227, 227, 3)``, float32, std 50."""
    return np.random.default_rng(seed).normal(0.0, 50.0, (batch, 227, 227, 3)).astype(np.float32)
