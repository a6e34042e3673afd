"""Placement rules: host-by-host ranks, biggest hosts first, slot bounds, deterministic ties, ports."""

from __future__ import annotations

import pytest

from distinfer.coordinator.placement import FreeSlot, Placement, backend_for, pick_port, place


def slots(host: str, n: int, worker_id: str | None = None, device: str = "cpu") -> list[FreeSlot]:
    return [FreeSlot(worker_id or f"w-{host}", host, i, device) for i in range(n)]


def hosts_in_rank_order(placements: list[Placement]) -> list[str]:
    return [p.host for p in sorted(placements, key=lambda p: p.rank)]


def test_ranks_are_consecutive_from_zero():
    placements = place(slots("a", 2) + slots("b", 3), min_slots=1, max_slots=0)
    assert [p.rank for p in placements] == list(range(5))


def test_slots_of_one_host_get_consecutive_ranks_even_when_registered_interleaved():
    a, b = slots("a", 2), slots("b", 2)
    free = [a[0], b[0], a[1], b[1]]
    placements = place(free, min_slots=1, max_slots=0)
    assert hosts_in_rank_order(placements) == ["a", "a", "b", "b"]


def test_local_rank_and_local_world_size_per_host():
    placements = place(slots("a", 3) + slots("b", 2), min_slots=1, max_slots=0)
    assert [(p.host, p.local_rank, p.local_world_size) for p in placements] == [
        ("a", 0, 3),
        ("a", 1, 3),
        ("a", 2, 3),
        ("b", 0, 2),
        ("b", 1, 2),
    ]


def test_host_with_more_free_slots_comes_first_and_holds_rank_zero():
    placements = place(slots("small", 1) + slots("big", 3) + slots("mid", 2), min_slots=1, max_slots=0)
    assert hosts_in_rank_order(placements) == ["big"] * 3 + ["mid"] * 2 + ["small"]
    assert placements[0].rank == 0 and placements[0].host == "big"


def test_max_slots_fills_biggest_host_first_to_span_few_hosts():
    placements = place(slots("a", 1) + slots("b", 4), min_slots=1, max_slots=3)
    assert len(placements) == 3
    assert {p.host for p in placements} == {"b"}
    assert all(p.local_world_size == 3 for p in placements)


def test_max_slots_spills_over_to_next_host_with_its_own_local_world_size():
    placements = place(slots("a", 3) + slots("b", 2), min_slots=1, max_slots=4)
    assert [(p.host, p.local_rank, p.local_world_size) for p in placements] == [
        ("a", 0, 3),
        ("a", 1, 3),
        ("a", 2, 3),
        ("b", 0, 1),
    ]


def test_max_slots_zero_takes_every_free_slot():
    free = slots("a", 2) + slots("b", 2) + slots("c", 1)
    assert len(place(free, min_slots=1, max_slots=0)) == 5


def test_max_slots_above_free_count_takes_every_free_slot():
    assert len(place(slots("a", 2), min_slots=1, max_slots=10)) == 2


def test_too_few_free_slots_gives_none():
    assert place(slots("a", 2), min_slots=3, max_slots=0) is None


def test_no_free_slots_gives_none():
    assert place([], min_slots=1, max_slots=0) is None


def test_exactly_min_slots_is_enough():
    assert len(place(slots("a", 3), min_slots=3, max_slots=3)) == 3


@pytest.mark.parametrize("min_slots", [0, -1])
def test_min_slots_below_one_is_a_value_error(min_slots):
    with pytest.raises(ValueError, match="at least one slot"):
        place(slots("a", 2), min_slots=min_slots, max_slots=0)


def test_ties_between_hosts_keep_registration_order():
    assert hosts_in_rank_order(place(slots("x", 2) + slots("y", 2), 1, 0)) == ["x", "x", "y", "y"]
    assert hosts_in_rank_order(place(slots("y", 2) + slots("x", 2), 1, 0)) == ["y", "y", "x", "x"]


def test_placement_is_deterministic_for_the_same_input():
    free = slots("a", 2) + slots("b", 3) + slots("c", 2) + slots("d", 1)
    assert place(free, 1, 5) == place(list(free), 1, 5)


