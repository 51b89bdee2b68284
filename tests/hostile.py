"""Hostile-input harness (issue 9): hypothesis strategies for any proto request, config tree and
topology; an in-process sim agent and coordinator whose servicers are called directly; and the
verdict of one call. Shared by tests/unit/test_hostile_input.py (few examples) and bench/fuzz.py
(10,000+ per entry point).

A call passes when it succeeds or is refused with a clear status (never INTERNAL/UNKNOWN, never an
exception other than the servicer's abort), and a refused call leaves the GPUs and the journal as
they were.
"""

from __future__ import annotations

import asyncio
import math
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
import yaml
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from pydantic import BaseModel

from coordinator.core import CoordinatorCore
from coordinator.leases import LeasePolicy
from coordinator.rpc.admin import CoordinatorServicer
from coordinator.rpc.link import AgentLinkServicer
from coordinator.session import AgentSession
from coordinator.store.sqlite import Store
from nodeagent.config import AgentConfig, ConfigError, validate_config
from nodeagent.daemon import Agent, build_agent
from nodeagent.engines.manager import InstanceManager
from nodeagent.engines.service import InstanceService
from nodeagent.engines.spec import inventory_from_backend
from nodeagent.engines.wiring import settings_from_config
from nodeagent.rpc.link import run_plan
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.common.clock import SystemClock
from shapeshifter.common.errors import DomainError, InvalidArgument, Unavailable
from shapeshifter.topology import Topology, parse_topology

CRASH_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
GRPC_MAX_RECEIVE_BYTES = 4 * 2**20  # gRPC's default: larger requests never reach a servicer
NODE_ID = "n1"
HUGE_STRING = "x" * 20_000
HUGE_LIST_LEN = 5_000
MAX_DEPTH = 3
LINK_CORE_NODES = 50

# ---------------------------------------------------------------- strategies

SPECIAL_FLOATS = (0.0, -0.0, -1.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf, 300.0)
FLOATS = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(-100, 1000), st.floats())
SMALL_INTS = st.integers(-2, 9)  # GPU indices, counts: often valid
STRINGS = st.one_of(
    st.sampled_from(["", NODE_ID, "0", "1", "-1", "nan", "a", HUGE_STRING, "../../etc/passwd",
                     "\x00", "MIG-0", "GPU-0", "1g.10gb", "3g.40gb", "tiny", "--enforce-eager"]),
    st.text(max_size=24),
)
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type in _INT_RANGES:
        low, high = _INT_RANGES[f.type]
        edges = st.sampled_from(sorted({low, high, 0, max(low, -1)}))
        return st.one_of(SMALL_INTS.filter(lambda v: low <= v <= high), edges,
                         st.integers(low, high))
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return FLOATS
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers arrive
        return st.integers(-3, 12)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=32)
    return STRINGS


FIELD_FAVOURITES: dict[str, st.SearchStrategy[Any]] = {
    "node_id": st.just(NODE_ID),
    "gpu_index": st.integers(0, 1),
    "power_limit_w": st.floats(50, 800),
}


def _repeated(value: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    huge = st.builds(lambda v: [v] * HUGE_LIST_LEN, value)
    return st.one_of(st.lists(value, max_size=4), huge) if value is not None else st.just([])


@st.composite
def proto(draw: st.DrawFn, cls: type[Message], depth: int = 0) -> Message:
    """A message of cls with a random subset of fields set to hostile values."""
    msg = cls()
    if depth > MAX_DEPTH:
        return msg
    for f in cls.DESCRIPTOR.fields:
        if draw(st.integers(0, 3)):  # 1 in 4 unset: empty and zero fields are part of the test
            _fill(draw, msg, f, depth)
    return msg


def _fill(draw: st.DrawFn, msg: Message, f: FieldDescriptor, depth: int) -> None:
    target = getattr(msg, f.name)
    sub: Descriptor | None = f.message_type
    if sub is not None and sub.GetOptions().map_entry:
        key_f, value_f = sub.fields_by_name["key"], sub.fields_by_name["value"]
        for _ in range(draw(st.integers(0, 3))):
            key = draw(scalar(key_f))
            if value_f.message_type is not None:
                target[key].CopyFrom(draw(proto(_cls(value_f), depth + 1)))
            else:
                target[key] = draw(scalar(value_f))
    elif f.is_repeated and sub is not None:
        for item in draw(st.lists(proto(_cls(f), depth + 1), max_size=3)):
            target.add().CopyFrom(item)
    elif f.is_repeated:
        target.extend(draw(_repeated(scalar(f))))
    elif sub is not None:
        target.CopyFrom(draw(proto(_cls(f), depth + 1)))
    elif f.name in FIELD_FAVOURITES:  # often valid, so calls get past NOT_FOUND
        setattr(msg, f.name, draw(st.one_of(FIELD_FAVOURITES[f.name], scalar(f))))
    else:
        setattr(msg, f.name, draw(scalar(f)))


def _cls(f: FieldDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(f.message_type)


HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), FLOATS, STRINGS,
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                         max_size=2),
)


