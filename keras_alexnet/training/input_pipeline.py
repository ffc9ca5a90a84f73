"""tf.data input pipelines: ``(encoded bytes, label)`` in, ``(pixels, label)`` batches out.

Training: shuffle, decode, the paper's augmentation (`preprocessing.train_from_image`),
batch, prefetch. Evaluation: decode, `preprocessing.eval_from_image`, batch, prefetch.

**Determinism, and resuming mid-epoch.** One training dataset covers one epoch, and
everything random in it is a pure function of ``(seed, epoch)`` and the element's
position: the shuffle is seeded with `epoch_seed` (``reshuffle_each_iteration=False``),
and element ``i`` of epoch ``e`` is augmented with the stateless seed
``(epoch_seed(seed, e), i)``. So ``skip_batches=k`` gives exactly the batches
``k, k+1, ...`` of the same epoch: a run resumed from a mid-epoch checkpoint sees the
images, crops, flips and colour noise it would have seen. The skip happens before
decoding (only the encoded bytes of skipped elements are read); the source must give
the same order each time it is iterated for a given epoch (`DatasetSource.train_epoch`).
"""

import tensorflow as tf

from keras_alexnet import paper, preprocessing

AUTOTUNE = tf.data.AUTOTUNE


def epoch_seed(seed, epoch):
    """The shuffle and augmentation seed of ``epoch`` in a run seeded ``seed``."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**31 - 1)


def training_dataset(
    source,
    batch_size,
    *,
    image_size=paper.IMAGE_SIZE,
    mean=paper.IMAGENET_MEAN_RGB,
    pca_std=paper.PCA_ALPHA_STD,
    seed=0,
    epoch=0,
    num_batches=None,
    skip_batches=0,
    shuffle_buffer=4096,
    augment=True,
    resize=None,
):
    """One epoch of augmented training pixels ``float32 [B, S, S, 3]`` and labels
    ``int64 [B]``, in an order and with augmentations fixed by ``seed`` and ``epoch``.

    Drops the last partial batch so that every step sees ``batch_size`` images;
    ``num_batches`` caps the epoch (every worker of a cluster must run the same number
    of steps) and ``skip_batches`` starts it that many batches in (see the module
    docstring). ``augment=False`` gives the evaluation pixels (same decode, no
    randomness). ``resize`` is the side of the square the crops are cut from
    (`preprocessing.resize_size`; ``None``: the paper's ratio).
    """
    mean = tf.constant(mean, tf.float32)
    this_seed = epoch_seed(seed, epoch)
    ds = source.shuffle(shuffle_buffer, seed=this_seed, reshuffle_each_iteration=False)
    if num_batches is not None:
        ds = ds.take(num_batches * batch_size)
    ds = ds.enumerate().skip(skip_batches * batch_size)

    def prepare(index, example):
        image_bytes, label = example
        image = preprocessing.decode_image(image_bytes)
        if augment:
            element_seed = tf.stack([tf.constant(this_seed, tf.int64), index])
            pixels = preprocessing.train_from_image(image, element_seed, image_size, mean,
                                                    pca_std, resize=resize)
        else:
            pixels = preprocessing.eval_from_image(image, image_size, mean, resize=resize)
        return pixels, label

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def evaluation_dataset(source, batch_size, *, image_size=paper.IMAGE_SIZE,
                       mean=paper.IMAGENET_MEAN_RGB, resize=None):
    """Batches of centre-crop evaluation pixels and labels, in the source's order."""
    mean = tf.constant(mean, tf.float32)

    def prepare(image_bytes, label):
        return preprocessing.eval_from_bytes(image_bytes, image_size, mean, resize=resize), label

    ds = source.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)
