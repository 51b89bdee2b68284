"""Small JSON journals in the agent's state dir, replaced atomically (write temp, fsync, rename)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nodeagent.engines.spec import InstanceSpec
from nodeagent.errors import Internal


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
