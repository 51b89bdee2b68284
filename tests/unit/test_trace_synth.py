"""`shapectl trace synth` and simulator/synth.py: deterministic, loadable by both trace readers,
the requested mix, rate and burstiness, bad input refused naming the field with nothing written."""

from __future__ import annotations

import itertools
import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.profiles.classes import class_shares, read_azure_trace
from shapectl.cli import main
from shapeshifter.common.errors import InvalidArgument
from simulator.inputs import synth
from simulator.inputs.trace import load_trace

AZURE_CONV = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure-llm-2023" / \
    "AzureLLMInferenceTrace_conv.csv"
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{7}$")


def _shares(spec: synth.SynthSpec) -> dict[str, float]:
    return synth.summarize(spec, synth.generate(spec))["class_shares"]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    spec = synth.SynthSpec(duration_s=600, rate_rps=4.0, burstiness=0.5, seed=7)
    paths = [tmp_path / f"{i}.csv" for i in range(3)]
    synth.write_csv(spec, paths[0])
    synth.write_csv(spec, paths[1])
    synth.write_csv(synth.SynthSpec(duration_s=600, rate_rps=4.0, burstiness=0.5, seed=8),
                    paths[2])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_the_csv_has_the_azure_schema_and_both_readers_load_it(tmp_path: Path) -> None:
    spec = synth.SynthSpec(duration_s=600, rate_rps=4.0, seed=7)
    out = tmp_path / "t.csv"
    synth.write_csv(spec, out)
    lines = out.read_text().splitlines()
    assert lines[0] == "TIMESTAMP,ContextTokens,GeneratedTokens"
    assert all(STAMP.match(line.split(",")[0]) for line in lines[1:])
    assert lines[1].startswith("2023-11-16 00:0")
    reqs = read_azure_trace(out)
    rows = synth.generate(spec)
    assert len(reqs) == len(rows.arrival_s) > 2000
    assert all(x.arrival_s <= y.arrival_s for x, y in itertools.pairwise(reqs))
    epoch_s = datetime(2023, 11, 16, tzinfo=UTC).timestamp()
    assert np.allclose([r.arrival_s - epoch_s for r in reqs], rows.arrival_s, atol=1e-6)
    assert [r.prompt_tokens for r in reqs] == rows.prompt_tokens.tolist()
    assert load_trace(out).mean_rate_rps == pytest.approx(4.0, rel=0.1)


def test_timestamps_carry_into_the_next_second_and_honour_start() -> None:
    stamps = synth.timestamps(np.array([0.0, 0.99999999, 59.999999996, 86399.5]))
    assert stamps == ["2023-11-16 00:00:00.0000000", "2023-11-16 00:00:01.0000000",
                      "2023-11-16 00:01:00.0000000", "2023-11-16 23:59:59.5000000"]
    start = datetime(2024, 2, 28, 23, 59, 59, 250000, tzinfo=UTC)
    assert synth.timestamps(np.array([1.0]), start) == ["2024-02-29 00:00:00.2500000"]


def test_the_mix_and_the_rate_are_what_was_asked() -> None:
    spec = synth.SynthSpec(duration_s=1200, rate_rps=4.0, mix=(0.1, 0.2, 0.3, 0.4), seed=1)
    rows = synth.generate(spec)
    summary = synth.summarize(spec, rows)
    assert 4000 < summary["requests"] < 5600
    assert summary["mean_rate_rps"] == pytest.approx(4.0, rel=0.05)
    for name, want in zip(synth.CLASSES, spec.mix, strict=True):
        assert summary["class_shares"][name] == pytest.approx(want, abs=0.025)
    assert rows.prompt_tokens.min() >= 1 and rows.prompt_tokens.max() <= 8192
    assert rows.output_tokens.min() >= 1 and rows.output_tokens.max() <= 4096
    small_prompts = rows.prompt_tokens[rows.prompt_tokens <= 500]
    assert np.median(small_prompts) == pytest.approx(150, rel=0.1)


