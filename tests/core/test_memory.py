"""qanac.memory: cycles made inside ``collecting_discarded_copies`` are collected while the block runs,
whatever the process held before it, and the collector is left as it was found."""

from __future__ import annotations

import gc

import pytest

from qanac import memory


class Copy:
    """A discarded model copy in miniature: nodes in a reference cycle, freed only by a full collection."""

    def __init__(self, nodes: int = 10_000):
        self.nodes = [{"graph": self} for _ in range(nodes)]


def _alive_per_copy(copies: int = 30) -> list[int]:
    """Make ``copies`` cyclic copies, each while the one before is still held, which is dropped once the
    next exists (as a library's transforms do: held across young collections, a copy is promoted to the
    old generation), counting before each the copies alive: the one held and those dropped but not yet
    collected."""

    counts, current = [], Copy()
    for _ in range(copies):
        counts.append(sum(type(o) is Copy for o in gc.get_objects()))
        current = Copy() if current else None
    return counts


@pytest.mark.parametrize("held", [0, 1_000_000], ids=["small-heap", "large-heap"])
def test_copies_made_in_the_block_are_collected_as_it_runs(held):
    alive = [[] for _ in range(held)]  # survivors of a full collection raise CPython's bar for the next
    gc.collect()
    with memory.collecting_discarded_copies():
        counts = _alive_per_copy()
    del alive
    assert max(counts) <= 3, counts  # the copy in use, the one being made, at most one dropped


def test_without_the_block_a_large_heap_keeps_the_copies():
    alive = [[] for _ in range(1_000_000)]
    gc.collect()
    counts = _alive_per_copy()
    del alive
    gc.collect()
    assert max(counts) > 10, counts  # the control: what the block prevents


def test_the_collector_is_left_as_found_error_or_not():
    threshold = gc.get_threshold()
    with pytest.raises(RuntimeError), memory.collecting_discarded_copies():
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[1:] == (1, 1)
        raise RuntimeError("a failing step")
    assert gc.get_threshold() == threshold
    assert gc.get_freeze_count() == 0


def test_a_block_inside_another_keeps_the_outer_block_frozen():
    with memory.collecting_discarded_copies():
        with memory.collecting_discarded_copies():
            pass
        # an inner block that acted would have unfrozen everything (frozen objects that die leave the count,
        # so it is not constant) and restored the thresholds
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[1:] == (1, 1)
    assert gc.get_freeze_count() == 0


def test_freed_heap_is_returned_on_entry_and_exit(monkeypatch):
    # glibc keeps what earlier steps freed (a dropped ONNX Runtime session, say): returned before the block
    # so that its peak starts from what is in use, and after it
    trims = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: trims.append(pad))
    with memory.collecting_discarded_copies():
        assert trims == [0]
    assert trims == [0, 0]
