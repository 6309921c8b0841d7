import pytest

from qanac.diagnostics import UsageError
from qanac.zoo.registry import ModelSpec, build_model, create_model, list_models, resolve_spec


def test_qana_is_listed_with_its_variants():
    entries = {e.name: e for e in list_models()}
    assert set(entries["qana"].variants) == {"paper", "native", "v1"}
    assert entries["qana"].describe()["input_shape"] == [3, 64, 64]


def test_create_and_rebuild_from_spec():
    spec = resolve_spec("qana", "native", num_classes=3, input_size=32, width_mult=0.25)
    again = ModelSpec.from_dict(spec.to_dict())
    model = build_model(again)
    assert model.num_classes == 3 and model.input_shape == (3, 32, 32)
    assert create_model("qana").variant == "native"


@pytest.mark.parametrize("call", [lambda: create_model("nope"), lambda: create_model("qana", "v9"),
                                  lambda: create_model("qana", bogus=1),
                                  lambda: ModelSpec.from_dict({"variant": "paper"})])
def test_unknown_names_are_usage_errors(call):
    with pytest.raises(UsageError):
        call()