def test_the_default_mix_is_the_conversation_traces() -> None:
    assert synth.SynthSpec().mix == pytest.approx(synth.CONVERSATION_MIX)
    measured_mix = synth.CONVERSATION_MIX
    assert measured_mix == pytest.approx((0.394, 0.0005, 0.574, 0.032), abs=5e-4)
    shares = _shares(synth.SynthSpec(duration_s=1800, rate_rps=3.0, seed=2))
    for name, want in zip(synth.CLASSES, synth.CONVERSATION_MIX, strict=True):
        assert shares[name] == pytest.approx(want, abs=0.02)


@pytest.mark.skipif(not AZURE_CONV.is_file(), reason=f"{AZURE_CONV} is absent")
def test_the_hard_coded_mix_matches_the_azure_file() -> None:
    measured = class_shares(read_azure_trace(AZURE_CONV))
    assert tuple(measured.values()) == pytest.approx(synth.CONVERSATION_MIX, abs=1e-9)


def test_burstiness_sets_the_per_minute_variation() -> None:
    def cv(burstiness: float) -> float:
        spec = synth.SynthSpec(duration_s=28_800, rate_rps=2.0, burstiness=burstiness, seed=3)
        return synth.summarize(spec, synth.generate(spec))["per_minute_cv"]

    poisson = 1 / math.sqrt(60 * 2.0)
    assert cv(0.0) == pytest.approx(poisson, rel=0.15)
    bursty = cv(1.0)
    assert bursty > 5 * poisson
    assert bursty == pytest.approx(1.0, abs=0.35)


def test_burstiness_keeps_the_mean_rate() -> None:
    rates = [synth.summarize(s, synth.generate(s))["mean_rate_rps"] for s in (
        synth.SynthSpec(duration_s=28_800, rate_rps=2.0, burstiness=1.0, seed=k)
        for k in range(4))]
    assert np.mean(rates) == pytest.approx(2.0, rel=0.15)


def test_diurnal_modulation_follows_the_sine() -> None:
    spec = synth.SynthSpec(duration_s=7200, rate_rps=5.0, diurnal_amplitude=0.8,
                           diurnal_period_s=3600, seed=4)
    t_s = synth.generate(spec).arrival_s
    crest = np.count_nonzero((t_s % 3600) < 1800)  # sin > 0
    assert crest / len(t_s) == pytest.approx(0.5 + 0.8 / math.pi, abs=0.03)


def test_a_mix_off_by_less_than_the_tolerance_is_normalised() -> None:
    spec = synth.SynthSpec(mix=(0.25, 0.25, 0.25, 0.25 + 5e-7))
    assert sum(spec.mix) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(InvalidArgument) as err:
        synth.SynthSpec(mix=(0.25, 0.25, 0.25, 0.25 + 1e-5))
    assert err.value.field == "mix"


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"rate_rps": 0.0}, "rate_rps", "[0.01, 10000]"),
    ({"rate_rps": 20_000.0}, "rate_rps", "[0.01, 10000]"),
    ({"rate_rps": math.nan}, "rate_rps", "[0.01, 10000]"),
    ({"duration_s": 10.0}, "duration_s", "[60, 172800]"),
    ({"duration_s": 200_000.0}, "duration_s", "[60, 172800]"),
    ({"mix": (0.5, 0.5, 0.5, 0.0)}, "mix", "sum to 1"),
    ({"mix": (-0.1, 0.6, 0.5, 0.0)}, "mix.siso", "[0, 1]"),
    ({"mix": (0.5, 0.5)}, "mix", "4 shares"),
    ({"burstiness": 11.0}, "burstiness", "[0, 10]"),
    ({"burstiness": -0.5}, "burstiness", "[0, 10]"),
    ({"burst_period_s": 5.0}, "burst_period_s", "[10, 86400]"),
    ({"diurnal_amplitude": 1.5}, "diurnal_amplitude", "[0, 1]"),
    ({"diurnal_period_s": 30.0}, "diurnal_period_s", "[60, 604800]"),
    ({"seed": -1}, "seed", "[0, 2^63)"),
    ({"rate_rps": 1000.0, "duration_s": 86_400.0}, "rate_rps", "20,000,000"),
]


