"""qanac's cache folder (qanac.cache): where it is, and that a cache never turns into an error."""

from __future__ import annotations

import numpy as np

from qanac.cache import cache_file, cache_root, load_arrays, save_arrays


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QANAC_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("QANAC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "qanac"


def test_entries_round_trip_and_differ_by_key(tmp_path, monkeypatch):
    monkeypatch.setenv("QANAC_CACHE_DIR", str(tmp_path))
    first, second = cache_file("kind", "/data/a", "8x8"), cache_file("kind", "/data/a", "16x16")
    assert first is not None and second is not None and first != second and first.parent == tmp_path / "kind"
    assert load_arrays(first) is None
    save_arrays(first, images=np.arange(6).reshape(2, 3))
    assert np.array_equal(load_arrays(first)["images"], np.arange(6).reshape(2, 3))
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary file left


def test_an_unusable_cache_means_working_without_it(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("QANAC_CACHE_DIR", str(tmp_path / "file"))
    assert cache_file("kind", "key") is None
    save_arrays(None, images=np.zeros(2))  # nothing to do, no error
    monkeypatch.setenv("QANAC_CACHE_DIR", str(tmp_path / "cache"))
    entry = cache_file("kind", "key")
    for damaged in (b"truncated", b"PK\x03\x04 a zip cut short"):
        entry.write_bytes(damaged)
        assert load_arrays(entry) is None
