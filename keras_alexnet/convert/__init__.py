"""Published AlexNet weights converted into this package's model and exported.

Two sources, each a module returning a `ConvertedModel`:

* `keras_alexnet.convert.caffe`: Caffe's two-tower ``bvlc_alexnet`` (``deploy.prototxt``
  + ``bvlc_alexnet.caffemodel``), into the ``"caffe"`` variant;
* `keras_alexnet.convert.torchvision`: torchvision's one-tower state dict
  (``alexnet-owt-7be5be79.pth``), into the ``"torchvision"`` variant.

Nothing is downloaded: users bring the files. `export_converted` writes a SavedModel
version with the 1000 ImageNet class names and the preprocessing the weights were
trained with, recorded in the export metadata (``"weights"``).
"""

import dataclasses
from typing import Any

from keras_alexnet import export
from keras_alexnet.datasets import imagenet


@dataclasses.dataclass
class ConvertedModel:
    """A Keras model holding converted weights and the preprocessing they expect.

    Attributes:
        model: the `AlexNet` (logits over ``len(class_names)`` classes) taking RGB pixels
            on the 0-255 scale minus ``mean``, centre-cropped to the model's input size
            from a ``resize`` square (`preprocessing.eval_from_image`); any channel
            reordering or scaling the weights need is inside the model.
        mean: the mean to subtract, ``(3,)`` RGB or a ``(resize, resize, 3)`` RGB image.
        resize: side of the square the crop is cut from (256 for both sources).
        class_names: one label per output, in output order.
        weights: a JSON-serializable description for the export metadata: the source
            format and files, the conventions converted (channel order, LRN, flatten
            order) and the published accuracy with its source.
    """

    model: Any
    mean: Any
    resize: int
    class_names: list
    weights: dict


def imagenet_class_names():
    """The 1000 ILSVRC2012 labels in class-index order (sorted synsets, the order both
    Caffe's and torchvision's outputs use): ``"n01440764 tench"``."""
    return [imagenet.display_name(s) for s in sorted(imagenet.synset_words())]


def export_converted(converted, base_dir, *, version=None):
    """Exports a `ConvertedModel` as SavedModel ``<base_dir>/<version>/`` (see
    `export.export_saved_model`); returns the version directory."""
    return export.export_saved_model(
        converted.model, base_dir, converted.class_names, version=version,
        mean=converted.mean, resize=converted.resize,
        metadata={"weights": converted.weights})