def test_slots_within_a_host_are_ordered_by_worker_then_slot():
    free = [
        FreeSlot("w2", "h", 1, "cpu"),
        FreeSlot("w1", "h", 1, "cpu"),
        FreeSlot("w2", "h", 0, "cpu"),
        FreeSlot("w1", "h", 0, "cpu"),
    ]
    placements = place(free, 1, 0)
    assert [(p.worker_id, p.slot, p.local_rank) for p in placements] == [
        ("w1", 0, 0),
        ("w1", 1, 1),
        ("w2", 0, 2),
        ("w2", 1, 3),
    ]


def test_placement_carries_worker_slot_and_device():
    free = [FreeSlot("w-gpu", "g", 0, "cuda:0"), FreeSlot("w-gpu", "g", 1, "cuda:1")]
    placements = place(free, 1, 0)
    assert [(p.worker_id, p.slot, p.device) for p in placements] == [
        ("w-gpu", 0, "cuda:0"),
        ("w-gpu", 1, "cuda:1"),
    ]


def test_each_free_slot_is_used_at_most_once():
    free = slots("a", 3) + slots("b", 3) + slots("c", 2)
    placements = place(free, 1, 0)
    keys = [(p.worker_id, p.slot) for p in placements]
    assert len(keys) == len(set(keys)) == len(free)


def test_nccl_when_every_device_is_cuda():
    assert backend_for(place(slots("a", 2, device="cuda:0") + slots("b", 1, device="cuda"), 1, 0)) == "nccl"


def test_gloo_when_any_device_is_cpu():
    free = slots("a", 2, device="cuda:0") + slots("b", 1, device="cpu")
    assert backend_for(place(free, 1, 0)) == "gloo"


def test_gloo_when_all_devices_are_cpu():
    assert backend_for(place(slots("a", 2), 1, 0)) == "gloo"


def test_gloo_for_no_placements():
    assert backend_for([]) == "gloo"


def test_pick_port_goes_round_the_range_after_the_last_port_handed_out():
    assert pick_port(29500, 29502, set(), after=29500) == 29501
    assert pick_port(29500, 29502, set(), after=29502) == 29500  # wraps
    assert pick_port(29500, 29502, {29501}, after=29500) == 29502
    assert pick_port(29500, 29502, {29501, 29502}, after=29500) == 29500
    assert pick_port(29500, 29502, set(), after=1234) == 29500  # outside the range: start at the bottom


def test_pick_port_gives_lowest_port_of_the_range():
    assert pick_port(29500, 29510, set()) == 29500


def test_pick_port_skips_ports_in_use():
    assert pick_port(29500, 29510, {29500, 29501, 29503}) == 29502


def test_pick_port_range_is_inclusive_of_its_upper_end():
    assert pick_port(29500, 29502, {29500, 29501}) == 29502


def test_pick_port_none_when_every_port_is_taken():
    assert pick_port(29500, 29502, {29500, 29501, 29502}) is None


def test_pick_port_ignores_in_use_ports_outside_the_range():
    assert pick_port(29500, 29500, {1, 29499, 29501}) == 29500


def test_tensor_parallel_groups_never_straddle_hosts():
    free = slots("a", 3) + slots("b", 2) + slots("c", 1)
    placements = place(free, min_slots=2, max_slots=0, group=2)
    by_rank = [(p.host, p.local_rank) for p in placements]
    # a gives 2 of its 3 slots, b gives 2, c's lone slot cannot hold a group: 4 ranks, groups [0,1] and [2,3]
    assert by_rank == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for group_start in range(0, len(placements), 2):
        assert placements[group_start].host == placements[group_start + 1].host


def test_tensor_parallel_job_waits_when_no_host_has_a_whole_group():
    assert place(slots("a", 1) + slots("b", 1), min_slots=2, max_slots=2, group=2) is None


def test_slot_counts_must_be_whole_groups():
    with pytest.raises(ValueError, match="groups of 2"):
        place(slots("a", 4), min_slots=3, max_slots=0, group=2)
