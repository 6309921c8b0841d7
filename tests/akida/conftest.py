"""Fixtures shared by the Akida backend tests: one compiled tiny CNN per session (compiling costs seconds)."""

from __future__ import annotations

import pytest

from tests.akida import akida_models


@pytest.fixture(scope="session")
def tiny_model():
    return akida_models.tiny_cnn()


@pytest.fixture(scope="session")
def tiny_calibration(tiny_model):
    return akida_models.image_calibration(tiny_model, count=32)


@pytest.fixture(scope="session")
def tiny_conversion(tiny_model, tiny_calibration):
    from qanac.backends.akida.convert import compile_onnx

    return compile_onnx(tiny_model, tiny_calibration)
