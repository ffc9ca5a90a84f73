"""The embedded default dataset, ``alexnet_shapes``, as a TFDS dataset builder.

Generated locally (no download): ten classes of procedural shapes and textures
(`shapes_render.CLASS_NAMES`), 256x256 RGB stored as JPEG, with ``train`` and
``validation`` splits. Going through TFDS gives it the same ``tfds``/``tf.data`` path
as ImageNet: it is prepared once into ``data_dir`` and read back as TFRecords.

Configs:
    default: 2,400 training and 400 validation images (about 40 MB, ~20 s to build).
    tiny: 480 training and 100 validation images, for tests.
"""

import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds

from keras_alexnet.datasets import shapes_render

_SPLIT_SEEDS = {"train": 1, "validation": 2}


def _render_example(args):
    split_seed, index, seed = args
    rng = np.random.default_rng([seed, split_seed, index])
    label = index % len(shapes_render.CLASS_NAMES)
    return index, label, shapes_render.encode_jpeg(shapes_render.render(label, rng))


class ShapesConfig(tfds.core.BuilderConfig):
    """Sizes of the generated splits."""

    def __init__(self, *, num_train, num_validation, seed=2012, **kwargs):
        super().__init__(**kwargs)
        self.num_train = num_train
        self.num_validation = num_validation
        self.seed = seed


class AlexnetShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes and textures, generated locally; classes balanced per split."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "Ten classes, 256x256 JPEG.",
        "1.1.0": "Luma contrast of at least 64 grey levels, larger shapes, less blur and noise.",
        "1.2.0": "Default config: 2,400 training and 400 validation images.",
    }
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", num_train=2400, num_validation=400,
                     description="The default training set."),
        ShapesConfig(name="tiny", num_train=480, num_validation=100,
                     description="A small set for tests."),
    ]

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(256, 256, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=shapes_render.CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the images are generated
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "validation": self._generate_examples("validation", config.num_validation),
        }

    def _generate_examples(self, split, count):
        jobs = [(_SPLIT_SEEDS[split], i, self.builder_config.seed) for i in range(count)]
        workers = min(len(jobs), os.cpu_count() or 1)
        context = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
        with context.Pool(workers) as pool:
            for index, label, jpeg in pool.imap_unordered(_render_example, jobs, chunksize=32):
                yield f"{split}_{index:06d}", {"image": jpeg, "label": label}
