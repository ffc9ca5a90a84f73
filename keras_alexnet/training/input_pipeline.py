"""tf.data input pipelines: ``(encoded bytes, label)`` in, ``(pixels, label)`` batches out.

Training: shuffle, decode, the paper's augmentation (`preprocessing.train_from_image`),
batch, prefetch. Evaluation: decode, `preprocessing.eval_from_image`, batch, prefetch.
Each training element draws its augmentation seed from a seeded
``tf.data.Dataset.random`` stream zipped alongside it, so the pipeline is
deterministic for a given seed even with parallel, AUTOTUNEd maps; the stream is
re-randomised every epoch.
"""

import tensorflow as tf

from keras_alexnet import paper, preprocessing

AUTOTUNE = tf.data.AUTOTUNE


def training_dataset(
    source,
    batch_size,
    *,
    image_size=paper.IMAGE_SIZE,
    mean=paper.IMAGENET_MEAN_RGB,
    pca_std=paper.PCA_ALPHA_STD,
    seed=0,
    shuffle_buffer=4096,
    augment=True,
):
    """Batches of augmented training pixels ``float32 [B, S, S, 3]`` and labels ``int64 [B]``.

    Drops the last partial batch so that every step sees ``batch_size`` images.
    ``augment=False`` gives the evaluation pixels (same decode, no randomness).
    """
    mean = tf.constant(mean, tf.float32)
    ds = source.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds))

    def prepare(example, element_seed):
        image_bytes, label = example
        image = preprocessing.decode_image(image_bytes)
        if augment:
            pixels = preprocessing.train_from_image(image, element_seed, image_size, mean, pca_std)
        else:
            pixels = preprocessing.eval_from_image(image, image_size, mean)
        return pixels, label

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def evaluation_dataset(source, batch_size, *, image_size=paper.IMAGE_SIZE,
                       mean=paper.IMAGENET_MEAN_RGB):
    """Batches of centre-crop evaluation pixels and labels, in the source's order."""
    mean = tf.constant(mean, tf.float32)

    def prepare(image_bytes, label):
        return preprocessing.eval_from_bytes(image_bytes, image_size, mean), label

    ds = source.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)
