"""Training configuration: one dataclass and the named presets.

``paper`` is the recipe of Sec. 5 exactly; ``demo`` (the default) trains the same
network on the embedded dataset within minutes on a CPU; ``smoke`` is a tiny
configuration for tests. Command-line flags override preset values field by field.
"""

import dataclasses
import json
from typing import Optional

from keras_alexnet import paper

# Fields that may change between a run and its resumption: none of them changes what
# is computed (epochs only extends the run; where the data lives, how many checkpoints
# are kept and how often they are written do not change a weight).
RESUMABLE_CHANGES = ("epochs", "data_dir", "manual_dir", "keep_checkpoints",
                     "checkpoint_every")


# Architecture arguments of `AlexNet` beyond the paper's (``None`` in a configuration:
# the paper's value); fine-tuning copies them from its source model.
VARIANT_FIELDS = ("lrn_bias", "lrn_alpha", "conv_filters", "conv1_padding", "adaptive_pool",
                  "activation", "pool_size", "pool_stride")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` in the run directory.

    Model fields (``num_classes`` comes from the dataset): ``image_size``, ``width``,
    ``towers``, ``use_lrn``, ``dropout_rate``, ``initializer``, ``input_scale``.
    Optimiser: ``optimizer`` (``"sgd"`` with ``momentum``, or ``"adam"``),
    ``learning_rate``, ``weight_decay`` (the paper's, inside the momentum buffer: L2 of
    ``weight_decay / 2`` on the kernels), ``lr_drops`` (divide by 10 on a validation
    top-1 plateau of ``plateau_patience`` epochs, at most this many times).
    Data: ``dataset``, ``data_dir``, ``batch_size``, ``epochs``, ``pca_std`` (0 turns PCA
    colour noise off), ``augment`` (``False``: no crops, flips or colour noise, the centre
    crop of the evaluation pipeline instead), ``mean`` (``"imagenet"``, ``"image"`` for
    the paper's per-pixel mean image of the training set, three numbers, or a ``.npy``
    path), ``manual_dir`` (where the user's ImageNet archives are), ``val_split``
    (held-out fraction for folder datasets without a ``val`` folder).
    Scale (see `keras_alexnet.training.distribute` and docs/scale.md): ``strategy``
    (``"default"``, ``"mirrored"``, ``"towers"``, ``"multiworker"``), ``cpu_devices``
    (split the CPU into this many logical devices), ``batch_size`` is per replica: the
    global batch is ``batch_size`` times the replicas in sync, and ``scale_lr`` multiplies
    the learning rate by the same factor (the linear scaling rule); ``mixed_precision``
    (``None``, ``"mixed_float16"`` or ``"mixed_bfloat16"``) and ``jit_compile`` (XLA).
    Run: ``seed``; ``keep_checkpoints`` (committed checkpoints kept); ``checkpoint_every``
    (also checkpoint every this many training steps, besides every epoch end; 0: epoch
    ends only); ``deterministic`` (TensorFlow's deterministic ops: bit-identical runs on
    the same machine, at some cost in speed).
    Architecture variants (``None``: the paper's; `keras_alexnet.model.AlexNet`):
    ``lrn_bias``, ``lrn_alpha``, ``conv_filters``, ``conv1_padding``, ``adaptive_pool``,
    ``activation`` (``"tanh"`` for Figure 1's comparison), ``pool_size`` and ``pool_stride``
    (2 and 2: non-overlapping pooling, Sec. 3.4);
    ``resize`` is the side of the square the crops are cut from (``None``: the paper's
    ratio, 256 for 227; torchvision's weights take 224 crops of 256).
    Fine-tuning (`keras_alexnet.training.finetune`): ``init_from`` (the model the run
    starts from: a run, checkpoint, export or ``.keras`` path, read only when the run
    starts; its fc8 is replaced by a new one for the dataset's classes) and
    ``init_source`` (what it resolved to: path, origin, class names), ``head_epochs``
    (epochs training fc8 alone, everything else frozen), ``unfreeze`` (``None``: fc8
    alone throughout; ``"conv3"`` .. ``"fc7"`` or ``"all"``: after the head epochs, that
    layer and every layer above it train too) at ``learning_rate * unfreeze_lr_factor``.
    """

    dataset: str = "alexnet_shapes"
    data_dir: Optional[str] = None
    manual_dir: Optional[str] = None
    val_split: Optional[float] = None
    image_size: int = paper.IMAGE_SIZE
    width: float = 1.0
    towers: int = 2
    use_lrn: bool = True
    dropout_rate: float = paper.DROPOUT_RATE
    initializer: str = "paper"
    input_scale: Optional[float] = None
    optimizer: str = "sgd"
    learning_rate: float = paper.LEARNING_RATE
    momentum: float = paper.MOMENTUM
    weight_decay: float = paper.WEIGHT_DECAY
    lr_drops: int = paper.LR_DROPS
    plateau_patience: int = 3
    batch_size: int = paper.BATCH_SIZE
    epochs: int = paper.EPOCHS
    pca_std: float = paper.PCA_ALPHA_STD
    augment: bool = True
    mean: object = "imagenet"
    seed: int = 2012
    keep_checkpoints: int = 2
    strategy: str = "default"
    cpu_devices: Optional[int] = None
    scale_lr: bool = True
    mixed_precision: Optional[str] = None
    jit_compile: bool = False
    checkpoint_every: int = 1000
    deterministic: bool = False
    lrn_bias: Optional[float] = None
    lrn_alpha: Optional[float] = None
    conv_filters: Optional[list] = None
    conv1_padding: Optional[int] = None
    adaptive_pool: Optional[int] = None
    activation: Optional[str] = None
    pool_size: Optional[int] = None
    pool_stride: Optional[int] = None
    resize: Optional[int] = None
    init_from: Optional[str] = None
    init_source: Optional[dict] = None
    head_epochs: int = 0
    unfreeze: Optional[str] = None
    unfreeze_lr_factor: float = 0.1

    def __post_init__(self):
        if self.conv_filters is not None:  # a list either way, so that JSON round trips compare
            self.conv_filters = [int(f) for f in self.conv_filters]
        if isinstance(self.input_scale, tuple):
            self.input_scale = list(self.input_scale)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown configuration keys: {sorted(unknown)}")
        return cls(**values)

    def check_resumes(self, saved):
        """Raises ValueError naming the fields where this configuration differs from the
        ``saved`` run's; only `RESUMABLE_CHANGES` (e.g. ``epochs``) may differ."""
        old, new = dataclasses.asdict(saved), dataclasses.asdict(self)
        changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
        if changed:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
            raise ValueError(
                f"The run directory holds a run with a different configuration ({details}). "
                "Rerun with the original flags to resume it, or choose a new --run-dir."
            )

    def model_kwargs(self):
        kwargs = dict(
            image_size=self.image_size,
            width=self.width,
            towers=self.towers,
            use_lrn=self.use_lrn,
            dropout_rate=self.dropout_rate,
            initializer=self.initializer,
            input_scale=self.input_scale,
            weight_decay=self.weight_decay,
        )
        for name in VARIANT_FIELDS:  # the paper's unless set
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs

    def phase(self, epoch):
        """``"train"`` (no fine-tuning), or the fine-tuning phase of ``epoch`` (0-based):
        ``"head"`` (fc8 alone) or ``"unfrozen"`` (from `unfreeze` upwards)."""
        if self.init_from is None:
            return "train"
        if self.unfreeze is not None and epoch >= self.head_epochs:
            return "unfrozen"
        return "head"


PRESETS = {
    # Krizhevsky et al. (2012), Sec. 5: batch 128, SGD momentum 0.9, weight decay 5e-4
    # inside the momentum buffer, lr 0.01 divided by 10 on a validation plateau (3x),
    # 90 epochs, weights N(0, 0.01), biases 1 in conv2/4/5 and fc6/7, raw 0-255 pixels.
    "paper": TrainConfig(),
    # The default: the full paper network (60,965,224 parameters, 227x227 inputs) on the
    # embedded shapes dataset, tuned to converge within 10 minutes on a 2-core CPU.
    # Deviations from the paper (documented in the README): Adam instead of SGD, He
    # initialisation, inputs scaled to about unit variance, no weight decay and no
    # dropout (both slow the first few hundred steps), batch 16, 3 epochs (450 steps).
    # Architecture and augmentation unchanged.
    "demo": TrainConfig(
        initializer="he",
        input_scale=1.0 / 64.0,
        optimizer="adam",
        learning_rate=3e-4,
        weight_decay=0.0,
        dropout_rate=0.0,
        lr_drops=0,
        batch_size=16,
        epochs=3,
        checkpoint_every=100,  # about 2 minutes of a 2-core CPU
    ),
    # For tests: a narrow 67x67 network on the tiny shapes split.
    "smoke": TrainConfig(
        dataset="alexnet_shapes/tiny",
        image_size=paper.MIN_IMAGE_SIZE,
        width=0.125,
        initializer="he",
        input_scale=1.0 / 64.0,
        optimizer="adam",
        learning_rate=1e-3,
        weight_decay=0.0,
        lr_drops=0,
        dropout_rate=0.0,
        batch_size=16,
        epochs=2,
    ),
}

DEFAULT_PRESET = "demo"
