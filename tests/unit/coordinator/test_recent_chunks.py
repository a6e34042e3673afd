"""The decoded input chunks a store holds for their next read (coordinator/recent_chunks.py)."""

from __future__ import annotations

from distinfer.coordinator.recent_chunks import RecentChunks


def test_chunks_past_the_byte_bound_go_least_recently_used_first():
    recent = RecentChunks(max_bytes=300)
    for first in (0, 100, 200):
        recent.put("j", first, f"chunk {first}", 100)
    assert recent.get("j", 0) == "chunk 0"  # now the most recently used
    recent.put("j", 300, "chunk 300", 100)
    assert [recent.get("j", first) for first in (0, 100, 200, 300)] == ["chunk 0", None, "chunk 200", "chunk 300"]


def test_a_chunk_bigger_than_the_bound_is_not_held_and_lets_nothing_go():
    recent = RecentChunks(max_bytes=300)
    recent.put("j", 0, "small", 100)
    recent.put("j", 100, "huge", 301)
    assert (recent.get("j", 0), recent.get("j", 100)) == ("small", None)


def test_forgetting_a_job_lets_go_of_its_chunks_only_and_frees_their_bytes():
    recent = RecentChunks(max_bytes=300)
    recent.put("a", 0, "a0", 100)
    recent.put("b", 0, "b0", 100)
    recent.put("a", 100, "a1", 100)
    recent.forget("a")
    assert (recent.get("a", 0), recent.get("a", 100), recent.get("b", 0)) == (None, None, "b0")
    recent.put("b", 100, "b1", 200)  # fits in the bytes "a" freed
    assert (recent.get("b", 0), recent.get("b", 100)) == ("b0", "b1")
