"""Targets: what each device accepts, which passes prepare a model for it, and which backend emits it.

A target is declarative. Its pipeline is a list of registered pass names (canonicalization first, then
the target's legalization); its lint rules, when it has any, are one table used by both ``qanac lint``
and legalization so the rules live in one place. Backends are imported only when used.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from qanac.diagnostics import UsageError

# Exact, target-independent normalisation of any imported model (docs/passes.md).
CANONICALIZE: tuple[str, ...] = (
    "remove-initializer-inputs",
    "upgrade-opset",
    "sum-to-add",
    "remove-dropout-identity",
    "infer-shapes",
    "fold-constants",
    "remove-layout-transposes",
    "flatten-dense-to-gemm",
    "explicit-pads",
    "fuse-pad-into-conv",
    "fold-batchnorm-into-conv",
    "batchnorm-to-affine",
    "strip-trailing-softmax",
)


# Opt-in approximations for Akida (run only with --approx NAME; always reported with their deviation).
AKIDA_APPROXIMATIONS: tuple[str, ...] = ("attention-freeze",)
# Exact Akida rewrites that must follow the approximations (they clean up what those leave behind).
AKIDA_AFTER_APPROXIMATIONS: tuple[str, ...] = ("scale-to-depthwise",)
# Exact rewrites of what Akida refuses or runs in software into forms it maps (passes/akida_*.py).
AKIDA_LEGALIZE: tuple[str, ...] = (
    "dilated-conv-to-dense",
    "grouped-conv-to-dense",
    "even-kernel-to-odd",
    "strided-conv-to-stride1",
    "average-pool-to-depthwise",
    "split-padded-maxpool",
    "identity-conv-after-maxpool",
    "stage-global-average-pool",
)
# Approximations that act on the legalized graph (after every exact rewrite).
AKIDA_FINAL_APPROXIMATIONS: tuple[str, ...] = ("bound-relu",)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str  # "module:Class"
    pipeline: tuple[str, ...]
    rules: str | None = None  # "module:attribute" holding the target's lint rule table
    device_check: str | None = None  # "module:function(device) -> list[Diagnostic]" for --device
    default_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def load_backend(self):
        module_name, _, class_name = self.backend.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, class_name)()


TARGETS: dict[str, Target] = {
    "onnxruntime": Target(
        name="onnxruntime",
        description="int8 QDQ ONNX model for ONNX Runtime (static, per-channel), the reference deployment",
        backend="qanac.backends.onnxruntime:OnnxRuntimeBackend",
        pipeline=CANONICALIZE,
    ),
    "akida": Target(
        name="akida",
        description="BrainChip Akida IP v2 (.fbz through quantizeml + cnn2snn), mapped on a virtual or real device",
        backend="qanac.backends.akida.backend:AkidaBackend",
        pipeline=CANONICALIZE + AKIDA_APPROXIMATIONS + AKIDA_AFTER_APPROXIMATIONS + AKIDA_LEGALIZE
        + AKIDA_FINAL_APPROXIMATIONS,
        rules="qanac.akida_rules:AKIDA_RULES",
        device_check="qanac.akida_rules:device_findings",
    ),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UsageError(f"unknown target '{name}'", hint="targets: " + ", ".join(sorted(TARGETS))) from None
