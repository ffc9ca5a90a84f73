"""The one preprocessing definition, shared by training, evaluation and export.

Pixels are RGB on the 0-255 scale throughout (the paper's scale, Sec. 2). For an
encoded image of any size the steps are:

1. decode (JPEG, PNG, GIF, BMP; grayscale and RGBA become RGB): `decode_image`;
2. rescale the shorter side to 256 and take the central 256x256 (`resize_to_square`).
   The paper "down-sampled the images to a fixed resolution of 256x256 ... rescaled
   the image such that the shorter side was of length 256, and then cropped out the
   central 256x256 patch" (Sec. 2), which is what this does, keeping the aspect ratio
   (Caffe instead warps to 256x256);
3. subtract the mean: a per-channel RGB mean (shape ``(3,)``, the default is ImageNet's)
   or the paper's per-pixel mean image (shape ``(256, 256, 3)``), `subtract_mean`;
4. evaluation takes the central ``image_size`` crop (`eval_from_bytes`); training
   (`train_from_bytes`) adds the paper's PCA colour noise before the mean subtraction
   and then takes a random ``image_size`` crop and a random horizontal flip (Sec. 4.1).

Smaller inputs (``image_size`` below 227, for tests and demos) scale the whole
recipe: the square side becomes ``round(image_size * 256 / 227)`` (`resize_size`), so
a crop always covers the same 89% of the picture as the paper's 227 of 256. Weights
trained with another recipe pass their own square side as ``resize`` (torchvision's
224 crops come from 256, `paper.TORCHVISION_RESIZE_SIZE`); the default ``None`` means
`resize_size` of the crop size.

Random choices are stateless, driven by an explicit ``seed`` tensor of shape ``(2,)``,
so a ``tf.data`` pipeline that hands each element its own seed is deterministic.
"""

import numpy as np
import tensorflow as tf

from keras_alexnet import paper


def decode_image(image_bytes):
    """Decodes one encoded image to ``uint8 [H, W, 3]``; the first frame of a GIF.

    Grayscale is replicated to three channels and alpha is dropped. CMYK JPEGs are
    converted by libjpeg. Raises ``InvalidArgumentError`` for bytes that are not a
    complete JPEG, PNG, GIF or BMP image.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_size(image_size=paper.IMAGE_SIZE, resize=None):
    """Side of the square an ``image_size`` crop is taken from: 256 for the paper's 227.

    An explicit ``resize`` (a side of at least ``image_size``) wins.
    """
    if resize is not None:
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < image_size:
            raise ValueError(f"`resize` must be an integer >= the crop size {image_size}. "
                             f"Received: resize={resize!r}")
        return resize
    if image_size == paper.IMAGE_SIZE:
        return paper.RESIZE_SIZE
    return int(round(image_size * paper.RESIZE_SIZE / paper.IMAGE_SIZE))


def resize_to_square(image, size=paper.RESIZE_SIZE):
    """Rescales the shorter side to ``size`` and crops the central ``size x size`` patch.

    Done in the other order, which is the same geometry and cheaper: the central
    square of the source (side = its shorter side) is cut out, then resized to
    ``size x size``. Shrinking uses area averaging (a box filter over the source pixels
    each output pixel covers, so large photos do not alias); enlarging small images
    is bilinear. Area averaging costs about half of TensorFlow's antialiased bilinear
    resize, which was the slowest step of the training pipeline (see BENCHMARKS.md).
    Returns ``float32 [size, size, 3]`` on the 0-255 scale.
    """
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top = (shape[0] - side) // 2
    left = (shape[1] - side) // 2
    square = image[top : top + side, left : left + side, :]
    image = tf.cond(
        side > size,
        lambda: tf.image.resize(square, (size, size), method="area"),
        lambda: tf.image.resize(square, (size, size), method="bilinear"),
    )
    image.set_shape([size, size, 3])
    return image


def subtract_mean(image, mean):
    """``image - mean`` for a ``(3,)`` channel mean or an ``(H, W, 3)`` mean image."""
    return image - tf.cast(mean, tf.float32)


def center_crop(image, size):
    """The central ``size x size`` crop of an ``[H, W, C]`` (or batched) image."""
    height, width = tf.shape(image)[-3], tf.shape(image)[-2]
    top = (height - size) // 2
    left = (width - size) // 2
    return image[..., top : top + size, left : left + size, :]


def pca_lighting_offset(seed, alpha_std=paper.PCA_ALPHA_STD):
    """The paper's PCA colour offset on the 0-255 scale (Sec. 4.1).

    ``offset = 255 * P @ (alpha * lambda)`` with ``alpha ~ N(0, alpha_std)`` per
    eigenvector, ``P`` and ``lambda`` the eigenvectors (columns) and eigenvalues of the
    ImageNet RGB pixel covariance for pixels in [0, 1]. One offset per image per
    presentation, added to every pixel.
    """
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=alpha_std)
    eigvec = tf.constant(paper.PCA_EIGVEC, tf.float32)
    eigval = tf.constant(paper.PCA_EIGVAL, tf.float32)
    return 255.0 * tf.linalg.matvec(eigvec, alpha * eigval)


def random_crop_flip(image, size, seed):
    """A random ``size x size`` crop and a horizontal flip with probability 1/2."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def eval_from_image(image, image_size=paper.IMAGE_SIZE, mean=paper.IMAGENET_MEAN_RGB,
                    resize=None):
    """Evaluation pixels from a decoded ``uint8 [H, W, 3]`` image: ``float32 [S, S, 3]``."""
    square = resize_to_square(image, resize_size(image_size, resize))
    return center_crop(subtract_mean(square, mean), image_size)


