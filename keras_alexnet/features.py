"""Intermediate activations of an AlexNet as features (DeCAF-style transfer).

Donahue et al. (2014, "DeCAF") and the paper's own retrieval experiment (Sec. 6.1, the
4096-d last hidden layer) use the activations of the fully connected layers as a generic
image descriptor. The layers offered here, by name (`FEATURE_LAYERS`):

* ``fc7``: the last hidden layer after its ReLU (4096-d for the full model);
* ``fc6``: the first fully connected layer after its ReLU (4096-d);
* ``pool5``: the flattened output of the last pooling (9216-d at 227x227; for
  torchvision's layout, of its adaptive 6x6 average pool after pool5).

Both tower layouts: with two towers the towers' halves are joined where the model joins
them (``cross_fc7``, ``cross_fc6``, ``cross6``: tower A's units first, then tower B's),
with one tower the layer itself (``fc7``, ``fc6``, ``flatten``). Dropout follows these
layers and so never touches the features. Features are computed on the evaluation
preprocessing (`keras_alexnet.preprocessing.eval_from_bytes`), the same as export.
"""

import os
import pathlib

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import preprocessing

FEATURE_LAYERS = ("fc7", "fc6", "pool5")

# Per feature layer: the Keras layer holding it, two towers first, then one tower.
_LAYER_NAMES = {
    "fc7": ("cross_fc7", "fc7"),
    "fc6": ("cross_fc6", "fc6"),
    "pool5": ("cross6", "flatten"),
}


def _check_layer(layer):
    if layer not in _LAYER_NAMES:
        raise ValueError(f"Unknown feature layer {layer!r}; choose one of {list(FEATURE_LAYERS)}.")


def find_layer(model, layer):
    """The Keras layer of ``model`` whose output is the feature ``layer``, or ``None``.

    ``layer`` is one of `FEATURE_LAYERS`; a model without that layer (a generic Keras
    model, or one cut below it) gives ``None``.

    Raises:
        ValueError: for a name not in `FEATURE_LAYERS`.
    """
    _check_layer(layer)
    names = {sub.name for sub in model.layers}
    for name in _LAYER_NAMES[layer]:
        if name in names:
            return model.get_layer(name)
    return None


def feature_tensor(model, layer):
    """The symbolic output tensor of the feature ``layer`` in a functional ``model``.

    Raises:
        ValueError: for an unknown layer name, or a model that does not have it.
    """
    found = find_layer(model, layer)
    if found is None:
        raise ValueError(
            f"The model {model.name!r} has no {layer} layer (looked for "
            f"{' or '.join(_LAYER_NAMES[layer])}); features need an AlexNet of this package.")
    return found.output


def feature_extractor(model, layer="fc7"):
    """A Keras model from ``model``'s input to the feature ``layer``, returning float32.

    It shares ``model``'s layers and weights (nothing is copied). Under a mixed precision
    policy a final cast to float32 is added.

    Raises:
        ValueError: for an unknown layer name, or a model that does not have it.
    """
    outputs = feature_tensor(model, layer)
    if outputs.dtype != "float32":
        outputs = keras.layers.Activation("linear", dtype="float32",
                                          name=f"{layer}_float32")(outputs)
    # The single input tensor, not the list ``model.inputs``: called with a bare tensor
    # (as everywhere here), a list-input model warns that the structures differ.
    return keras.Model(model.inputs[0], outputs, name=f"{model.name}_{layer}")


def feature_dim(model, layer="fc7"):
    """The size of the feature ``layer``'s output (4096 for the full model's fc7)."""
    return int(feature_tensor(model, layer).shape[-1])


def extract(model, dataset, layer="fc7", image_size=None, mean=None, resize=None,
            batch_size=32):
    """Features of every image of ``dataset`` at ``layer``, in the dataset's order.

    Args:
        model: a functional AlexNet taking preprocessed pixels.
        dataset: a ``tf.data.Dataset`` of ``(encoded image bytes, int label)`` scalars
            (a `keras_alexnet.datasets.DatasetSource` split).
        layer: one of `FEATURE_LAYERS`.
        image_size: the model's input side (default: read from the model).
        mean: the mean its weights expect (see `preprocessing.resolve_mean`; default
            ImageNet's channel mean).
        resize: the side the centre crop is cut from (default: the paper's ratio).
        batch_size: images per forward pass.

    Returns:
        ``(features float32 [N, D], labels int64 [N])``.
    """
    extractor = feature_extractor(model, layer)
    size = int(image_size or model.input_shape[1])
    mean = preprocessing.resolve_mean(mean, size, resize)
    dim = int(extractor.output_shape[-1])

    def pixels(image_bytes, label):
        return preprocessing.eval_from_bytes(image_bytes, size, mean, resize), label

    batches = (dataset.map(pixels, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(int(batch_size)).prefetch(2))

    @tf.function(reduce_retracing=True)
    def forward(x):
        return tf.cast(extractor(x, training=False), tf.float32)

    features, labels = [np.zeros([0, dim], np.float32)], [np.zeros([0], np.int64)]
    for x, y in batches:
        features.append(forward(x).numpy())
        labels.append(y.numpy().astype(np.int64))
    return np.concatenate(features), np.concatenate(labels)


def list_images(root):
    """``(paths, labels, class_names)`` of the images in a folder, in a fixed order.

    ``root/<class>/...`` (the layout of ``folder:`` datasets: class names are the sorted
    folder names, labels their indices, images may be nested below a class folder), or,
    when ``root`` has no class folders, the images directly in it, labelled -1 with no
    class names. Only the extensions the folder datasets accept count
    (`keras_alexnet.datasets.folder.EXTENSIONS`).

    Raises:
        ValueError: when ``root`` is not a folder or holds no images.
    """
    from keras_alexnet.datasets import folder

    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"No such folder of images: {root}")
    classes, files = folder.list_class_folder(root)
    paths, labels = [], []
    if classes:
        for label, name in enumerate(classes):
            paths.extend(files[name])
            labels.extend([label] * len(files[name]))
    else:
        paths = [str(root / name) for name in sorted(os.listdir(root))
                 if (root / name).is_file() and not name.startswith(".")
                 and name.lower().endswith(folder.EXTENSIONS)]
        labels = [-1] * len(paths)
    if not paths:
        extensions = " ".join(folder.EXTENSIONS)
        raise ValueError(f"{root} holds no images ({extensions}), neither in class sub-folders "
                         "nor directly.")
    return paths, labels, classes
