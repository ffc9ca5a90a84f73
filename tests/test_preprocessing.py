"""The shared preprocessing: rescale rule, crops, mean, PCA noise, determinism, decoding."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_alexnet import paper, preprocessing
from keras_alexnet.training import input_pipeline


def test_shorter_side_to_256_then_central_crop():
    # A 100x400 image whose columns encode their x coordinate: after the shorter side
    # becomes 256 (1024 wide), the central 256 columns are x in [384, 640) of 1024.
    x = np.tile(np.linspace(0, 255, 400, dtype=np.float32)[None, :, None], (100, 1, 3))
    out = preprocessing.resize_to_square(tf.constant(x)).numpy()
    assert out.shape == (256, 256, 3)
    scale = 400 / 1024
    expected_first = (384 + 0.5) * scale - 0.5  # pixel-centre convention, in source pixels
    np.testing.assert_allclose(out[50, 0, 0], expected_first * 255 / 399, atol=1.0)
    np.testing.assert_allclose(out[50, 255, 0], ((639 + 0.5) * scale - 0.5) * 255 / 399,
                               atol=1.0)
    # Rows are constant in this image: every row equals every other.
    np.testing.assert_allclose(out[0], out[255], atol=1e-3)


def test_eval_pixels_are_centre_crop_minus_mean():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), np.uint8)
    got = preprocessing.eval_from_image(tf.constant(image), 227).numpy()
    want = image[14:241, 14:241].astype(np.float64) - np.array(paper.IMAGENET_MEAN_RGB)
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_mean_image_is_subtracted_before_cropping():
    mean_image = np.arange(256 * 256 * 3, dtype=np.float32).reshape(256, 256, 3) / 1000
    image = np.full((256, 256, 3), 100, np.uint8)
    got = preprocessing.eval_from_image(tf.constant(image), 227, mean_image).numpy()
    np.testing.assert_allclose(got, 100 - mean_image[14:241, 14:241], atol=1e-3)
    with pytest.raises(ValueError, match="shape"):
        preprocessing.resolve_mean(np.zeros((227, 227, 3)))


def test_pca_offset_follows_the_paper_formula():
    seed = tf.constant([3, 4], tf.int64)
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=0.1).numpy().astype(np.float64)
    eigvec = np.array(paper.PCA_EIGVEC, np.float64)
    eigval = np.array(paper.PCA_EIGVAL, np.float64)
    want = 255 * eigvec @ (alpha * eigval)  # sum_j p_j * alpha_j * lambda_j, 0-255 scale
    np.testing.assert_allclose(preprocessing.pca_lighting_offset(seed).numpy(), want, rtol=1e-5)
    # Statistics over many draws: std of the offset along p_1 is 255 * 0.1 * lambda_1.
    offsets = np.stack([preprocessing.pca_lighting_offset(tf.constant([i, 7])).numpy()
                        for i in range(400)])
    along_first = offsets @ eigvec[:, 0]
    assert along_first.std() == pytest.approx(255 * 0.1 * 0.2175, rel=0.15)


def test_training_augmentation_crops_and_flips():
    image = np.random.default_rng(1).integers(0, 256, (256, 256, 3), np.uint8)
    base = image.astype(np.float32) - np.array(paper.IMAGENET_MEAN_RGB, np.float32)
    flips = 0
    for i in range(20):
        out = preprocessing.train_from_image(tf.constant(image), tf.constant([i, 0]), 227,
                                             pca_std=0.0).numpy()
        found = False
        for flipped, src in ((False, out), (True, out[:, ::-1])):
            for top in range(30):
                for left in range(30):
                    if np.allclose(src[0, :5], base[top, left:left + 5], atol=1e-3) and \
                            np.allclose(src, base[top:top + 227, left:left + 227], atol=1e-3):
                        found, flips = True, flips + flipped
                        break
                if found:
                    break
            if found:
                break
        assert found, "a training crop is a (possibly mirrored) 227 window of the 256 image"
    assert 3 <= flips <= 17


def _jpeg(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_pipelines_are_deterministic_and_eval_matches_export_path():
    rng = np.random.default_rng(2)
    images = [_jpeg(rng.integers(0, 256, (300, 260, 3), np.uint8)) for _ in range(6)]
    source = tf.data.Dataset.from_tensor_slices((images, np.arange(6)))

    def batches(**kwargs):
        ds = input_pipeline.training_dataset(source, 3, image_size=67, seed=5, **kwargs)
        return [x.numpy() for x, _ in ds]

    a, b = batches(), batches()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # With augmentation off the training path gives exactly the evaluation pixels.
    plain = input_pipeline.training_dataset(source, 6, image_size=67, seed=5, augment=False)
    (x_train, y_train), = list(plain)
    (x_eval, y_eval), = list(input_pipeline.evaluation_dataset(source, 6, image_size=67))
    order = np.argsort(y_train.numpy())
    np.testing.assert_array_equal(x_train.numpy()[order], x_eval.numpy())
    direct = np.stack([preprocessing.eval_from_bytes(b, 67).numpy() for b in images])
    np.testing.assert_array_equal(x_eval.numpy(), direct)


def test_decoding_modes(image_paths):
    from pathlib import Path
    edge = Path(__file__).parent / "data" / "edge"
    gray = preprocessing.decode_image((edge / "hopper_gray.jpg").read_bytes()).numpy()
    assert gray.shape == (128, 128, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    cmyk = preprocessing.decode_image((edge / "pil_sample_cmyk.jpg").read_bytes()).numpy()
    assert cmyk.shape == (100, 100, 3)
    reference = np.asarray(Image.open(edge / "pil_sample_cmyk.jpg").convert("RGB"), np.float32)
    assert np.abs(cmyk.astype(np.float32) - reference).mean() < 12  # same picture
    for path in image_paths:
        pixels = preprocessing.eval_from_bytes(path.read_bytes()).numpy()
        assert pixels.shape == (227, 227, 3) and np.isfinite(pixels).all()
