"""The command-line recipes (train, evaluate, finetune, experiments, ...).

This package's own import is light (no TensorFlow), so that a recipe can set
TensorFlow's environment before the library imports it.
"""

import argparse
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


def fail(message, status=2):
    """Ends a command with ``error: <message>`` on stderr and exit status ``status``.

    The recipes' one convention: status 2 for input refused before any work (a bad flag,
    a missing file, an incompatible model), 1 for a run that failed while working (a
    diverged loss). Raising `SystemExit` keeps ``finally`` blocks and atomic writes'
    clean-ups running.
    """
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def read_labels(path):
    """The class names of a ``--labels`` text file (one per line, in output order; blank
    lines ignored), or ``None`` without one; `fail` for a missing or empty file."""
    if path is None:
        return None
    import pathlib

    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        fail(f"--labels {path} does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        fail(f"--labels {path} holds no class names")
    return names


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in ``--help``, except where there is none to show (``None``,
    ``False`` of a switch) or the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)
