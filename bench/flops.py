"""FLOPs of a Keras model from its layers' actual shapes (at whatever size and width).

Counts the multiply-adds of every ``Conv2D`` and ``Dense`` layer, 2 FLOP each (bias,
ReLU, LRN and pooling, about 0.5 % more for AlexNet, are left out), as the reference's
table does: the paper's model at 227x227 is 724.4 M MAC = 1.449 GFLOP forward per image.
A training step costs about 3x the forward pass (the forward, the gradient with respect
to the activations and with respect to the weights): `TRAIN_FACTOR`.
"""

import keras

TRAIN_FACTOR = 3


def layer_macs(layer):
    """Multiply-adds per image of one ``Conv2D`` or ``Dense`` layer (0 for other layers).

    A convolution's output element reads ``kh * kw * in_channels / groups`` inputs.
    """
    if isinstance(layer, keras.layers.Conv2D):
        _, height, width, channels = layer.output.shape
        kh, kw = layer.kernel_size
        in_channels = layer.input.shape[-1] // layer.groups
        return int(height) * int(width) * int(channels) * kh * kw * int(in_channels)
    if isinstance(layer, keras.layers.Dense):
        return int(layer.input.shape[-1]) * int(layer.units)
    return 0


def forward_macs(model):
    """``{layer name: multiply-adds per image}`` of every layer with any."""
    macs = {layer.name: layer_macs(layer) for layer in model.layers}
    return {name: value for name, value in macs.items() if value}


def forward_flops(model):
    """FLOP of one image's forward pass (2 per multiply-add)."""
    return 2 * sum(forward_macs(model).values())


def train_flops(model):
    """FLOP of one image's training step: `TRAIN_FACTOR` forward passes."""
    return TRAIN_FACTOR * forward_flops(model)
