from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodeagent.actuation.journal import GpuDefaults, Journal, JournalError
from shapeshifter.common.errors import Internal

DEFAULTS = GpuDefaults(uuid="GPU-a", power_limit_w=700.0, mig_enabled=False)


def test_round_trip_and_first_start_defaults_kept(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    assert j.record_defaults(0, DEFAULTS)
    j.update_requested(0, power_limit_w=350.0, clock_lock_mhz=(900, 1200))
    j.note_epoch(5)
    j.note_epoch(3)  # never goes back

    again = Journal.open(tmp_path)
    assert not again.record_defaults(0, GpuDefaults("GPU-a", 350.0, True))  # not overwritten
    assert again.defaults(0) == DEFAULTS
    assert again.requested(0).power_limit_w == 350.0
    assert again.requested(0).clock_lock_mhz == (900, 1200)
    assert again.epoch_seen == 5


def test_replacing_defaults_forgets_requests(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.record_defaults(0, DEFAULTS)
    j.update_requested(0, power_limit_w=300.0)
    j.record_defaults(0, GpuDefaults("GPU-b", 400.0, False), replace_existing=True)
    assert j.requested(0).empty and j.defaults(0).uuid == "GPU-b"


def test_cleared_requests_disappear_from_file(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.update_requested(1, mig_enabled=True, mig_profiles=("3g.40gb",))
    j.update_requested(1, mig_enabled=None, mig_profiles=None)
    assert json.loads((tmp_path / "journal.json").read_text())["requested"] == {}


def test_write_is_atomic_no_temp_files_left(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    for w in (300.0, 310.0, 320.0):
        j.update_requested(0, power_limit_w=w)
    assert [p.name for p in tmp_path.iterdir()] == ["journal.json"]


@pytest.mark.parametrize("content", ["{not json", '{"version": 9}', '{"version": 1}', "[]"])
def test_corrupt_journal_is_refused_naming_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "journal.json").write_text(content)
    with pytest.raises(JournalError, match=str(tmp_path / "journal.json")):
        Journal.open(tmp_path)
    assert (tmp_path / "journal.json").read_text() == content


def test_write_failure_is_an_internal_error_naming_the_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    j = Journal.open(state)
    j.update_requested(0, power_limit_w=300.0)
    state.rename(tmp_path / "moved")  # the state dir vanishes under the agent
    with pytest.raises(Internal, match=f"cannot write journal {state / 'journal.json'}"):
        j.update_requested(0, power_limit_w=310.0)
    assert j.requested(0).power_limit_w == 300.0  # memory still matches the disk
    assert Journal.open(tmp_path / "moved").requested(0).power_limit_w == 300.0
