"""The inputs every side of a comparison gets (NumPy only, so PyTorch and ONNX Runtime
workers need no TensorFlow): the same seeds give the same arrays in every process."""

import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "tests" / "data" / "images").glob("*.[jJ][pP]*[gG]"))
PIXEL_SCALE = 50.0  # random "preprocessed" pixels: the spread of mean-subtracted 0-255 values
CHECK_BATCH = 2  # rows of the fixed input the agreement check compares
CHECK_SEED = 1


def pixels(batch, image_size, seed=0):
    """A batch of random preprocessed pixels, NHWC float32."""
    rng = np.random.default_rng(seed)
    return (PIXEL_SCALE * rng.normal(size=(batch, image_size, image_size, 3))).astype(np.float32)


def training_batch(batch, image_size, num_classes):
    """``(pixels NHWC float32, labels int64)``: the one batch every training side repeats."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    return x, rng.integers(0, num_classes, size=batch)


def photos(batch):
    """``batch`` encoded JPEG photos (tests/data/images, cycled)."""
    data = [p.read_bytes() for p in PHOTOS]
    return [data[i % len(data)] for i in range(batch)]


def photo_summary():
    """What the encoded-image inputs are, for the records."""
    sizes = [p.stat().st_size for p in PHOTOS]
    return f"{len(PHOTOS)} JPEG photos of tests/data/images, mean {sum(sizes) // len(sizes)} bytes"
