"""keras_alexnet: a paper-faithful AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in Keras 3."""

from keras_alexnet.layers import LocalResponseNormalization
from keras_alexnet.model import VARIANTS, AlexNet, alexnet

__version__ = "0.1.0"

__all__ = ["AlexNet", "LocalResponseNormalization", "VARIANTS", "alexnet", "__version__"]
