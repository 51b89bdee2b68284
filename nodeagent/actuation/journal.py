"""The actuation journal: one JSON file in the state dir, replaced atomically on every change.

Per GPU it keeps the defaults found at the FIRST start (never overwritten later: after a kill -9
the device may still carry our changes) and the currently requested settings, plus the newest
plan epoch seen. A corrupt file stops the agent: silently resetting it would lose the defaults.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from shapeshifter.common.atomic import atomic_write
from shapeshifter.common.errors import Internal

FILE_NAME = "journal.json"
FORMAT_VERSION = 1


class JournalError(Exception):
    """The journal file exists but cannot be used; the message names the file."""


@dataclass(frozen=True)
class GpuDefaults:
    uuid: str
    power_limit_w: float
    mig_enabled: bool
    mig_profiles: tuple[str, ...] = ()


@dataclass(frozen=True)
class GpuRequested:
    """What the agent was asked to hold on a GPU; None = not changed by the agent."""

    power_limit_w: float | None = None
    clock_lock_mhz: tuple[int, int] | None = None
    mig_enabled: bool | None = None
    mig_profiles: tuple[str, ...] | None = None

    @property
    def empty(self) -> bool:
        return self == GpuRequested()


@dataclass
class _JournalState:
    defaults: dict[int, GpuDefaults] = field(default_factory=dict)
    requested: dict[int, GpuRequested] = field(default_factory=dict)
    epoch_seen: int = 0


class Journal:
    """Thread-safe; every mutation is written to disk before it returns."""

    def __init__(self, path: Path, state: _JournalState) -> None:
        self.path = path
        self._state = state
        self._lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path) -> Journal:
        """Load the journal from state_dir (created when absent). Raises JournalError."""
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create state dir {state_dir}: {exc.strerror}") from None
        path = state_dir / FILE_NAME
        if not path.exists():
            return cls(path, _JournalState())
        try:
            return cls(path, _decode(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise JournalError(
                f"journal {path} is corrupt ({exc}); it holds the GPUs' original settings, so the "
                "agent will not start over it: inspect it, restore the GPUs by hand "
                "(nvidia-smi -rgc / -pl) and remove the file"
            ) from None

    # ------------------------------------------------------------------ reads
    @property
    def epoch_seen(self) -> int:
        return self._state.epoch_seen

    def defaults(self, index: int) -> GpuDefaults | None:
        return self._state.defaults.get(index)

    def requested(self, index: int) -> GpuRequested:
        return self._state.requested.get(index, GpuRequested())

    # ------------------------------------------------------------------ writes
    def record_defaults(
        self, index: int, defaults: GpuDefaults, *, replace_existing: bool = False
    ) -> bool:
        """Save a GPU's defaults unless some are already saved. Returns True when written."""
        with self._lock:
            if index in self._state.defaults and not replace_existing:
                return False
            new = self._copy()
            new.defaults[index] = defaults
            if replace_existing:
                new.requested.pop(index, None)
            self._commit(new)
            return True

    def update_requested(self, index: int, **changes: Any) -> GpuRequested:
        """Merge changes into a GPU's requested settings (pass None to forget one)."""
        with self._lock:
            current = self.requested(index)
            updated = replace(current, **changes)
            if updated == current:
                return current
            new = self._copy()
            if updated.empty:
                new.requested.pop(index, None)
            else:
                new.requested[index] = updated
            self._commit(new)
            return updated

    def note_epoch(self, epoch: int) -> None:
        with self._lock:
            if epoch > self._state.epoch_seen:
                new = self._copy()
                new.epoch_seen = epoch
                self._commit(new)

    def _copy(self) -> _JournalState:
        s = self._state
        return _JournalState(dict(s.defaults), dict(s.requested), s.epoch_seen)

    def _commit(self, new: _JournalState) -> None:
        """Write the new state, then adopt it: after a failed write memory still matches disk."""
        data = json.dumps(_encode(new), indent=2, sort_keys=True).encode()
        try:
            self._write_file(data)
        except OSError as exc:
            raise Internal(f"cannot write journal {self.path}: {exc.strerror or exc}") from exc
        self._state = new

    def _write_file(self, data: bytes) -> None:
        """All or nothing on a crash (shapeshifter.common.atomic)."""
        with atomic_write(self.path, "wb") as fh:
            fh.write(data)


def _encode(state: _JournalState) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "epoch_seen": state.epoch_seen,
        "defaults": {str(i): asdict(d) for i, d in state.defaults.items()},
        "requested": {str(i): asdict(r) for i, r in state.requested.items()},
    }


def _decode(data: dict[str, Any]) -> _JournalState:
    if not isinstance(data, dict):
        raise ValueError("the top level is not an object")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown format version {data.get('version')!r}")
    defaults = {
        int(i): GpuDefaults(
            uuid=str(d["uuid"]),
            power_limit_w=float(d["power_limit_w"]),
            mig_enabled=bool(d["mig_enabled"]),
            mig_profiles=tuple(d["mig_profiles"]),
        )
        for i, d in data["defaults"].items()
    }
    requested = {int(i): _decode_requested(r) for i, r in data["requested"].items()}
    return _JournalState(defaults=defaults, requested=requested, epoch_seen=int(data["epoch_seen"]))


def _decode_requested(r: dict[str, Any]) -> GpuRequested:
    lock = r.get("clock_lock_mhz")
    profiles = r.get("mig_profiles")
    return GpuRequested(
        power_limit_w=None if r.get("power_limit_w") is None else float(r["power_limit_w"]),
        clock_lock_mhz=None if lock is None else (int(lock[0]), int(lock[1])),
        mig_enabled=r.get("mig_enabled"),
        mig_profiles=None if profiles is None else tuple(profiles),
    )
