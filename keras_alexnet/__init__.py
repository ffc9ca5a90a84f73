"""keras_alexnet: a paper-faithful AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in Keras 3.

The public names load on first use (PEP 562), so that importing a submodule that needs
no TensorFlow (``keras_alexnet.training.config``, ``keras_alexnet.paper``) does not start
it: the command-line tools parse their arguments, answer ``--help`` and refuse bad flags
before TensorFlow loads. Code that rebuilds a recorded architecture calls
`keras_alexnet.training.model_source.register_classes` first.
"""

import importlib

__version__ = "0.1.0"

# Where each public name lives.
_EXPORTS = {
    "AlexNet": "keras_alexnet.model",
    "VARIANTS": "keras_alexnet.model",
    "alexnet": "keras_alexnet.model",
    "Ensemble": "keras_alexnet.ensemble",
    "LocalResponseNormalization": "keras_alexnet.layers",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keras_alexnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
