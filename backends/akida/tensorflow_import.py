"""TensorFlow, imported once for the Akida toolchain (quantizeml, cnn2snn and the v1 Keras path sit on it)."""

from __future__ import annotations

from qanac.native_output import import_quietly

TENSORFLOW_QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3"}


def import_tensorflow_quietly() -> None:
    """Import TensorFlow without its native start-up log lines (``qanac.native_output.import_quietly``)."""

    import_quietly("tensorflow", TENSORFLOW_QUIET)
