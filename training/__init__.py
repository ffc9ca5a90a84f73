"""The command-line recipes (train, evaluate, finetune, experiments, ...).

This package's own import is light (no TensorFlow), so that a recipe can set
TensorFlow's environment before the library imports it.
"""

import os
import sys


def prefer_onednn():
    """Turns TensorFlow's oneDNN CPU kernels on for command-line runs, unless told not to.

    TensorFlow enables them by default only on some x86 CPUs (AVX-512). On the AVX2
    machines we measured, a full AlexNet training step costs 0.093 instead of 0.145 CPU
    seconds per image with them. Every strategy works with them on and off (the suite
    runs the strategy tests under both; see docs/scale.md for the one kernel bug they
    have and how the model avoids it). TensorFlow reads the variable lazily, so it must
    be set before it is imported; ``TF_ENABLE_ONEDNN_OPTS`` set by the user always wins.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
