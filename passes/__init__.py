"""Built-in rewrite passes (import name ``qanac.passes``), one module per family of rewrites.

Importing a module registers its passes (``qanac.registry.register_pass``). ``load_all`` imports every
target-independent family listed in ``FAMILIES``; a new family is added there. A target's own passes live
in a sub-package named after it (``passes/akida/``), loaded through the target registry.
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
    "activations",
)


def load_all() -> None:
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")
