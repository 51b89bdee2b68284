"""MIG layouts: validate a list of profile names against a device's profiles and place them.

Also parses mig-parted v1 YAML so operators can reuse their files. Pure functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from shapeshifter.common.errors import InvalidArgument
from shapeshifter.hw.types import MigProfile

MEMORY_SLOTS = 8
_FIELD = "profiles"


@dataclass(frozen=True)
class MigPlacement:
    profile: MigProfile
    start: int  # first memory slot


def place_mig_layout(available: Sequence[MigProfile], names: Sequence[str]) -> list[MigPlacement]:
    """Non-overlapping placements for the requested profiles, ordered by start slot.

    Raises InvalidArgument(field="profiles") naming an unknown profile (and the valid ones) or
    saying why the layout cannot fit. An empty list is valid (no instances).
    """
    by_name = {p.name: p for p in available}
    if not by_name and names:
        raise InvalidArgument("profiles: this GPU does not support MIG", field=_FIELD)
    unknown = sorted({n for n in names if n not in by_name})
    if unknown:
        raise InvalidArgument(
            f"profiles: unknown MIG profile {', '.join(unknown)}; valid: {', '.join(by_name)}",
            field=_FIELD)
    wanted = [by_name[n] for n in names]
    _check_counts(wanted, available)
    # Largest first: big slices have the fewest valid starts, so they constrain the search most.
    order = sorted(wanted, key=lambda p: (-p.placement_size, -p.slices, p.name))
    placed = _backtrack(order, [False] * MEMORY_SLOTS, [])
    if placed is None:
        raise InvalidArgument(
            f"profiles: no non-overlapping placement exists for {list(names)}", field=_FIELD)
    return sorted(placed, key=lambda pl: pl.start)


def _check_counts(wanted: list[MigProfile], available: Sequence[MigProfile]) -> None:
    for name, count in Counter(p.name for p in wanted).items():
        profile = next(p for p in wanted if p.name == name)
        if count > profile.max_count:
            raise InvalidArgument(
                f"profiles: {count} x {name} requested, at most {profile.max_count} fit on one GPU",
                field=_FIELD)
    max_slices = max((p.slices for p in available), default=0)
    slices = sum(p.slices for p in wanted)
    if slices > max_slices:
        raise InvalidArgument(
            f"profiles: layout needs {slices} compute slices, the GPU has {max_slices}",
            field=_FIELD)
    slots = sum(p.placement_size for p in wanted)
    if slots > MEMORY_SLOTS:
        raise InvalidArgument(
            f"profiles: layout needs {slots} memory slots, the GPU has {MEMORY_SLOTS}",
            field=_FIELD)


def _backtrack(todo: list[MigProfile], used: list[bool],
               placed: list[MigPlacement]) -> list[MigPlacement] | None:
    if not todo:
        return list(placed)
    profile, rest = todo[0], todo[1:]
    for start in profile.placement_starts:
        slots = range(start, start + profile.placement_size)
        if slots.stop > MEMORY_SLOTS or any(used[s] for s in slots):
            continue
        for s in slots:
            used[s] = True
        placed.append(MigPlacement(profile, start))
        found = _backtrack(rest, used, placed)
        placed.pop()
        for s in slots:
            used[s] = False
        if found is not None:
            return found
    return None


def parse_mig_parted(yaml_text: str, config_name: str,
                     n_gpus: int) -> dict[int, tuple[bool, list[str]]]:
    """Parse a mig-parted v1 file and select one config: {gpu_index: (mig_enabled, profiles)}.

    GPUs the config does not list are absent (they stay unchanged). Profile names are not checked
    here; place_mig_layout checks them against each GPU's own profiles.
    """
    try:
        doc = yaml.safe_load(yaml_text)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"mig_parted: not valid YAML: {e}", field="mig_parted") from None
    if not isinstance(doc, dict) or doc.get("version") != "v1":
        raise InvalidArgument("mig_parted.version: must be 'v1'", field="mig_parted.version")
    configs = doc.get("mig-configs")
    if not isinstance(configs, dict):
        raise InvalidArgument("mig_parted.mig-configs: must be a mapping of config names",
                              field="mig_parted.mig-configs")
    if config_name not in configs:
        valid = ", ".join(map(str, configs))
        raise InvalidArgument(f"config_name: {config_name!r} is not in the file; valid: {valid}",
                              field="config_name")
    entries = configs[config_name]
    if not isinstance(entries, list):
        raise InvalidArgument(f"mig_parted.mig-configs.{config_name}: must be a list",
                              field="mig_parted.mig-configs")
    result: dict[int, tuple[bool, list[str]]] = {}
    for entry in entries:
        enabled, profiles, indices = _parse_entry(entry, n_gpus)
        for index in indices:
            if index in result:
                raise InvalidArgument(f"devices: GPU {index} is listed twice in {config_name!r}",
                                      field="devices")
            result[index] = (enabled, list(profiles))
    return result


_ENTRY_KEYS = {"devices", "mig-enabled", "mig-devices"}


def _parse_entry(entry: object, n_gpus: int) -> tuple[bool, list[str], list[int]]:
    if not isinstance(entry, dict):
        raise InvalidArgument("mig_parted: each config entry must be a mapping", field="mig_parted")
    extra = sorted(set(entry) - _ENTRY_KEYS)  # e.g. device-filter: refused rather than ignored
    if extra:
        raise InvalidArgument(f"mig_parted: unsupported key(s) {', '.join(map(str, extra))}; "
                              f"supported: {', '.join(sorted(_ENTRY_KEYS))}", field="mig_parted")
    enabled = entry.get("mig-enabled")
    if not isinstance(enabled, bool):
        raise InvalidArgument("mig-enabled: must be true or false", field="mig-enabled")
    return enabled, _parse_mig_devices(entry.get("mig-devices") or {}, enabled), \
        _parse_devices(entry.get("devices"), n_gpus)


def _parse_devices(devices: object, n_gpus: int) -> list[int]:
    if devices == "all":
        return list(range(n_gpus))
    if not isinstance(devices, list) or not devices:
        raise InvalidArgument("devices: must be 'all' or a non-empty list of GPU indices",
                              field="devices")
    for index in devices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_gpus:
            raise InvalidArgument(
                f"devices: {index!r} is not a GPU index in [0, {n_gpus - 1}]", field="devices")
    return list(devices)


def _parse_mig_devices(mig_devices: object, enabled: bool) -> list[str]:
    if not isinstance(mig_devices, dict):
        raise InvalidArgument("mig-devices: must map profile names to counts", field="mig-devices")
    if mig_devices and not enabled:
        raise InvalidArgument("mig-devices: must be empty when mig-enabled is false",
                              field="mig-devices")
    profiles: list[str] = []
    for name, count in mig_devices.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidArgument(f"mig-devices: count for {name!r} must be an integer >= 0",
                                  field="mig-devices")
        profiles.extend([str(name)] * count)
    return profiles
