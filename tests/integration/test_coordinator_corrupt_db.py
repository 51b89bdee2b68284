"""A corrupt coordinator database stops the start with a message naming the file, and the file
is left as it was (never reset): the documented choice in README §Operation."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import console_script, free_port
from tests.integration.coordinator_proc import start_coordinator

TOPOLOGY = {"version": 1, "sites": [{
    "name": "s1", "aisles": [{"name": "a1", "aisle_airflow_cfm": 5000}],
    "rows": [{"name": "r1", "row_power_limit_w": 20000, "racks": [{"name": "k1", "aisle": "a1"}]}],
}]}


def _start(workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*console_script("coordinator"), "--listen", f"127.0.0.1:{free_port()}", "--topology",
         str(workdir / "topology.yaml"), "--db", str(workdir / "c.db")],
        capture_output=True, text=True, timeout=60)


def _used_db(workdir: Path) -> Path:
    """A database a real coordinator wrote (epoch, audit) and closed."""
    (workdir / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    start_coordinator(workdir, free_port()).stop(signal.SIGTERM)
    db = workdir / "c.db"
    with sqlite3.connect(db) as conn:  # fold the WAL into the file, as a clean stop leaves it
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert conn.execute("PRAGMA page_count").fetchone()[0] > 2
    return db


@pytest.mark.parametrize("damage", ["garbage", "torn_page"])
def test_corrupt_database_refuses_the_start_and_is_left_untouched(tmp_path: Path,
                                                                  damage: str) -> None:
    db = _used_db(tmp_path)
    data = bytearray(db.read_bytes())
    if damage == "garbage":
        data[:] = b"this is not a database" * 100
    else:  # a page overwritten mid-file: the header is fine, the b-tree is not
        page = int.from_bytes(data[16:18], "big") or 65536
        data[page + 8:2 * page] = b"\xff" * (page - 8)
    db.write_bytes(bytes(data))
    for wal in (tmp_path / "c.db-wal", tmp_path / "c.db-shm"):
        wal.unlink(missing_ok=True)

    out = _start(tmp_path)
    assert out.returncode != 0
    (message,) = [line for line in out.stderr.splitlines() if line.startswith("coordinator:")]
    assert str(db) in message and "unusable" in message and "last good copy" in message, message
    assert db.read_bytes() == bytes(data)  # not reset, not repaired behind the operator's back
