"""MIG layout validation and placement, and mig-parted v1 parsing."""

from __future__ import annotations

import pytest

from shapeshifter.common.errors import InvalidArgument
from shapeshifter.hw.mig import MEMORY_SLOTS, parse_mig_parted, place_mig_layout
from shapeshifter.hw.models import GPU_MODELS
from shapeshifter.hw.types import MigProfile

P80 = GPU_MODELS["a100-80gb"].mig_profiles
P40 = GPU_MODELS["a100-40gb"].mig_profiles
H100 = GPU_MODELS["h100-80gb"].mig_profiles


def assert_valid(placements) -> None:
    used: set[int] = set()
    for pl in placements:
        assert pl.start in pl.profile.placement_starts
        slots = set(range(pl.start, pl.start + pl.profile.placement_size))
        assert not used & slots and max(slots) < MEMORY_SLOTS
        used |= slots


@pytest.mark.parametrize("profiles", [P80, H100])
def test_issue_example_fits_on_80gb_types(profiles) -> None:
    placed = place_mig_layout(profiles, ["3g.40gb", "2g.20gb", "1g.10gb"])
    assert_valid(placed)
    assert sorted(p.profile.name for p in placed) == ["1g.10gb", "2g.20gb", "3g.40gb"]


@pytest.mark.parametrize(("profiles", "layout"), [
    (P80, ["1g.10gb"] * 7),
    (P80, ["4g.40gb", "3g.40gb"]),
    (P80, ["3g.40gb", "3g.40gb"]),
    (P80, ["7g.80gb"]),
    (P80, ["1g.20gb"] * 4),
    (P80, ["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"]),
    (P40, ["1g.5gb"] * 7),
    (P40, ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"]),
    (P40, ["4g.20gb", "1g.10gb", "1g.10gb"]),
    (P80, []),
])
def test_valid_layouts_are_placed_without_overlap(profiles, layout) -> None:
    placed = place_mig_layout(profiles, layout)
    assert_valid(placed)
    assert sorted(p.profile.name for p in placed) == sorted(layout)


def test_backtracking_finds_placement_a_greedy_first_fit_would_miss() -> None:
    # First fit puts 3g at slot 0, 2g at 4, 1g at 6 and then has no start for the last 1g (a 1g
    # cannot start at slot 7). Only 3g at 4, 2g at 0 and the 1g slices at 2 and 3 work.
    placed = place_mig_layout(P80, ["1g.10gb", "3g.40gb", "1g.10gb", "2g.20gb"])
    assert_valid(placed)
    assert [(p.profile.name, p.start) for p in placed] == [
        ("2g.20gb", 0), ("1g.10gb", 2), ("1g.10gb", 3), ("3g.40gb", 4)]


def test_unknown_profile_names_it_and_lists_valid_ones() -> None:
    with pytest.raises(InvalidArgument) as e:
        place_mig_layout(P80, ["3g.40gb", "5g.50gb"])
    assert e.value.field == "profiles"
    assert "5g.50gb" in str(e.value) and "1g.10gb" in str(e.value) and "7g.80gb" in str(e.value)


def test_profile_of_another_gpu_type_is_unknown() -> None:
    with pytest.raises(InvalidArgument, match=r"1g\.5gb"):
        place_mig_layout(P80, ["1g.5gb"])


@pytest.mark.parametrize(("layout", "why"), [
    (["1g.10gb"] * 8, "at most 7"),
    (["7g.80gb", "1g.10gb"], "compute slices"),
    (["4g.40gb", "2g.20gb", "2g.20gb"], "compute slices"),
    (["3g.40gb", "3g.40gb", "1g.10gb"], "memory slots"),
    (["4g.40gb", "3g.40gb", "1g.10gb"], "compute slices"),
    (["1g.20gb"] * 3 + ["2g.20gb", "2g.20gb"], "memory slots"),
])
def test_impossible_layouts_say_why(layout, why) -> None:
    with pytest.raises(InvalidArgument) as e:
        place_mig_layout(P80, layout)
    assert e.value.field == "profiles" and why in str(e.value)


def test_overlap_only_conflict_is_reported() -> None:
    # Counts, slices and slots all fit, but both instances can only start at slot 0.
    only_at_0 = MigProfile("2g.x", slices=2, memory_mib=1, max_count=2, placement_starts=(0,),
                           placement_size=4)
    with pytest.raises(InvalidArgument, match="no non-overlapping placement") as e:
        place_mig_layout([only_at_0, P80[-1]], ["2g.x", "2g.x"])
    assert e.value.field == "profiles"


def test_no_mig_support() -> None:
    with pytest.raises(InvalidArgument, match="does not support MIG"):
        place_mig_layout([], ["1g.10gb"])
    assert place_mig_layout([], []) == []


MIG_PARTED = """
version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  mixed:
    - devices: [0, 1]
      mig-enabled: true
      mig-devices:
        "3g.40gb": 1
        "2g.20gb": 1
        "1g.10gb": 1
    - devices: [3]
      mig-enabled: false
  all-1g:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.10gb": 7}
"""


def test_parse_mig_parted_selects_config_and_leaves_others_absent() -> None:
    got = parse_mig_parted(MIG_PARTED, "mixed", 8)
    layout = ["3g.40gb", "2g.20gb", "1g.10gb"]
    assert got == {0: (True, layout), 1: (True, layout), 3: (False, [])}
    assert parse_mig_parted(MIG_PARTED, "all-1g", 2) == {i: (True, ["1g.10gb"] * 7) for i in (0, 1)}
    assert parse_mig_parted(MIG_PARTED, "all-disabled", 3) == {i: (False, []) for i in range(3)}


@pytest.mark.parametrize(("text", "config", "n", "field"), [
    ("version: v1\nmig-configs: {a: [", "a", 8, "mig_parted"),
    ("version: v2\nmig-configs: {}", "a", 8, "mig_parted.version"),
    (MIG_PARTED, "nope", 8, "config_name"),
    (MIG_PARTED, "mixed", 1, "devices"),
    ("version: v1\nmig-configs: {a: [{devices: [0, 0], mig-enabled: true}]}", "a", 8, "devices"),
    ("version: v1\nmig-configs: {a: [{devices: [-1], mig-enabled: true}]}", "a", 8, "devices"),
    ("version: v1\nmig-configs: {a: [{devices: all, mig-enabled: yes2}]}", "a", 8, "mig-enabled"),
    ("version: v1\nmig-configs: {a: [{devices: all, mig-enabled: true,"
     " mig-devices: {1g.10gb: -1}}]}", "a", 8, "mig-devices"),
    ("version: v1\nmig-configs: {a: [{devices: all, mig-enabled: true,"
     " device-filter: '0x20B010DE'}]}", "a", 8, "mig_parted"),
])
def test_parse_mig_parted_errors_name_the_field(text, config, n, field) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_mig_parted(text, config, n)
    assert e.value.field == field
    if field == "config_name":
        assert "all-disabled" in str(e.value)
