"""The zoo's model registry: name -> factory, variants, default input and classes, description.

``qanac zoo list`` shows :func:`list_models`; ``qanac zoo export/train`` build models with
:func:`create_model`. A model is fully described by a :class:`ModelSpec` (name, variant, keyword
arguments), which is what a training run stores in its config.json so the checkpoint can be rebuilt
with :func:`build_model`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from qanac.diagnostics import UsageError
from qanac.zoo import qana, qana_v1
from qanac.zoo.qat import QATConfig


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[..., nn.Module]
    variants: dict[str, str]  # variant -> one-line description
    default_variant: str
    input_size: int
    num_classes: int
    description: str
    qat: dict[str, Callable[[], QATConfig]] = dataclasses.field(default_factory=dict)  # variant -> its QAT recipe

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "variants": dict(self.variants),
            "default_variant": self.default_variant,
            "input_shape": [3, self.input_size, self.input_size],
            "num_classes": self.num_classes,
        }


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a zoo model: registry name, variant, and factory keyword arguments."""

    name: str
    variant: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "variant": self.variant, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        try:
            return cls(name=data["name"], variant=data["variant"], kwargs=dict(data.get("kwargs", {})))
        except KeyError as exc:
            raise UsageError(f"model spec lacks {exc}; expected name, variant and kwargs") from exc


_REGISTRY: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"zoo model {entry.name!r} is already registered")
    if entry.default_variant not in entry.variants:
        raise ValueError(f"default variant {entry.default_variant!r} is not among {sorted(entry.variants)}")
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[ZooEntry]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_entry(name: str) -> ZooEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown zoo model {name!r}", hint=f"available: {', '.join(sorted(_REGISTRY)) or '(none)'}"
        ) from None


def resolve_spec(
    name: str,
    variant: str | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
    **kwargs: Any,
) -> ModelSpec:
    """Fill in the registry defaults for a model request and check the variant."""

    entry = get_entry(name)
    variant = variant or entry.default_variant
    if variant not in entry.variants:
        raise UsageError(
            f"model {name!r} has no variant {variant!r}", hint=f"variants: {', '.join(entry.variants)}"
        )
    full = {"num_classes": num_classes or entry.num_classes, "input_size": input_size or entry.input_size}
    full.update(kwargs)
    return ModelSpec(name=name, variant=variant, kwargs=full)


def build_model(spec: ModelSpec) -> nn.Module:
    entry = get_entry(spec.name)
    if spec.variant not in entry.variants:
        raise UsageError(f"model {spec.name!r} has no variant {spec.variant!r}")
    try:
        return entry.factory(variant=spec.variant, **spec.kwargs)
    except TypeError as exc:
        raise UsageError(f"bad options for zoo model {spec.name!r}: {exc}") from exc


def qat_config(spec: ModelSpec) -> QATConfig:
    """The quantization-aware training recipe of a model's variant: its target's, or 8-bit Akida v2's."""

    return get_entry(spec.name).qat.get(spec.variant, QATConfig.akida_v2)()


def create_model(name: str, variant: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model with its defaults; keyword arguments go to the factory."""

    return build_model(resolve_spec(name, variant, **kwargs))


def _qana(variant: str, **kwargs: Any) -> nn.Module:
    return qana_v1.qana_v1(variant, **kwargs) if variant == "v1" else qana.qana(variant, **kwargs)


register(
    ZooEntry(
        name="qana",
        factory=_qana,
        variants={
            "paper": "the QANA paper's network (Ghost + sigmoid spatial gate + SE); runs in float only",
            "native": "Akida IP v2 native: Ghost blocks, additive context branch with fused max pooling, "
                      "Clip(0,1) spike + GAP; one hardware sequence",
            "v1": "Akida IP v1 (AKD1000) native: sequential separable convs with ReLU6 and max pooling, 1-bit "
                  "spike map flattened into the classifier; 4-bit QAT of the v1 recipe",
        },
        default_variant="native",
        input_size=qana.DEFAULT_INPUT_SIZE,
        num_classes=qana.DEFAULT_NUM_CLASSES,
        description="Quantization-Aware Neuromorphic Architecture for skin-lesion classification (HAM10000)",
        qat={"v1": QATConfig.akida_v1},
    )
)
