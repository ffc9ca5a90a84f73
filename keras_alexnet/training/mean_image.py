"""The paper's per-pixel mean image of a training set, computed once and cached.

Sec. 2: "subtracting the mean activity over the training set from each pixel". The
mean is taken over the training images after the shared rescale rule
(`preprocessing.resize_to_square`: shorter side to 256, central 256x256), on the 0-255
RGB scale, without PCA noise, crops or flips, so it has the shape of the square the
crops are cut from: ``(resize_size(image_size), resize_size(image_size), 3)``. Caffe's
``ilsvrc_2012_mean.npy`` is the same statistic (in BGR, after warping instead of a
central crop).

`compute_or_load` keeps the result in ``<data_dir>/keras_alexnet/mean-images/`` (TFDS'
default data directory when ``data_dir`` is None), beside the prepared data, named by
the dataset, the square's side and the dataset's fingerprint, e.g.
``imagenet2012-256-5.1.0-1281167.npy``. One pass over ImageNet's 1.28 M training images
decodes and rescales every image once (3.3 ms of CPU per ImageNet-sized photo: about
35 minutes on 2 cores); later runs load the file.
"""

import hashlib
import io
import pathlib
import re
import time

import numpy as np
import tensorflow as tf

from keras_alexnet import files, paper, preprocessing


def cache_path(source, data_dir, image_size=paper.IMAGE_SIZE):
    """Where the mean image of ``source`` at ``image_size`` is cached."""
    if data_dir:
        base = pathlib.Path(data_dir).expanduser()
    else:
        import tensorflow_datasets as tfds

        base = pathlib.Path(str(tfds.core.constants.DATA_DIR)).expanduser()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name).strip("_")
    if len(name) > 60:  # long folder paths: a readable tail plus a hash of the whole
        name = name[-40:] + "-" + hashlib.sha1(source.name.encode()).hexdigest()[:10]
    key = source.fingerprint or str(source.num_train)
    side = preprocessing.resize_size(image_size)
    return base / "keras_alexnet" / "mean-images" / f"{name}-{side}-{key}.npy"


def compute(train, image_size=paper.IMAGE_SIZE, *, batch_size=64, log_every=100_000):
    """The per-pixel mean of ``train`` (``(encoded bytes, label)`` pairs): float32 ``[S, S, 3]``.

    Sums in float64 so that a million images lose no precision.
    """
    side = preprocessing.resize_size(image_size)

    def square(image_bytes, _):
        return preprocessing.resize_to_square(preprocessing.decode_image(image_bytes), side)

    ds = train.map(square, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.batch(batch_size).map(
        lambda x: (tf.reduce_sum(tf.cast(x, tf.float64), axis=0), tf.shape(x)[0])
    ).prefetch(tf.data.AUTOTUNE)
    total = np.zeros((side, side, 3), np.float64)
    count = 0
    start = time.time()
    next_log = log_every
    for batch_sum, n in ds.as_numpy_iterator():
        total += batch_sum
        count += int(n)
        if count >= next_log:
            print(f"mean image: {count} images, {count / (time.time() - start):.0f} img/s")
            next_log += log_every
    if count == 0:
        raise ValueError("The training split is empty; there is no mean image to compute.")
    return (total / count).astype(np.float32)


def compute_or_load(source, data_dir=None, image_size=paper.IMAGE_SIZE):
    """The cached mean image of ``source.train``, computing and caching it if absent.

    Returns:
        float32 array of shape ``(resize_size(image_size), resize_size(image_size), 3)``,
        accepted as ``mean`` by the input pipeline and by `export.export_saved_model`.
    """
    path = cache_path(source, data_dir, image_size)
    if path.is_file():
        return preprocessing.resolve_mean(str(path), image_size)
    print(f"Computing the per-pixel mean image of {source.name} ({source.num_train} "
          f"training images); it is cached in {path}.")
    mean = compute(source.train, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temporaries(path.parent)  # left by killed runs
    buffer = io.BytesIO()
    np.save(buffer, mean)
    files.atomic_write(path, buffer.getvalue())  # a reader sees all of it or nothing
    return mean