def model_tree(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A dict shaped like a pydantic model: each field absent, a hostile value, or (for nested
    models and lists of them) a tree of its own; sometimes an unknown key."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in model.model_fields.items():
        nested = _nested_model(info.annotation)
        value: st.SearchStrategy[Any] = HOSTILE_VALUES
        if nested is not None and depth < MAX_DEPTH:
            tree = model_tree(nested, depth + 1)
            is_list = typing.get_origin(info.annotation) is list
            value = st.one_of(st.lists(tree, max_size=3) if is_list else tree, HOSTILE_VALUES)
        optional[name] = value
    optional["unknown_key"] = HOSTILE_VALUES
    return st.fixed_dictionaries({}, optional=optional)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


# ---------------------------------------------------------------- verdicts


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class SyncContext:
    """What the agent's servicers use of grpc.ServicerContext."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "fuzz"


class AioContext(SyncContext):
    async def abort(self, code: grpc.StatusCode, details: str) -> None:  # type: ignore[override]
        raise Aborted(code, details)


@dataclass
class Verdict:
    outcome: str  # "ok", "refused:<CODE>", "crash"
    detail: str = ""

    @property
    def crashed(self) -> bool:
        return self.outcome == "crash"


def request_too_big(request: Message) -> bool:
    return request.ByteSize() > GRPC_MAX_RECEIVE_BYTES


def judge(call: Callable[[], Any], state: Callable[[], Any],
          request: Message | None = None) -> Verdict:
    """Run call; a refusal must leave state() unchanged; anything but Aborted is a crash."""
    if request is not None and request_too_big(request):
        return Verdict("refused:RESOURCE_EXHAUSTED")  # what gRPC answers before any servicer
    before = state()
    try:
        reply = call()
        if isinstance(reply, Message):
            reply.SerializeToString()
    except Aborted as exc:
        if exc.code in CRASH_CODES:
            return Verdict("crash", str(exc))
        after = state()
        if after != before:
            return Verdict("crash", f"state changed on {exc}: {first_difference(before, after)}")
        return Verdict(f"refused:{exc.code.name}")
    except Exception as exc:
        return Verdict("crash", f"{type(exc).__name__}: {exc}")
    return Verdict("ok")


def first_difference(before: Any, after: Any, path: str = "state") -> str:
    """Where two nested states first differ, e.g. "state[0][1][0]: 300.0 -> 250.0"."""
    if (isinstance(before, tuple) and isinstance(after, tuple)
            and len(before) == len(after)):
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            if b != a:
                return first_difference(b, a, f"{path}[{i}]")
    return f"{path}: {before!r:.300} -> {after!r:.300}"


def judge_parse(parse: Callable[[], Any], expected: tuple[type[Exception], ...]) -> Verdict:
    try:
        parse()
    except expected as exc:
        return Verdict(f"refused:{type(exc).__name__}", str(exc)[:200])
    except Exception as exc:
        return Verdict("crash", f"{type(exc).__name__}: {str(exc)[:500]}")
    return Verdict("ok")


# ---------------------------------------------------------------- the agent in-process


class NoLaunchRunner:
    """Engine runner that refuses to start processes: instance specs are validated for real."""

    def launch(self, *args: Any, **kwargs: Any) -> Any:
        raise Unavailable("engine launch is disabled in the fuzz harness")

    def adopt(self, pid: int, create_time: float, argv: Any) -> None:
        return None

    def health_ok(self, host: str, port: int) -> bool:
        return False

    def fetch_metrics(self, host: str, port: int) -> str:
        raise OSError("no engine")


def agent_config(state_dir: Path) -> AgentConfig:
    return validate_config({
        "backend": "sim", "sim": {"gpus": 2}, "state_dir": str(state_dir),
        "listen": "127.0.0.1:0", "metrics_listen": "", "thermal_guard": {"enabled": False},
        "engines": {"enabled": False, "launcher": ["/bin/false"]}, "node": {"id": NODE_ID},
    })


@dataclass
class AgentHarness:
    agent: Agent
    manager: InstanceManager

    def gpu_state(self) -> Any:
        """What a refused call must not change: limits, clock locks, MIG, the journal file.
        Read from the devices now, slow reads (MIG) included: a cached snapshot would not see a
        change made by a plan from the coordinator's stream until its cache expired, which
        then looked like a change made by a later, refused call."""
        self.agent.sampler.mark_changed()  # the next sample re-reads everything
        snap = self.agent.sampler.sample_now()
        gpus = tuple(
            (g.telemetry.power_limit_w, g.power_state.requested_w, g.clock_lock_mhz,
             g.mig.enabled, g.mig.pending_enabled, tuple(m.profile for m in g.mig.instances))
            for g in snap.gpus
        )
        journal = tuple(sorted((p.name, p.read_bytes()) for p in self.agent.cfg.state_dir.glob(
            "*.json")))
        return gpus, journal

    def state(self) -> Any:
        instances = tuple(sorted((s.spec.instance_id, str(s.state)) for s in self.manager.list()))
        return self.gpu_state(), instances

    def call(self, method: str, request: Message) -> Verdict:
        servicer = self.agent.servicer
        fn = getattr(servicer, method)
        if method == "WatchTelemetry":
            return judge(lambda: _first(fn(request, SyncContext())), self.state, request)
        return judge(lambda: fn(request, SyncContext()), self.state, request)

    def close(self) -> None:
        self.manager.close()
        self.agent.backend.close()


def _first(stream: Iterator[Any]) -> Any:
    try:
        return next(stream)
    finally:
        stream.close()  # type: ignore[attr-defined]


def make_agent(state_dir: Path) -> AgentHarness:
    cfg = agent_config(state_dir)
    agent = build_agent(cfg, SystemClock(), structlog.get_logger("fuzz"))
    agent.sampler.sample_now()
    settings = settings_from_config(cfg)
    backend = agent.backend
    manager = InstanceManager(settings, NoLaunchRunner(), lambda: inventory_from_backend(backend))
    service = InstanceService(manager)
    agent.servicer.instance_service = service
    agent.actuator.instance_runner = service
    agent.actuator.busy_instances = manager.busy_instances
    return AgentHarness(agent, manager)


def request_class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


def agent_methods() -> dict[str, type[Message]]:
    service = pb.DESCRIPTOR.services_by_name["NodeAgent"]
    return {m.name: request_class(m.input_type) for m in service.methods}


# ---------------------------------------------------------------- the coordinator in-process


TOPOLOGY_YAML = """
version: 1
sites:
  - name: s1
    aisles: [{name: a1, aisle_airflow_cfm: 900}]
    rows:
      - name: r1
        row_power_limit_w: 8000
        racks: [{name: k1, aisle: a1}]
"""


@dataclass
class CoordinatorHarness:
    """A CoordinatorCore with one node (n1) whose session is served by the sim agent's
    actuator, so admin calls run the whole path: validation, plan, agent, result, audit."""

    core: CoordinatorCore
    servicer: CoordinatorServicer
    link: AgentLinkServicer
    agent: AgentHarness
    loop: asyncio.AbstractEventLoop
    session: AgentSession
    _link_db: Path
    _link: CoordinatorCore | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    plans_running: int = 0

    def state(self) -> Any:
        nodes = tuple(sorted(r.node_id for r in self.core.registry.records()))
        return self.agent.gpu_state(), nodes

    def call(self, method: str, request: Message) -> Verdict:
        fn = getattr(self.servicer, method)
        self.settle()
        return judge(lambda: self.loop.run_until_complete(fn(request, AioContext())), self.state,
                     request)

    def settle(self, timeout_s: float = 60.0) -> None:
        """Let plans still queued or running from an earlier call (one whose answer timed out)
        finish first: the loop only runs during calls, so such a plan would otherwise land in
        the middle of the next call and look like that call's state change."""

        async def idle() -> None:
            deadline = time.monotonic() + timeout_s
            while (self.plans_running or not self.session.outbox.empty()) and (
                    time.monotonic() < deadline):
                await asyncio.sleep(0.01)

        self.loop.run_until_complete(idle())

    def register(self, msg: lpb.Register, report: lpb.NodeReport) -> Verdict:
        """A hostile agent: its Register and a NodeReport, then the rollups must still work."""

        if request_too_big(msg) or request_too_big(report):
            return Verdict("refused:RESOURCE_EXHAUSTED")
        core = self._link_core()

        def run() -> None:
            session = AgentSession(msg.node_id)
            try:
                rec, _ = core.register(msg, session)
                core.report(rec, report)
                core.cluster()
            except DomainError as err:
                raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            finally:
                session.close()

        return judge(run, lambda: None)

    def _link_core(self) -> CoordinatorCore:
        """A core of its own for hostile agents, renewed every LINK_CORE_NODES nodes so that
        rollup cost does not grow with the run."""
        if self._link is None or len(self._link.registry) >= LINK_CORE_NODES:
            if self._link is not None:
                self._link.store.close()
            self._link_db.unlink(missing_ok=True)
            store = Store(self._link_db)
            self._link = CoordinatorCore(self.core.topology, store, SystemClock(),
                                         epoch=store.bump_epoch(), lease_policy=LeasePolicy())
        return self._link

    def close(self) -> None:
        if self._link is not None:
            self._link.store.close()
        for task in self._tasks:
            task.cancel()
        self.session.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        self.core.store.close()
        self.agent.close()


async def _serve_plans(harness: CoordinatorHarness) -> None:
    session, agent = harness.session, harness.agent
    while (msg := await session.outbox.get()) is not None:
        if msg.WhichOneof("kind") == "plan":
            harness.plans_running += 1
            try:
                result = await asyncio.to_thread(run_plan, agent.agent.actuator, msg.plan)
            finally:
                harness.plans_running -= 1
                agent.agent.sampler.mark_changed()  # as the agent's link does after a plan
            session.resolve(result)


def make_coordinator(workdir: Path) -> CoordinatorHarness:
    workdir.mkdir(parents=True, exist_ok=True)
    agent = make_agent(workdir / "agent")
    topology: Topology = parse_topology(TOPOLOGY_YAML)
    store = Store(workdir / "c.db")
    core = CoordinatorCore(topology, store, SystemClock(), epoch=store.bump_epoch(),
                           lease_policy=LeasePolicy(ttl_s=3600), action_timeout_s=5,
                           instance_action_timeout_s=5)
    link = AgentLinkServicer(core)
    servicer = CoordinatorServicer(core, link)
    loop = asyncio.new_event_loop()
    node = agent.agent.servicer.latest_node()
    node.labels.update({"site": "s1", "row": "r1", "rack": "k1", "aisle": "a1"})
    session = AgentSession(NODE_ID)
    register = lpb.Register(node_id=NODE_ID, labels=node.labels, gpus=node.gpus, backend="sim")
    rec, _ = core.register(register, session)
    core.report(rec, lpb.NodeReport(node=node, seq=1))
    harness = CoordinatorHarness(core, servicer, link, agent, loop, session, workdir / "link.db")
    harness._tasks.append(loop.create_task(_serve_plans(harness)))
    return harness


def coordinator_methods() -> dict[str, type[Message]]:
    service = cpb.DESCRIPTOR.services_by_name["Coordinator"]
    return {m.name: request_class(m.input_type) for m in service.methods}


# ---------------------------------------------------------------- parsers


def check_config(tree: dict[str, Any]) -> Verdict:
    return judge_parse(lambda: validate_config(tree), (ConfigError,))


def check_topology_tree(tree: dict[str, Any]) -> Verdict:
    text = yaml.safe_dump({"version": 1, **tree}, allow_unicode=True)
    return judge_parse(lambda: parse_topology(text), (InvalidArgument,))


def check_topology_text(text: str) -> Verdict:
    return judge_parse(lambda: parse_topology(text), (InvalidArgument,))


def config_trees() -> st.SearchStrategy[dict[str, Any]]:
    return model_tree(AgentConfig)


def topology_trees() -> st.SearchStrategy[dict[str, Any]]:
    return model_tree(Topology)


TOPOLOGY_TEXTS = st.one_of(
    st.text(max_size=200),
    st.sampled_from([TOPOLOGY_YAML, "version: 1\nsites: []\n", "[]", "!!python/object:os.system",
                     "a: &a [*a]", "version: 1\nsites:\n  - name: s1\n" + "    x: 1\n" * 50]),
)