def eval_from_bytes(image_bytes, image_size=paper.IMAGE_SIZE, mean=paper.IMAGENET_MEAN_RGB,
                    resize=None):
    """Evaluation pixels from encoded bytes: decode, 256 rescale/crop, mean, centre crop."""
    return eval_from_image(decode_image(image_bytes), image_size, mean, resize)


def train_from_image(
    image,
    seed,
    image_size=paper.IMAGE_SIZE,
    mean=paper.IMAGENET_MEAN_RGB,
    pca_std=paper.PCA_ALPHA_STD,
    resize=None,
):
    """Training pixels from a decoded image: 256 rescale/crop, PCA noise, mean, crop, flip.

    ``pca_std=0`` turns the colour noise off.
    """
    pca_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = resize_to_square(image, resize_size(image_size, resize))
    # (image + offset) - mean as one pass over the pixels: image - (mean - offset).
    shift = tf.cast(mean, tf.float32)
    if pca_std:
        shift = shift - pca_lighting_offset(pca_seed, pca_std)
    return random_crop_flip(subtract_mean(image, shift), image_size, crop_seed)


def train_from_bytes(image_bytes, seed, image_size=paper.IMAGE_SIZE,
                     mean=paper.IMAGENET_MEAN_RGB, pca_std=paper.PCA_ALPHA_STD, resize=None):
    """`train_from_image` on encoded bytes."""
    return train_from_image(decode_image(image_bytes), seed, image_size, mean, pca_std, resize)


def resolve_mean(mean, image_size=paper.IMAGE_SIZE, resize=None):
    """A mean as a float32 NumPy array: ``"imagenet"``, a sequence of 3, or a ``.npy`` path.

    A per-pixel mean image must be ``resize_size(image_size, resize)`` square.
    """
    if mean is None or (isinstance(mean, str) and mean == "imagenet"):
        return np.asarray(paper.IMAGENET_MEAN_RGB, np.float32)
    if isinstance(mean, str):
        array = np.load(mean)
    else:
        array = np.asarray(mean, np.float32)
    side = resize_size(image_size, resize)
    if array.shape not in ((3,), (side, side, 3)):
        raise ValueError(
            f"A mean must have shape (3,) or ({side}, {side}, 3) for {image_size}-pixel "
            f"inputs. Received shape {array.shape} from {mean!r}."
        )
    return array.astype(np.float32)


def ten_crop(square, size):
    """The paper's 10 test patches of a mean-subtracted square: ``[10, size, size, 3]``.

    Sec. 4.1: "the four corner patches and the center patch as well as their
    horizontal reflections (hence ten patches in all)". Order: centre, top-left,
    top-right, bottom-left, bottom-right, then the same five mirrored, so patch 0 is
    exactly `center_crop` (the single-crop evaluation pixels).
    """
    side = tf.shape(square)[0]
    far = side - size
    mid = far // 2
    offsets = [(mid, mid), (0, 0), (0, far), (far, 0), (far, far)]
    crops = tf.stack([square[top : top + size, left : left + size, :] for top, left in offsets])
    crops = tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)
    crops.set_shape([10, size, size, 3])
    return crops


def ten_crop_from_image(image, image_size=paper.IMAGE_SIZE, mean=paper.IMAGENET_MEAN_RGB,
                        resize=None):
    """`ten_crop` of a decoded image after the 256 rescale/crop and the mean subtraction."""
    square = subtract_mean(resize_to_square(image, resize_size(image_size, resize)), mean)
    return ten_crop(square, image_size)
