"""AlexNet as a Keras functional model with the paper's two towers.

The two GPUs of the paper are written as explicit parallel branches ("towers"): each
tower owns half of every layer's filters, the branches are concatenated only where
the paper lets the towers talk (the inputs of conv3, fc6, fc7 and fc8). This is the
same function as ``Conv2D(groups=2)`` on conv2/conv4/conv5, but Keras compiles grouped
convolutions through XLA on the TensorFlow backend (about 3.5x slower on CPU, and
XLA-only functions in the SavedModel); separate layers are also what device-scoped
model parallelism needs (one set of variables per device).

Layer names are an API: ``images``, ``conv1``..``conv5``, ``norm1``, ``norm2``,
``pool1``, ``pool2``, ``pool5``, ``fc6``..``fc8``, ``drop6``, ``drop7``, with a tower
suffix ``_a`` / ``_b`` on every per-tower layer (``conv1_a``, ``fc6_b``, ...).

Model parallelism as in the paper: ``tower_devices=("/gpu:0", "/gpu:1")`` puts every
tower-A layer (variables and ops) on the first device and every tower-B layer on the
second; the layers that join the towers run on the first. Placement belongs to the machine
that runs the model, not to its configuration: ``get_config()`` leaves it out, so a saved,
cloned or exported model is unplaced. See `AlexNet`.

The graph is built in `AlexNet.__init__` from the block helpers below (`conv_block`,
`dense_block`, `norm_pool`, `lower_tower`, `upper_tower`, `merge`); each takes the tower
``suffix`` (``""``, ``"_a"`` or ``"_b"``) and the tower's device explicitly.
"""

import contextlib
import itertools

import keras
import tensorflow as tf

from keras_alexnet import paper
from keras_alexnet.layers import AdaptiveAveragePooling2D, LocalResponseNormalization

INITIALIZERS = ("paper", "he", "glorot")
ACTIVATIONS = ("relu", "tanh")  # Sec. 3.1, Figure 1: ReLU against the saturating tanh

VARIANTS = {
    # The paper's network: 60,965,224 parameters at 227x227 with 1000 classes.
    "krizhevsky2012": dict(towers=2, use_lrn=True),
    # Same widths in one branch (the half-width-per-GPU split removed): 62,378,344.
    "single_tower": dict(towers=1, use_lrn=True),
    # Caffe's bvlc_alexnet: the paper's two towers with Caffe's LRN constants (k = 1,
    # alpha 1e-4 divided by n), normalising across both towers' channels as Caffe's
    # single norm1/norm2 layers do; the layout the Caffe converter fills (60,965,224).
    "caffe": dict(towers=2, use_lrn=True, lrn_bias=paper.CAFFE_LRN_BIAS,
                  lrn_alpha=paper.CAFFE_LRN_ALPHA, lrn_across_towers=True),
    # torchvision.models.alexnet: one tower of 64-192-384-256-256, conv1 padded by 2, no
    # LRN, adaptive 6x6 average pooling, 224 inputs scaled by 1 / (255 std) per channel
    # after the (0-255) mean subtraction: 61,100,840 parameters.
    "torchvision": dict(
        towers=1, use_lrn=False, conv_filters=paper.TORCHVISION_CONV_FILTERS,
        conv1_padding=2, adaptive_pool=6, image_size=paper.TORCHVISION_IMAGE_SIZE,
        input_scale=[1.0 / (255.0 * std) for std in paper.TORCHVISION_STD]),
}


def _scaled(filters, width, towers):
    """``filters * width`` rounded to a positive multiple of ``towers``."""
    per_tower = max(1, int(round(filters * width / towers)))
    return per_tower * towers


def _kernel_initializer(initializer, seed):
    if initializer == "paper":
        return keras.initializers.RandomNormal(0.0, paper.INIT_STDDEV, seed=seed)
    if initializer == "he":
        return keras.initializers.HeNormal(seed=seed)
    return keras.initializers.GlorotUniform(seed=seed)


