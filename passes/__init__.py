"""Built-in rewrite passes (import name ``qanac.passes``), one module per family of rewrites.

Importing a module registers its passes (``qanac.registry.register_pass``). ``load_all`` imports every
family listed in ``FAMILIES``; a new family is added there.
"""

from __future__ import annotations

import importlib

FAMILIES = (
    "cleanup",
    "opset",
    "shapes",
    "constants",
    "padding",
    "batchnorm",
    "softmax",
    "layout",
    "approximations",
    "scaling",
    "akida_conv",
    "akida_pooling",
)


def load_all() -> None:
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")
