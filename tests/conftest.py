"""Shared fixtures: real test images, a prepared tiny shapes dataset, quiet TensorFlow."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

DATA = pathlib.Path(__file__).parent / "data"
IMAGES = sorted((DATA / "images").iterdir())


@pytest.fixture(scope="session")
def image_paths():
    """Real ImageNet JPEGs (odd sizes, a progressive one, EXIF orientation 6)."""
    return IMAGES


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """A TFDS data directory holding the prepared ``alexnet_shapes/tiny`` dataset."""
    from keras_alexnet import datasets

    data_dir = tmp_path_factory.mktemp("tfds")
    datasets.load("alexnet_shapes/tiny", data_dir=str(data_dir))
    return str(data_dir)
