"""`shapectl demo`: all N nodes show up in its JSON status, and it leaves no process behind
(after --for, and after Ctrl-C)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import grpc
import psutil

from shapectl.commands.demo import demo_topology, peak_node_power_w
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc
from shapeshifter.topology import Topology
from tests.conftest import console_script, poll, run_cli


def workdir_of(stderr: str) -> str:
    match = re.search(r"logs in (\S+shapeshifter-demo-\w+)", stderr)
    assert match, stderr
    return match.group(1)


def leftovers(workdir: str) -> list[str]:
    """Processes still running that the demo started (their command lines name its workdir)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if workdir in cmdline:
            found.append(cmdline)
    return found


def test_demo_for_seconds_shows_all_nodes_and_stops_everything() -> None:
    out = run_cli("shapectl", "demo", "--nodes", "4", "--gpus", "2", "--for", "2", "--json",
                  timeout_s=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert sorted(n["name"] for n in status["nodes"]) == [f"node-0{i}" for i in range(1, 5)]
    assert all(n["state"] == "up" and n["power_draw_w"] > 0 for n in status["nodes"])
    assert [r["name"] for r in status["rows"]] == ["r1", "r2"]
    assert [r["nodes"] for r in status["rows"]] == [2, 2]
    assert all(r["power_limit_w"] > 0 for r in status["rows"])
    assert {n["rack"] for n in status["nodes"]} == {"k1", "k2", "k3", "k4"}
    assert leftovers(workdir_of(out.stderr)) == []


def test_demo_scripted_ups_failure_brings_row_r1_under_its_new_limit() -> None:
    out = run_cli("shapectl", "demo", "--nodes", "4", "--gpus", "2", "--for", "6",
                  "--ups-failure-at", "0.5", "--ups-restore-after", "60", "--json", timeout_s=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    emergency = status["emergency"]
    assert (emergency["scope"], emergency["name"], emergency["state"]) == ("row", "r1", "active")
    assert emergency["capacity_frac"] == 0.75
    r1 = next(r for r in status["rows"] if r["name"] == "r1")
    assert emergency["power_limit_w"] == r1["power_limit_w"] * 0.75
    assert emergency["under_limit_s"] >= 0  # the coordinator saw the row under its new limit
    kinds = [e["kind"] for e in emergency["timeline"]]
    assert kinds[0] == "declared"
    # Both r1 nodes acknowledged their caps (a further cut, when the load rises past the caps
    # for a few seconds, adds acknowledgements of its own).
    assert kinds.count("caps_acked") >= 2
    assert {e["node_id"] for e in emergency["timeline"] if e["kind"] == "caps_acked"} == {
        "node-01", "node-02"}
    assert leftovers(workdir_of(out.stderr)) == []


def test_demo_shows_the_automatic_emergency_that_brings_a_row_under_its_limit() -> None:
    """No scripted UPS failure: the demo load keeps a row over its tight limit (8 GPUs a node:
    the per-GPU waves average out near the peak), and the coordinator's default detection
    declares an emergency by itself whose caps bring the row under its limit."""
    out = run_cli("shapectl", "demo", "--nodes", "4", "--for", "10", "--ups-failure-at", "-1",
                  "--json", timeout_s=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert "emergency" not in status  # nothing scripted
    autos = status["auto_emergencies"]
    assert autos, out.stderr
    for e in autos:
        assert (e["source"], e["scope"], e["kind"], e["capacity_frac"]) == (
            "auto", "row", "power", 1.0)
        assert "above the limit" in e["note"]
        kinds = [ev["kind"] for ev in e["timeline"]]
        assert kinds[:3] == ["declared", "broadcast", "plan"] and "caps_acked" in kinds
    assert any(e["under_limit_s"] >= 0 for e in autos)  # seen under its limit, no human
    assert "automatic emergency" in out.stderr  # the live view shows it with its timeline
    assert leftovers(workdir_of(out.stderr)) == []


def test_demo_stops_cleanly_on_ctrl_c() -> None:
    proc = subprocess.Popen([*console_script("shapectl"), "demo", "--nodes", "2", "--gpus", "1",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline() if proc.stderr else ""
        match = re.search(r"coordinator on (\S+),", first)
        assert match, first
        stub = cpb_grpc.CoordinatorStub(grpc.insecure_channel(match.group(1)))

        def two_up() -> bool:
            try:
                nodes = stub.GetCluster(cpb.GetClusterRequest(), timeout=2).nodes
            except grpc.RpcError:
                return False
            return sum(n.state == "up" for n in nodes) == 2

        poll(two_up, timeout_s=60, interval_s=0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert len(json.loads(stdout)["nodes"]) == 2
    workdir = workdir_of(first)
    deadline = time.monotonic() + 5
    while leftovers(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(workdir) == []


def test_demo_topology_is_valid_and_tight() -> None:
    topo = Topology.model_validate(demo_topology(8, "h100-80gb", 8))
    peak_w = peak_node_power_w("h100-80gb", 8)
    rows = topo.sites[0].rows
    assert [(r.name, [k.name for k in r.racks]) for r in rows] == [
        ("r1", ["k1", "k2"]), ("r2", ["k3", "k4"])]
    assert all(r.row_power_limit_w < 4 * peak_w for r in rows)  # 4 nodes per row: tight
    assert topo.place({"site": "s1", "row": "r2", "rack": "k4", "aisle": "a2"}) is not None