def _bias_initializer(initializer, layer):
    if initializer == "paper" and layer in paper.ONE_BIAS_LAYERS:
        return keras.initializers.Constant(1.0)
    return keras.initializers.Zeros()


class _OnDevice:
    """Mixin running a layer's ``call`` inside ``tf.device(self.device)``.

    A device scope around functional-model construction places the variables (they are
    created there) but not the ops, because the graph is re-run at every call; the
    scope has to be opened by the layer itself, in ``call``.
    """

    def __init__(self, *args, device=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = device

    def call(self, inputs):
        with tf.device(self.device):
            return super().call(inputs)

    def get_config(self):
        return {**super().get_config(), "device": self.device}


def _placed(base):
    cls = type(f"Placed{base.__name__}", (_OnDevice, base), {
        "__doc__": f"`{base.__name__}` whose ops run on a fixed ``device`` (tower placement)."})
    cls.__module__ = __name__
    return keras.saving.register_keras_serializable(package="keras_alexnet")(cls)


PlacedConv2D = _placed(keras.layers.Conv2D)
PlacedDense = _placed(keras.layers.Dense)
PlacedMaxPooling2D = _placed(keras.layers.MaxPooling2D)
PlacedFlatten = _placed(keras.layers.Flatten)
PlacedLocalResponseNormalization = _placed(LocalResponseNormalization)


_PLACED = {
    keras.layers.Conv2D: PlacedConv2D,
    keras.layers.Dense: PlacedDense,
    keras.layers.MaxPooling2D: PlacedMaxPooling2D,
    keras.layers.Flatten: PlacedFlatten,
    LocalResponseNormalization: PlacedLocalResponseNormalization,
    AdaptiveAveragePooling2D: _placed(AdaptiveAveragePooling2D),
}


def _device_scope(device):
    return tf.device(device) if device else contextlib.nullcontext()


def _apply(layer_class, x, device, **kwargs):
    """Calls a new ``layer_class(**kwargs)`` on ``x``.

    With a ``device`` the layer is its ``Placed*`` twin, called (hence built: the
    variables are created) inside ``tf.device(device)`` and running its ops there at
    every later call. Without one it is Keras' own class.
    """
    if device is None:
        return layer_class(**kwargs)(x)
    with tf.device(device):
        return _PLACED[layer_class](device=device, **kwargs)(x)


class _WeightSettings:
    """Initializers, regularizer and activation of each new ``Conv2D``/``Dense``, in
    creation order, and the max pooling window and stride of the network.

    A seeded model draws ``seed``, ``seed + 1``, ... for its kernels in the order the
    layers are created (tower A before tower B at each stage), so that it is reproducible;
    ``seed=None`` leaves every initializer unseeded.
    """

    def __init__(self, initializer, seed, weight_decay, activation="relu",
                 pool=(paper.POOL_SIZE, paper.POOL_STRIDE)):
        self.initializer = initializer
        self.activation = activation
        self.pool = pool
        self.seeds = itertools.repeat(None) if seed is None else itertools.count(seed)
        self.regularizer = keras.regularizers.L2(weight_decay / 2.0) if weight_decay else None

    def __call__(self, name):
        """Keyword arguments for the next layer of the paper's layer ``name`` (``"conv2"``)."""
        return dict(
            kernel_initializer=_kernel_initializer(self.initializer, next(self.seeds)),
            bias_initializer=_bias_initializer(self.initializer, name),
            kernel_regularizer=self.regularizer,
        )


def conv_block(x, filters, kernel_size, name, suffix, init, *, strides=1, padding="same",
               device=None):
    """``Conv2D`` + the network's activation (ReLU in the paper) named ``name + suffix``
    (``"conv2" + "_a"``).

    ``init`` (a `_WeightSettings`) gives its initializers, kernel regularizer and
    activation.
    """
    return _apply(keras.layers.Conv2D, x, device, name=name + suffix, filters=filters,
                  kernel_size=kernel_size, strides=strides, padding=padding,
                  activation=init.activation, **init(name))


_NETWORK_ACTIVATION = object()  # dense_block's default: the activation of `init`


def dense_block(x, units, name, suffix, init, *, activation=_NETWORK_ACTIVATION, dtype=None,
                device=None):
    """``Dense`` (with the network's activation unless told otherwise; ``None`` for the
    logits) named ``name + suffix`` (``"fc6" + "_b"``).

    ``init`` (a `_WeightSettings`) gives its initializers and kernel regularizer.
    """
    if activation is _NETWORK_ACTIVATION:
        activation = init.activation
    return _apply(keras.layers.Dense, x, device, name=name + suffix, units=units,
                  activation=activation, dtype=dtype, **init(name))


def max_pool(x, name, suffix, device=None, pool=(paper.POOL_SIZE, paper.POOL_STRIDE)):
    """Max pooling with window and stride ``pool`` (the paper's overlapping 3x3/2; 2x2/2
    is the traditional non-overlapping pooling of Sec. 3.4), named ``name + suffix``."""
    size, stride = pool
    return _apply(keras.layers.MaxPooling2D, x, device, name=name + suffix,
                  pool_size=size, strides=stride)


def norm_pool(x, stage, suffix, *, lrn, device=None, pool=(paper.POOL_SIZE, paper.POOL_STRIDE)):
    """``norm{stage}`` (LRN with the keyword arguments ``lrn``; none when ``lrn`` is
    ``None``) then ``pool{stage}``, on one tower's maps."""
    if lrn is not None:
        x = _apply(LocalResponseNormalization, x, device, name=f"norm{stage}{suffix}", **lrn)
    return max_pool(x, f"pool{stage}", suffix, device, pool)


def lower_tower(x, filters, suffix, init, *, lrn, device=None):
    """conv1 11x11/4 -> norm1 -> pool1 -> conv2 5x5 -> norm2 -> pool2 of one tower.

    ``filters`` are the tower's (conv1, conv2) widths; ``lrn`` the LRN layers' keyword
    arguments, or ``None`` for none. Each tower reads the whole image but normalises and
    convolves only its own maps, as on the paper's two GPUs.
    """
    conv1_filters, conv2_filters = filters
    x = conv_block(x, conv1_filters, 11, "conv1", suffix, init, strides=4,
                   padding="valid", device=device)
    x = norm_pool(x, 1, suffix, lrn=lrn, device=device, pool=init.pool)
    x = conv_block(x, conv2_filters, 5, "conv2", suffix, init, device=device)
    return norm_pool(x, 2, suffix, lrn=lrn, device=device, pool=init.pool)


def norm_across_towers(branches, stage, lrn, device=None):
    """Caffe's ``norm{stage}``: one LRN over both towers' channels (tower a's first, as in
    Caffe's blob), on their concatenation ``cross_norm{stage}``, split back in halves.

    In Caffe's bvlc_alexnet norm1/norm2 normalise the whole 96/256-channel blob, so the
    windows of the channels next to the split (46-49, 126-129) reach into the other
    group; the paper's GPUs normalised each tower alone (`norm_pool`).
    """
    width = int(branches[0].shape[-1])
    with _device_scope(device):
        joined = merge(branches, f"cross_norm{stage}")
        joined = LocalResponseNormalization(name=f"norm{stage}", **lrn)(joined)
        return [joined[..., :width], joined[..., width:]]


def lower_towers_across(x, filters, branches, init, *, lrn):
    """`lower_tower` of both towers with `norm_across_towers` in place of per-tower LRN.

    ``branches`` are the towers' ``(suffix, device)``; the shared LRN runs on the first
    tower's device. Returns the two pool2 outputs.
    """
    conv1_filters, conv2_filters = filters
    first = branches[0][1]
    x = [conv_block(x, conv1_filters, 11, "conv1", s, init, strides=4, padding="valid",
                    device=d) for s, d in branches]
    x = [max_pool(t, "pool1", s, d, init.pool)
         for t, (s, d) in zip(norm_across_towers(x, 1, lrn, first), branches)]
    x = [conv_block(t, conv2_filters, 5, "conv2", s, init, device=d)
         for t, (s, d) in zip(x, branches)]
    return [max_pool(t, "pool2", s, d, init.pool)
            for t, (s, d) in zip(norm_across_towers(x, 2, lrn, first), branches)]


def upper_tower(x, filters, suffix, init, *, adaptive_pool=None, device=None):
    """conv3 -> conv4 -> conv5 (3x3 each) -> pool5 [-> avgpool] -> flatten of one tower.

    ``filters`` are the tower's (conv3, conv4, conv5) widths. ``x`` holds both towers'
    maps (conv3 crosses); conv4 and conv5 read only their own tower's. ``adaptive_pool``
    (torchvision's 6) adds an adaptive average pool named ``avgpool`` after pool5.
    """
    for name, tower_filters in zip(("conv3", "conv4", "conv5"), filters):
        x = conv_block(x, tower_filters, 3, name, suffix, init, device=device)
    x = max_pool(x, "pool5", suffix, device, init.pool)
    if adaptive_pool is not None:
        x = _apply(AdaptiveAveragePooling2D, x, device, name=f"avgpool{suffix}",
                   output_size=adaptive_pool)
    return _apply(keras.layers.Flatten, x, device, name=f"flatten{suffix}")


def merge(branches, name):
    """Joins the towers where the paper crosses GPUs; a no-op for one tower."""
    if len(branches) == 1:
        return branches[0]
    return keras.layers.Concatenate(name=name)(branches)


@keras.saving.register_keras_serializable(package="keras_alexnet")
class AlexNet(keras.Model):
    """AlexNet (Krizhevsky, Sutskever & Hinton, 2012) returning logits.

    Architecture (Fig. 2, Sec. 3): conv1 96@11x11/4 -> ReLU -> LRN -> maxpool 3/2;
    conv2 256@5x5 -> ReLU -> LRN -> maxpool 3/2; conv3 384@3x3; conv4 384@3x3;
    conv5 256@3x3 -> maxpool 3/2; fc6 4096 -> dropout; fc7 4096 -> dropout; fc8 logits.
    All convolutions and fc6/fc7 are followed by ReLU. With two towers each tower has
    half the filters of every layer; conv2, conv4 and conv5 read only their own tower,
    conv3 and fc6-fc8 read both. LRN runs per tower, as on the paper's two GPUs.
    At 227x227 the feature maps are 55, 27, 13, 13, 13 and pool5 is 6x6.

    Args:
        num_classes: size of the output layer. Defaults to 1000.
        image_size: side of the square RGB input, 67 or more (227 in the paper).
        width: multiplier on every layer's width (1.0 = the paper), for small
            test and demo configurations.
        towers: 2 for the paper's two towers, 1 for a single branch.
        use_lrn: whether to apply LRN after conv1 and conv2.
        lrn_bias: LRN's ``k`` (2 in the paper, 1 in Caffe).
        lrn_alpha: LRN's ``alpha``, multiplying the plain sum over the window (1e-4 in
            the paper; Caffe's ``alpha / n`` for Caffe's weights).
        lrn_beta: LRN's ``beta`` (0.75 in the paper and in Caffe).
        lrn_across_towers: with two towers, normalise both towers' channels together
            (Caffe's bvlc_alexnet: its norm1/norm2 see the whole blob) instead of each
            tower alone (the paper's GPUs). The shared LRN layers are ``norm1``/``norm2``.
        conv_filters: the five convolutions' widths at ``width=1`` (the paper's
            96-256-384-384-256; torchvision's 64-192-384-256-256), split evenly between
            the towers.
        conv1_padding: zero padding on each side of the image before conv1, as a
            ``ZeroPadding2D`` named ``conv1_pad`` (0 in the paper, 2 in torchvision).
        adaptive_pool: ``None`` (the paper), or the side of an adaptive average pool
            after pool5 (torchvision's 6), named ``avgpool``.
        activation: ``"relu"`` (the paper) or ``"tanh"`` (the saturating units of
            Figure 1), after every convolution and fc6/fc7.
        pool_size, pool_stride: every max pooling's window and stride (3 and 2: the
            paper's overlapping pooling; 2 and 2: the non-overlapping pooling of
            Sec. 3.4, which gives the same map sizes).
        dropout_rate: dropout on the fc6 and fc7 outputs (0.5 in the paper; 0 for none).
        initializer: ``"paper"`` (weights N(0, 0.01), biases 1 in conv2, conv4,
            conv5, fc6, fc7 and 0 elsewhere), ``"he"`` (He normal, zero biases) or
            ``"glorot"`` (Keras' default: Glorot uniform, zero biases).
        input_scale: optional factor applied to the (mean-subtracted) input pixels by
            a ``Rescaling`` layer named ``input_scale``. ``None`` (the paper) feeds raw
            0-255 mean-subtracted pixels.
        weight_decay: the paper's weight decay ``wd``, added as ``L2(wd / 2)`` on every
            kernel (gradient ``wd * w``) and nothing on biases, so that Keras' SGD
            reproduces ``v <- m v - wd lr w - lr g``. 0 disables it.
        seed: optional seed for the weight initializers.
        tower_devices: optional pair of device names, e.g. ``("/gpu:0", "/gpu:1")``
            or two logical CPUs, for the paper's model parallelism (two towers only).
            Every ``*_a`` layer's variables and ops go to the first device, every
            ``*_b`` layer's to the second; the input scaling, the crossing
            concatenations (``cross3``, ``cross6``, ``cross_fc6``, ``cross_fc7``), the
            dropouts and ``fc8`` run on the first device, which therefore receives tower
            B's activations at each crossing (the paper exchanged them in both
            directions). Per-tower layers are then ``Placed*`` subclasses of the same
            Keras layers, with the same names and weights. ``None`` (the default)
            leaves placement to TensorFlow. Placement is not part of `get_config()`:
            a saved, cloned or ``from_config`` copy is unplaced (pass
            ``tower_devices`` to the constructor again to place it).
        name: model name.
    """

    def __init__(
        self,
        num_classes=paper.NUM_CLASSES,
        image_size=paper.IMAGE_SIZE,
        width=1.0,
        towers=2,
        use_lrn=True,
        lrn_bias=paper.LRN_BIAS,
        lrn_alpha=paper.LRN_ALPHA,
        lrn_beta=paper.LRN_BETA,
        lrn_across_towers=False,
        conv_filters=paper.CONV_FILTERS,
        conv1_padding=0,
        adaptive_pool=None,
        activation="relu",
        pool_size=paper.POOL_SIZE,
        pool_stride=paper.POOL_STRIDE,
        dropout_rate=paper.DROPOUT_RATE,
        initializer="paper",
        input_scale=None,
        weight_decay=0.0,
        seed=None,
        tower_devices=None,
        name="alexnet",
        **kwargs,
    ):
        if towers not in (1, 2):
            raise ValueError(f"`towers` must be 1 or 2. Received: towers={towers!r}")
        if tower_devices is not None:
            tower_devices = tuple(tower_devices)
            if towers != 2 or len(tower_devices) != 2:
                raise ValueError(
                    "`tower_devices` needs two towers and two device names. Received: "
                    f"towers={towers!r}, tower_devices={tower_devices!r}"
                )
        if not isinstance(image_size, int) or image_size < paper.MIN_IMAGE_SIZE:
            raise ValueError(
                f"`image_size` must be an integer >= {paper.MIN_IMAGE_SIZE} (smaller inputs "
                f"leave pool5 empty). Received: image_size={image_size!r}"
            )
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2. Received: {num_classes!r}")
        if not width > 0:
            raise ValueError(f"`width` must be positive. Received: width={width!r}")
        if initializer not in INITIALIZERS:
            raise ValueError(
                f"`initializer` must be one of {INITIALIZERS}. Received: {initializer!r}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {ACTIVATIONS}. Received: {activation!r}")
        for arg, value in (("pool_size", pool_size), ("pool_stride", pool_stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{arg}` must be a positive integer. Received: {value!r}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"`dropout_rate` must be in [0, 1). Received: {dropout_rate!r}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0. Received: {weight_decay!r}")
        conv_filters = tuple(conv_filters)
        if len(conv_filters) != 5 or not all(isinstance(f, int) and f > 0 for f in conv_filters):
            raise ValueError("`conv_filters` must be five positive integers (conv1..conv5). "
                             f"Received: {conv_filters!r}")
        if isinstance(conv1_padding, bool) or not isinstance(conv1_padding, int) \
                or conv1_padding < 0:
            raise ValueError(
                f"`conv1_padding` must be an integer >= 0. Received: {conv1_padding!r}")
        if adaptive_pool is not None and (isinstance(adaptive_pool, bool)
                                          or not isinstance(adaptive_pool, int)
                                          or adaptive_pool < 1):
            raise ValueError(
                f"`adaptive_pool` must be None or a positive integer. Received: {adaptive_pool!r}")
        if isinstance(input_scale, (list, tuple)):
            input_scale = [float(v) for v in input_scale]
            if len(input_scale) != 3:
                raise ValueError("`input_scale` must be a number or three (one per RGB "
                                 f"channel). Received: {input_scale!r}")
        lrn = dict(bias=lrn_bias, alpha=lrn_alpha, beta=lrn_beta) if use_lrn else None

        suffixes = ("",) if towers == 1 else ("_a", "_b")
        branches = list(zip(suffixes, tower_devices or (None,) * towers))  # (suffix, device)
        tower_filters = [_scaled(f, width, towers) // towers for f in conv_filters]
        fc_units = [_scaled(u, width, towers) // towers for u in paper.FC_UNITS]
        init = _WeightSettings(initializer, seed, weight_decay, activation,
                               (pool_size, pool_stride))

        # fc8's variables live on the first tower's device, like the crossing ops.
        with _device_scope(branches[0][1]):
            images = keras.Input(shape=(image_size, image_size, 3), name="images")
            x = images
            if input_scale is not None:
                x = keras.layers.Rescaling(input_scale, name="input_scale")(x)
            if conv1_padding:
                x = keras.layers.ZeroPadding2D(conv1_padding, name="conv1_pad")(x)
            if lrn is not None and towers == 2 and lrn_across_towers:
                lower = lower_towers_across(x, tower_filters[:2], branches, init, lrn=lrn)
            else:
                lower = [lower_tower(x, tower_filters[:2], s, init, lrn=lrn, device=d)
                         for s, d in branches]
            x = merge(lower, "cross3")  # conv3 reads both towers
            upper = [upper_tower(x, tower_filters[2:], s, init, adaptive_pool=adaptive_pool,
                                 device=d) for s, d in branches]
            x = merge(upper, "cross6")  # fc6 reads both towers
            for stage, units in zip((6, 7), fc_units):
                x = merge([dense_block(x, units, f"fc{stage}", s, init, device=d)
                           for s, d in branches], f"cross_fc{stage}")
                x = keras.layers.Dropout(dropout_rate, name=f"drop{stage}")(x)
            # Logits in float32 so that softmax and the loss stay float32 under mixed precision.
            logits = dense_block(x, num_classes, "fc8", "", init, activation=None,
                                 dtype="float32")

        super().__init__(inputs=images, outputs=logits, name=name, **kwargs)
        self.num_classes = num_classes
        self.image_size = image_size
        self.width = width
        self.towers = towers
        self.use_lrn = use_lrn
        self.lrn_bias = float(lrn_bias)
        self.lrn_alpha = float(lrn_alpha)
        self.lrn_beta = float(lrn_beta)
        self.lrn_across_towers = bool(lrn_across_towers)
        self.conv_filters = conv_filters
        self.conv1_padding = conv1_padding
        self.adaptive_pool = adaptive_pool
        self.activation = activation
        self.pool_size = pool_size
        self.pool_stride = pool_stride
        self.dropout_rate = dropout_rate
        self.initializer = initializer
        self.input_scale = input_scale
        self.weight_decay = weight_decay
        self.seed = seed
        self.tower_devices = tower_devices  # not in get_config(): see there

    def call(self, inputs, training=None, mask=None, **kwargs):
        """Logits ``[batch, num_classes]``; outside training an empty batch returns
        ``[0, num_classes]`` without running the network.

        The guard is a TensorFlow workaround, not a shortcut: with oneDNN on (the
        default on AVX-512 CPUs), TensorFlow 2.21's CPU ``Conv2D`` kernel given a
        zero-sized batch returns a tensor of its *input's* shape, so the next
        convolution fails ("input depth must be evenly divisible by filter depth:
        3 vs 6" at conv2). ``MirroredStrategy`` hands a replica an empty batch
        whenever the last global batch is smaller than the replica count, or cannot
        be rebatched evenly (a TFDS split of 100 images in batches of 32 ends in
        ``[4, 0]``). Training steps skip the guard: their batches are whole (the
        training pipelines drop the remainder), and a ``tf.cond`` around the network
        costs about 10 % of a training step's CPU time (measured, full model, batch
        32); an inference call pays nothing measurable. See docs/scale.md.
        """
        with _device_scope(self.tower_devices[0] if self.tower_devices else None):
            if training:  # training batches are never empty (the pipelines drop remainders)
                return super().call(inputs, training=training, mask=mask, **kwargs)
            return tf.cond(
                tf.shape(inputs)[0] > 0,
                lambda: super(AlexNet, self).call(inputs, training=training, mask=mask,
                                                  **kwargs),
                # fc8 computes in float32 whatever the dtype policy (see the builder).
                lambda: tf.zeros([0, self.num_classes], tf.float32),
            )

    def get_config(self):
        """The constructor's arguments less ``tower_devices``.

        Device names describe the machine a model runs on, not the model: a config
        (and so a ``.keras`` file or an export) carrying them would place the copy on
        devices that may not exist where it is loaded. `from_config` builds an unplaced
        model; pass ``tower_devices`` to the constructor to place one.
        """
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "width": self.width,
            "towers": self.towers,
            "use_lrn": self.use_lrn,
            "lrn_bias": self.lrn_bias,
            "lrn_alpha": self.lrn_alpha,
            "lrn_beta": self.lrn_beta,
            "lrn_across_towers": self.lrn_across_towers,
            "conv_filters": list(self.conv_filters),
            "conv1_padding": self.conv1_padding,
            "adaptive_pool": self.adaptive_pool,
            "activation": self.activation,
            "pool_size": self.pool_size,
            "pool_stride": self.pool_stride,
            "dropout_rate": self.dropout_rate,
            "initializer": self.initializer,
            "input_scale": self.input_scale,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        """An unplaced `AlexNet`; configs saved before placement left them may still hold
        ``tower_devices``, which is ignored."""
        config = {k: v for k, v in config.items() if k != "tower_devices"}
        return cls(**config)


def alexnet(variant="krizhevsky2012", **overrides):
    """Builds an `AlexNet` from a named entry of `VARIANTS`; keyword overrides win.

    >>> alexnet().count_params()
    60965224
    >>> tiny = alexnet(num_classes=10, image_size=67, width=0.125)
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {sorted(VARIANTS)}. Received: {variant!r}")
    return AlexNet(**{**VARIANTS[variant], **overrides})
