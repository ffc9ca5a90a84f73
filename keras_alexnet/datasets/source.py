"""`DatasetSource`: what every dataset loader returns (its own module, so that the
loaders can import it without importing the package that imports them)."""

import dataclasses
from typing import Callable, Optional

import tensorflow as tf


@dataclasses.dataclass
class DatasetSource:
    """The splits of a dataset as ``(encoded bytes, int64 label)`` datasets.

    Attributes:
        name: the name it was loaded by.
        train, validation: ``tf.data.Dataset`` of ``(tf.string, tf.int64)`` scalars.
        class_names: one short name per class, in label order.
        display_names: human-readable names for exported labels (for ImageNet, the
            synset and its words); defaults to ``class_names``.
        num_train, num_validation: split sizes.
        fingerprint: changes when the training images change (keys cached
            statistics such as the mean image); ``None`` when the name suffices.
        skipped: paths left out because they could not be decoded (folders only).
        shuffled_train: ``seed -> tf.data.Dataset``, the training split in a file order
            drawn from ``seed``, the same every time for the same seed (training passes
            each epoch's seed, and a resumed run skips to its position in it). ``None``:
            ``train``'s own fixed order (the input pipeline's buffer still shuffles).
    """

    name: str
    train: tf.data.Dataset
    validation: tf.data.Dataset
    class_names: list
    num_train: int
    num_validation: int
    display_names: Optional[list] = None
    fingerprint: Optional[str] = None
    skipped: list = dataclasses.field(default_factory=list)
    shuffled_train: Optional[Callable[[int], tf.data.Dataset]] = None

    def __post_init__(self):
        if self.display_names is None:
            self.display_names = list(self.class_names)

    def train_in_order(self, seed):
        """The training split in the file order ``seed`` picks (see ``shuffled_train``)."""
        return self.train if self.shuffled_train is None else self.shuffled_train(seed)

    @property
    def num_classes(self):
        return len(self.class_names)
