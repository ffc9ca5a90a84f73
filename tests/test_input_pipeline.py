"""The training pipeline is a pure function of (seed, epoch): what exact resume rests on."""

import io

import numpy as np
import tensorflow as tf
from PIL import Image

from keras_alexnet.training import input_pipeline


def _source(count=12):
    rng = np.random.default_rng(3)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (80, 90, 3), np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return tf.data.Dataset.from_tensor_slices((images, np.arange(count)))


def _batches(**kwargs):
    ds = input_pipeline.training_dataset(_source(), 3, image_size=67, seed=7,
                                         shuffle_buffer=12, **kwargs)
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_skipping_batches_gives_exactly_the_rest_of_the_epoch():
    full = _batches(epoch=2)
    assert len(full) == 4
    for skip in (1, 3):
        rest = _batches(epoch=2, skip_batches=skip)
        assert len(rest) == len(full) - skip
        for (x, y), (x_full, y_full) in zip(rest, full[skip:]):
            np.testing.assert_array_equal(y, y_full)
            np.testing.assert_array_equal(x, x_full)  # same crops, flips and colour noise


def test_each_epoch_has_its_own_order_and_augmentation_and_repeats_it():
    epoch0, epoch1 = _batches(epoch=0), _batches(epoch=1)
    labels0 = np.concatenate([y for _, y in epoch0])
    labels1 = np.concatenate([y for _, y in epoch1])
    assert sorted(labels0) == sorted(labels1) == list(range(12))
    assert not np.array_equal(labels0, labels1)
    # Built again (as a resumed process does), epoch 1 is the same epoch 1.
    for (x, y), (x_again, y_again) in zip(epoch1, _batches(epoch=1)):
        np.testing.assert_array_equal(x, x_again)
        np.testing.assert_array_equal(y, y_again)


def test_num_batches_caps_the_epoch():
    assert len(_batches(num_batches=2)) == 2
    assert [len(y) for _, y in _batches(num_batches=2, skip_batches=1)] == [3]
