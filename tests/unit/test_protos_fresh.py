"""The committed protobuf modules must match what scripts/gen_protos.sh makes from proto/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# protoc stamps its own version into the header; a different grpcio-tools patch release must not
# make the check fail when the descriptors themselves are identical.
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version:.*|\s*\d+,\s*$|.*_runtime_version\..*"
    r"|GRPC_GENERATED_VERSION = .*)$", re.M
)


def _normalise(text: str) -> str:
    return _VERSION_LINES.sub("", text)


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "gen_protos.sh produced no modules"
    stale = [
        str(rel)
        for rel in generated
        if _normalise((tmp_path / rel).read_text()) != _normalise((ROOT / rel).read_text())
    ]
    assert not stale, f"stale generated modules (run scripts/gen_protos.sh): {stale}"