@pytest.mark.parametrize(("fields", "field", "allowed"), BAD)
def test_bad_specs_are_refused_naming_the_field_and_range(
        tmp_path: Path, fields: dict[str, Any], field: str, allowed: str) -> None:
    out = tmp_path / "sub" / "t.csv"
    with pytest.raises(InvalidArgument) as err:
        synth.write_csv(synth.SynthSpec(**fields), out)
    assert err.value.field == field
    assert field in str(err.value) and allowed in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_keeps_an_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "t.csv"
    out.write_text("old\n")

    def broken(f: Any, *args: Any) -> None:
        f.write("2023-11-16 00:00:00.0000000,1,1\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synth, "_write_rows", broken)
    with pytest.raises(OSError):
        synth.write_csv(synth.SynthSpec(duration_s=60, rate_rps=2.0), out)
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_parse_mix() -> None:
    assert synth.parse_mix("LISO=0.75, siso=0.25") == (0.25, 0.0, 0.75, 0.0)
    for text, field in (("siso=0.5,xxl=0.5", "mix"), ("siso=0.5,siso=0.5", "mix"),
                        ("siso", "mix"), ("siso=half,liso=0.5", "mix.siso")):
        with pytest.raises(InvalidArgument) as err:
            synth.parse_mix(text)
        assert err.value.field == field


def test_presets_and_overrides() -> None:
    heavy = synth.spec_from("prompt-heavy")
    assert heavy.mix == pytest.approx((0.15, 0.05, 0.65, 0.15)) and heavy.burstiness == 0.3
    bursty = synth.spec_from("bursty", burstiness=0.5, seed=None)
    assert (bursty.burstiness, bursty.burst_period_s, bursty.seed) == (0.5, 240.0, 0)
    assert bursty.mix == pytest.approx(synth.CONVERSATION_MIX)
    with pytest.raises(InvalidArgument) as err:
        synth.spec_from("nope")
    assert err.value.field == "preset"


def test_the_cli_writes_the_trace_and_prints_the_summary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.csv"
    rc = main(["trace", "synth", "--preset", "prompt-heavy", "--duration-s", "900",
               "--rate-rps", "4", "--seed", "5", "--out", str(out)])
    assert rc == 0 and len(read_azure_trace(out)) > 1000
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and " requests " in line and "per-minute CV" in line
    assert "liso=0.6" in line
    rc = main(["trace", "synth", "--preset", "prompt-heavy", "--duration-s", "900",
               "--rate-rps", "4", "--seed", "5", "--mix", "siso=0.5,lilo=0.5", "--json",
               "--burstiness", "0",
               "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["requests"] == len(read_azure_trace(out))
    assert summary["mean_rate_rps"] == pytest.approx(4.0, rel=0.15)
    assert summary["class_shares"]["siso"] == pytest.approx(0.5, abs=0.05)
    assert summary["class_shares"]["liso"] == 0.0


@pytest.mark.parametrize(("flags", "field"), [
    (["--rate-rps", "0"], "rate_rps"),
    (["--duration-s", "59"], "duration_s"),
    (["--mix", "siso=0.5,liso=0.6"], "mix"),
    (["--mix", "siso=-0.2,liso=1.2"], "mix.siso"),
    (["--mix", "siso=0.5,huge=0.5"], "mix"),
    (["--burstiness", "12"], "burstiness"),
    (["--preset", "spiky"], "preset"),
    (["--start", "yesterday"], "start"),
])
def test_the_cli_refuses_bad_flags_naming_the_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], field: str
        ) -> None:
    out = tmp_path / "bad" / "t.csv"
    assert main(["trace", "synth", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err
    assert list(tmp_path.iterdir()) == []
