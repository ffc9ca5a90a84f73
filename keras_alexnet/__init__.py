"""keras_alexnet: a paper-faithful AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in Keras 3."""

# Registers `Ensemble` with Keras, so that every loader of an export (export.load_keras_model)
# can rebuild an ensemble from its recorded architecture.
from keras_alexnet.ensemble import Ensemble
from keras_alexnet.layers import LocalResponseNormalization
from keras_alexnet.model import VARIANTS, AlexNet, alexnet

__version__ = "0.1.0"

__all__ = ["AlexNet", "Ensemble", "LocalResponseNormalization", "VARIANTS", "alexnet",
           "__version__"]
