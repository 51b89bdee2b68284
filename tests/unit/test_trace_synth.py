"""`shapectl trace synth` and simulator/synth.py: deterministic, loadable, the requested mix and
burstiness, bad input refused naming the field with nothing written."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from coordinator.profiles.classes import read_azure_trace
from nodeagent.errors import InvalidArgument
from shapectl.cli import main
from simulator import synth
from simulator.trace import load_trace


def test_same_seed_same_bytes_and_both_readers_load_it(tmp_path: Path) -> None:
    spec = synth.SynthSpec(duration_s=600, rate_rps=4.0, seed=7)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    synth.write_csv(spec, a)
    synth.write_csv(spec, b)
    assert a.read_bytes() == b.read_bytes()
    reqs = read_azure_trace(a)
    assert len(reqs) > 1000
    assert all(x.arrival_s <= y.arrival_s for x, y in itertools.pairwise(reqs))
    assert load_trace(a).mean_rate_rps == pytest.approx(4.0, rel=0.15)


def test_the_mix_and_the_rate_are_what_was_asked() -> None:
    spec = synth.SynthSpec(duration_s=3600, rate_rps=3.0, mix=(0.1, 0.2, 0.3, 0.4), seed=1)
    t, prompt, output = synth.generate(spec)
    s = synth.summarize(spec, t, prompt, output)
    assert s["mean_rate_rps"] == pytest.approx(3.0, rel=0.05)
    for name, want in zip(synth.CLASSES, spec.mix, strict=True):
        assert s[f"share_{name}"] == pytest.approx(want, abs=0.02)


def test_burstiness_raises_the_per_minute_variation() -> None:
    def cv(b: float) -> float:
        spec = synth.SynthSpec(duration_s=14_400, rate_rps=5.0, burstiness=b, seed=3)
        return synth.summarize(spec, *synth.generate(spec))["per_minute_cv"]
    poisson = cv(0.0)
    assert poisson == pytest.approx(1 / np.sqrt(300), rel=0.3)  # Poisson: 1/sqrt(60 x 5)
    assert cv(1.0) > 5 * poisson


@pytest.mark.parametrize(("spec", "field"), [
    (synth.SynthSpec(rate_rps=0.0), "rate_rps"),
    (synth.SynthSpec(duration_s=10.0), "duration_s"),
    (synth.SynthSpec(mix=(0.5, 0.5, 0.5, 0.0)), "mix"),
    (synth.SynthSpec(mix=(-0.1, 0.6, 0.5, 0.0)), "mix.siso"),
    (synth.SynthSpec(burstiness=11.0), "burstiness"),
])
def test_bad_specs_are_refused_naming_the_field(tmp_path: Path, spec: synth.SynthSpec,
                                                 field: str) -> None:
    out = tmp_path / "t.csv"
    with pytest.raises(InvalidArgument) as err:
        synth.write_csv(spec, out)
    assert err.value.field == field
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_class_in_the_mix_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="mix entry"):
        synth.parse_mix("siso=0.5,xxl=0.5")


def test_the_cli_writes_the_trace_and_refuses_bad_flags(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    out = tmp_path / "p.csv"
    rc = main(["trace", "synth", "--preset", "prompt-heavy", "--duration-s", "600",
               "--rate-rps", "2", "--out", str(out)])
    assert rc == 0 and out.is_file()
    assert "requests" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    rc = main(["trace", "synth", "--mix", "siso=2", "--out", str(bad)])
    assert rc == 2 and not bad.exists()
    assert "mix.siso" in capsys.readouterr().err
