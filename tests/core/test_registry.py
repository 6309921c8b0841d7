"""Pass registration: decorator, docstring rule, name clashes, --plugin files and entry points."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from qanac import registry
from qanac.diagnostics import UsageError
from qanac.registry import PassRegistrationError, PassResult, load_passes, register_pass

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_PLUGIN_DIR = REPO / "examples" / "plugin"


@pytest.fixture
def clean_registry():
    load_passes()  # registration happens once per process (at import): snapshot the full registry
    before, plugins = dict(registry._REGISTRY), set(registry._loaded_plugins)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)
    registry._loaded_plugins.clear()
    registry._loaded_plugins.update(plugins)


def test_decorator_registers_with_metadata(clean_registry):
    @register_pass("test-noop", targets=["akida"], exact=False)
    def noop(model, ctx):
        """Do nothing, for a test.

        Longer text.
        """
        return PassResult()

    info = registry.get_pass("test-noop")
    assert info.fn is noop
    assert info.summary == "Do nothing, for a test."
    assert info.serves("akida") and not info.serves("onnxruntime")
    assert not info.exact
    assert "test_registry" in info.origin


def test_pass_without_docstring_is_rejected(clean_registry):
    with pytest.raises(PassRegistrationError, match="no docstring"):

        @register_pass("test-undocumented")
        def undocumented(model, ctx):
            return PassResult()


def test_name_clash_names_both_origins(clean_registry):
    @register_pass("test-clash")
    def first(model, ctx):
        """First."""
        return PassResult()

    with pytest.raises(PassRegistrationError) as excinfo:

        @register_pass("test-clash")
        def second(model, ctx):
            """Second."""
            return PassResult()

    message = str(excinfo.value)
    assert "test-clash" in message and message.count("test_registry.py") == 2


def test_unknown_pass_lists_known_ones(clean_registry):
    registry.load_builtin_passes()
    with pytest.raises(registry.UsageError) as excinfo:
        registry.get_pass("no-such-pass")
    assert "remove-dropout-identity" in excinfo.value.hint


def test_plugin_file_registers_its_pass(clean_registry):
    registry.unregister_pass("merge-consecutive-relu")
    registry._loaded_plugins.clear()
    registry.load_plugin_file(EXAMPLE_PLUGIN_DIR / "qanac_example_plugin" / "__init__.py")
    info = registry.get_pass("merge-consecutive-relu")
    assert info.exact and "qanac_plugin" in info.origin


def test_plugin_file_that_raises_is_a_usage_error(tmp_path, clean_registry):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(registry.UsageError, match="boom"):
        registry.load_plugin_file(broken)


def test_missing_plugin_file_is_a_usage_error():
    with pytest.raises(registry.UsageError, match="not found"):
        registry.load_plugin_file("/nonexistent/plugin.py")


def write_entry_point_distribution(site: Path, module_dir: Path) -> None:
    """A minimal installed distribution declaring the example plugin under the qanac.passes group."""

    dist = site / "qanac_example_plugin-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qanac-example-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[qanac.passes]\nmerge-consecutive-relu = qanac_example_plugin\n"
    )
    (site / "qanac_example_plugin.pth").write_text(str(module_dir) + "\n")


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch, clean_registry):
    write_entry_point_distribution(tmp_path, EXAMPLE_PLUGIN_DIR)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN_DIR))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    registry.unregister_pass("merge-consecutive-relu")
    sys.modules.pop("qanac_example_plugin", None)
    names = [e.name for e in importlib.metadata.entry_points(group="qanac.passes")]
    assert "merge-consecutive-relu" in names
    loaded = registry.load_entry_point_passes()
    assert "merge-consecutive-relu" in loaded
    assert registry.get_pass("merge-consecutive-relu").origin.startswith("qanac_example_plugin")


def test_declared_pass_options_are_accepted_and_others_refused():
    from qanac.cli import _check_pass_options

    load_passes()
    pipeline = ["fold-constants", "bound-relu"]
    _check_pass_options({"bound-relu": {"percentile": 99.9, "samples": 16}}, pipeline, "akida", ("bound-relu",), ())
    with pytest.raises(UsageError, match="pass 'bound-relu' has no option 'percentil'") as caught:
        _check_pass_options({"bound-relu": {"percentil": 99.9}}, pipeline, "akida", ("bound-relu",), ())
    assert "percentile, samples" in caught.value.hint
    with pytest.raises(UsageError, match="pass 'fold-constants' has no option 'x'") as caught:
        _check_pass_options({"fold-constants": {"x": 1}}, pipeline, "akida", (), ())
    assert caught.value.hint == "fold-constants takes no options"
