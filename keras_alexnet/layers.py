"""Custom layers: the paper's Local Response Normalization."""

import keras
import tensorflow as tf

from keras_alexnet import paper


@keras.saving.register_keras_serializable(package="keras_alexnet")
class LocalResponseNormalization(keras.layers.Layer):
    """Cross-channel Local Response Normalization (Krizhevsky et al., 2012, Sec. 3.3).

    For channel ``i`` of ``N`` at every spatial position::

        b_i = a_i / (k + alpha * sum_{j = max(0, i - n//2)}^{min(N - 1, i + n//2)} a_j**2) ** beta

    ``alpha`` multiplies the *plain sum* over the window, as in the paper and in
    ``tf.nn.local_response_normalization`` (with ``depth_radius = n // 2``). PyTorch's
    ``LocalResponseNorm`` and Caffe's ``LRN`` divide the sum by ``n`` instead, so their
    ``alpha`` is ``n`` times ours: the paper's setting is ``(n=5, k=2, alpha=1e-4,
    beta=0.75)`` here and ``size=5, k=2, alpha=5e-4, beta=0.75`` in PyTorch/Caffe. Windows
    are truncated at the first and last channel (no padding channels are counted).

    The layer computes in float32 by default, also under a mixed-precision policy
    (``a**2`` summed over the window overflows float16 for activations above ~100);
    Keras casts float16/bfloat16 inputs up and the next layer casts the output back.

    Args:
        size: odd window width ``n`` in channels. Defaults to 5.
        bias: ``k``. Defaults to 2.0.
        alpha: ``alpha``, multiplying the plain sum. Defaults to 1e-4.
        beta: ``beta``. Defaults to 0.75.
        **kwargs: standard layer arguments (``name``, ``dtype``, ...).

    Example:
        >>> x = keras.random.uniform((2, 13, 13, 96))
        >>> LocalResponseNormalization()(x).shape
        TensorShape([2, 13, 13, 96])
    """

    def __init__(
        self,
        size=paper.LRN_SIZE,
        bias=paper.LRN_BIAS,
        alpha=paper.LRN_ALPHA,
        beta=paper.LRN_BETA,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(
                f"`size` must be a positive odd integer (the paper's n). Received: size={size!r}"
            )
        if bias <= 0:
            raise ValueError(f"`bias` (the paper's k) must be positive. Received: bias={bias!r}")
        self.size = size
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs):
        return tf.nn.local_response_normalization(
            inputs,
            depth_radius=self.size // 2,
            bias=self.bias,
            alpha=self.alpha,
            beta=self.beta,
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "size": self.size,
            "bias": self.bias,
            "alpha": self.alpha,
            "beta": self.beta,
        }


@keras.saving.register_keras_serializable(package="keras_alexnet")
class AdaptiveAveragePooling2D(keras.layers.Layer):
    """Average pooling to a fixed ``output_size x output_size`` grid, as PyTorch's
    ``AdaptiveAvgPool2d`` (torchvision's AlexNet ends its features with one, 6x6).

    Output cell ``(i, j)`` of an ``H x W`` input averages rows
    ``floor(i H / s) .. ceil((i + 1) H / s) - 1`` and the same columns of ``W``, so the
    bins may overlap and are all non-empty for any ``H, W >= 1``. When ``H == W == s``
    (torchvision's 224-pixel input: pool5 is 6x6) it is the identity. Needs static
    spatial dimensions (the bins are computed when the graph is built).

    Args:
        output_size: side ``s`` of the output grid. Defaults to 6.
    """

    def __init__(self, output_size=6, **kwargs):
        super().__init__(**kwargs)
        if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 1:
            raise ValueError(
                f"`output_size` must be a positive integer. Received: {output_size!r}")
        self.output_size = output_size

    @staticmethod
    def _bins(length, size):
        return [((i * length) // size, -((-(i + 1) * length) // size)) for i in range(size)]

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]
        if height is None or width is None:
            raise ValueError("AdaptiveAveragePooling2D needs static spatial dimensions; "
                             f"received input shape {inputs.shape}.")
        if height == width == self.output_size:
            return inputs
        rows = []
        for top, bottom in self._bins(height, self.output_size):
            cells = [tf.reduce_mean(inputs[:, top:bottom, left:right, :], axis=(1, 2))
                     for left, right in self._bins(width, self.output_size)]
            rows.append(tf.stack(cells, axis=1))
        return tf.stack(rows, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_size, self.output_size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "output_size": self.output_size}
