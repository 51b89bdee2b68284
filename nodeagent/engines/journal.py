"""Small JSON journals in the agent's state dir, replaced atomically (common.atomic)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nodeagent.engines.spec import InstanceSpec
from shapeshifter.common.atomic import atomic_write
from shapeshifter.common.errors import Internal


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path, make_parents=True) as f:
        json.dump(data, f, indent=1, sort_keys=True)


def read_json(path: Path) -> Any | None:
    """The file's content, None when absent; Internal when corrupt (never silently reset)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise Internal(f"journal {path} is unreadable: {exc}") from exc


def spec_to_json(spec: InstanceSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["env"] = dict(spec.env)
    return data


def spec_from_json(data: dict[str, Any]) -> InstanceSpec:
    return InstanceSpec(
        **{**data, "devices": tuple(data["devices"]), "extra_args": tuple(data["extra_args"])}
    )
