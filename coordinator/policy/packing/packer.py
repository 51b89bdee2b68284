"""Vector bin packing of instances onto GPUs and MIG slices (Panigrahy et al. 2011).

Bins are GPUs, grouped by node; an instance takes TP whole GPUs of one node, or one MIG slice.
A MIG bin has three dimensions (compute slices /7, memory slots /8, power / max power); a node,
for whole-GPU instances, has (free GPUs, row power headroom, aisle airflow headroom). Open bins
are filled first; among those that fit, `fit` picks by dot product with the residual capacity
("dot", alignment) or by the smallest L2 norm of the residual after placement ("l2", best fit).
Every placement is checked against the row power and aisle airflow ledger and the GPU's
thermal headroom. Placements happen in transactions that can be rolled back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from coordinator.policy.model import Limits, NodeState
from coordinator.policy.packing.candidates import MIG_COMPUTE_SLICES, MIG_MEMORY_SLOTS, Candidate
from coordinator.policy.packing.ledger import Ledger, gpu_temp_limit_c
from shapeshifter.common.errors import InvalidArgument
from shapeshifter.hw.mig import place_mig_layout
from shapeshifter.hw.models import GPU_MODELS

NODE_SCAN_LIMIT = 16  # feasible nodes compared per whole-GPU placement (bounds the solve time)
_EPS = 1e-9


@dataclass
class GpuBin:
    node_id: str
    index: int
    gpu_type: str
    inlet_c: float
    mig_enabled_now: bool
    max_w: float
    idle_w: float
    reserved: bool = False
    power_w: float = 0.0
    c_per_w: float = 0.1  # steady temperature rise per W (the GPU model's thermal_c_per_w)
    temp_limit_c: float = 0.0  # slowdown less the thermal headroom (gpu_temp_limit_c)
    occupants: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # key->slices..
    mode: str = "free"  # free | full | mig_fresh | mig_existing | reserved
    fresh_layout: list[str] = field(default_factory=list)  # profiles laid out in this plan
    free_slices: dict[str, list[str]] = field(default_factory=dict)  # existing: profile->uuids

    def used(self) -> tuple[int, int]:
        return (sum(s for s, _, _ in self.occupants.values()),
                sum(m for _, m, _ in self.occupants.values()))

    def state(self) -> tuple:
        return (self.power_w, dict(self.occupants), self.mode, list(self.fresh_layout),
                {k: list(v) for k, v in self.free_slices.items()})

    def restore(self, s: tuple) -> None:
        self.power_w, self.occupants, self.mode, self.fresh_layout, self.free_slices = s


@dataclass(frozen=True)
class Placed:
    key: str
    node_id: str
    gpu_indices: tuple[int, ...]
    mig_uuid: str = ""  # an existing free slice it reuses ("" for whole GPUs or a fresh layout)


class Packer:
    def __init__(self, nodes: Sequence[NodeState], ledger: Ledger, limits: Limits,
                 fit: str) -> None:
        self.ledger, self.limits, self.fit = ledger, limits, fit
        self.gpus: dict[tuple[str, int], GpuBin] = {}
        self.node_gpus: dict[str, list[GpuBin]] = {}
        self._free: dict[str, dict[int, dict[str, None]]] = {}  # type -> free count -> nodes
        self._free_count: dict[str, int] = {}
        self._open_mig: dict[str, dict[tuple[str, int], None]] = {}  # type -> open MIG bins
        self._layout_ok: dict[tuple[str, tuple[str, ...]], bool] = {}
        self._slot_ok: dict[tuple[str, tuple[str, ...], str], bool] = {}
        self._journal: list[tuple[GpuBin, tuple]] | None = None
        for node in nodes:
            self._add_node(node)

    # ------------------------------------------------------------------ setup

    def _add_node(self, node: NodeState) -> None:
        bins = []
        for g in node.gpus:
            model = GPU_MODELS.get(g.gpu_type)
            if model is None:
                continue
            b = GpuBin(node.node_id, g.index, g.gpu_type, node.inlet_temp_c, g.mig_enabled,
                       model.power.max_w, model.idle_power_w,
                       reserved=g.reserved or not g.healthy)
            b.power_w = g.power_draw_w if b.reserved else model.idle_power_w
            b.c_per_w = model.thermal_c_per_w
            b.temp_limit_c = gpu_temp_limit_c(g.gpu_type, self.limits)
            b.mode = "reserved" if b.reserved else "free"
            self.gpus[(node.node_id, g.index)] = b
            bins.append(b)
        self.node_gpus[node.node_id] = bins
        self._free_count[node.node_id] = 0
        for b in bins:
            if b.mode == "free":
                self._set_free(b, True)

    def _set_free(self, b: GpuBin, free: bool) -> None:
        node_id, t = b.node_id, b.gpu_type
        buckets = self._free.setdefault(t, {})
        n = self._free_count[node_id]
        buckets.get(n, {}).pop(node_id, None)
        n += 1 if free else -1
        self._free_count[node_id] = n
        if n > 0:
            buckets.setdefault(n, {})[node_id] = None

    def _touch(self, b: GpuBin) -> None:
        if self._journal is not None:
            self._journal.append((b, b.state()))

    # ------------------------------------------------------------------ pinning (kept instances)

    def pin(self, key: str, cand: Candidate, node_id: str, gpu_indices: Sequence[int],
            mig_uuid: str, existing: Iterable[tuple[str, str, bool]]) -> None:
        """Occupy what a running instance occupies now. `existing`: the GPU's MIG slices
        (profile, uuid, in_use) so the free ones stay usable without a new layout."""
        bins = [self.gpus[(node_id, i)] for i in gpu_indices if (node_id, i) in self.gpus]
        for b in bins:
            self._touch(b)
            if b.mode == "free":
                self._set_free(b, False)
                if cand.gpus == 0:
                    b.mode = "mig_existing"
                    for profile, uuid, in_use in existing:
                        if not in_use and uuid != mig_uuid:
                            b.free_slices.setdefault(profile, []).append(uuid)
                    self._open_mig.setdefault(b.gpu_type, {})[(b.node_id, b.index)] = None
                else:
                    b.mode = "full"
            self._occupy(b, key, cand, len(bins))

    def unpin(self, key: str, node_id: str, gpu_indices: Sequence[int], mig_profile: str,
              mig_uuid: str) -> None:
        """Release what a (to be stopped) instance occupies."""
        for i in gpu_indices:
            b = self.gpus.get((node_id, i))
            if b is None or key not in b.occupants:
                continue
            self._touch(b)
            delta = -(b.occupants.pop(key)[2])
            b.power_w += delta
            self.ledger.apply(node_id, delta)
            if not b.occupants and b.mode != "reserved":
                b.mode, b.fresh_layout, b.free_slices = "free", [], {}
                self._open_mig.get(b.gpu_type, {}).pop((b.node_id, b.index), None)
                self._set_free(b, True)
            elif b.mode == "mig_existing" and mig_uuid:
                b.free_slices.setdefault(mig_profile, []).append(mig_uuid)

    def _occupy(self, b: GpuBin, key: str, cand: Candidate, n_gpus: int) -> None:
        if cand.gpus == 0:
            extra = cand.power_w - cand.gpu_equiv * b.idle_w
            b.occupants[key] = (cand.slices, cand.mem_slots, extra)
        else:
            extra = cand.power_w / n_gpus - b.idle_w
            b.occupants[key] = (MIG_COMPUTE_SLICES, MIG_MEMORY_SLOTS, extra)
        b.power_w += extra
        self.ledger.apply(b.node_id, extra)

    # ------------------------------------------------------------------ transactions

    def begin(self) -> None:
        self._journal = []
        self.ledger.begin()

    def commit(self) -> None:
        self._journal = None
        self.ledger.commit()

    def rollback(self) -> None:
        journal, self._journal = self._journal or [], None
        for b, s in reversed(journal):
            was_free = b.mode == "free"
            b.restore(s)
            if was_free != (b.mode == "free"):
                self._set_free(b, b.mode == "free")
            opened = self._open_mig.setdefault(b.gpu_type, {})
            if b.mode in ("mig_fresh", "mig_existing"):
                opened[(b.node_id, b.index)] = None
            else:
                opened.pop((b.node_id, b.index), None)
        self.ledger.rollback()

    # ------------------------------------------------------------------ placement

    def place(self, key: str, cand: Candidate) -> Placed | None:
        """Place one new instance; None when no bin can take it within the limits."""
        if cand.gpus == 0:
            return self._place_mig(key, cand)
        return self._place_full(key, cand)

    def _thermal_ok(self, b: GpuBin, extra_w: float) -> bool:
        power_w = b.power_w + extra_w
        # gpu_temp_c() with the bin's constants (a hot path: every free GPU of a scanned node)
        return (b.inlet_c + b.c_per_w * power_w <= b.temp_limit_c + _EPS
                and power_w <= b.max_w + _EPS)

    def _node_fit_score(self, node_id: str, free: int, cand: Candidate) -> float:
        shape = self.ledger.shapes[node_id]
        row_lim = self.limits.row_power_limit_w.get(shape.row)
        aisle_lim = self.limits.aisle_airflow_cfm.get(shape.aisle)
        r = [free / shape.n_gpus,
             self.ledger.row_headroom_w(shape.row) / row_lim if row_lim else 1.0,
             self.ledger.aisle_headroom_cfm(shape.aisle) / aisle_lim if aisle_lim else 1.0]
        v = [cand.gpus / shape.n_gpus, cand.power_w / row_lim if row_lim else 0.0,
             0.0]
        return _score(self.fit, v, r)

    def _place_full(self, key: str, cand: Candidate) -> Placed | None:
        tp, t = cand.gpus, cand.config.gpu_type
        buckets = self._free.get(t, {})
        for free in sorted(n for n in buckets if n >= tp):
            options = []
            for node_id in buckets.get(free, {}):  # not mutated before the loop ends
                ok = self._fitting_bins(node_id, tp, cand)
                if ok is not None:
                    options.append((self._node_fit_score(node_id, free, cand), node_id, ok))
                    if len(options) >= NODE_SCAN_LIMIT:
                        break
            if options:
                _, node_id, ok = max(options, key=lambda o: o[0])
                chosen = _coolest(ok, tp)
                for b in chosen:
                    self._touch(b)
                    self._set_free(b, False)
                    b.mode = "full"
                    self._occupy(b, key, cand, tp)
                return Placed(key, node_id, tuple(b.index for b in chosen))
        return None

    def _free_bins(self, node_id: str, n: int, cand: Candidate,
                   per_gpu_w: float | None = None) -> list[GpuBin] | None:
        """n free GPUs of the node that stay within thermal limits, if the ledger allows."""
        ok = self._fitting_bins(node_id, n, cand, per_gpu_w)
        return None if ok is None else _coolest(ok, n)

    def _fitting_bins(self, node_id: str, n: int, cand: Candidate,
                      per_gpu_w: float | None = None) -> list[GpuBin] | None:
        """The node's free GPUs that stay within thermal limits, when at least n do and the
        ledger allows n of them; in node order."""
        free = [b for b in self.node_gpus[node_id] if b.mode == "free"]
        extra = (cand.power_w / n if per_gpu_w is None else per_gpu_w) - (free[0].idle_w
                                                                          if free else 0.0)
        ok = [b for b in free if self._thermal_ok(b, extra)]
        if len(ok) < n or self.ledger.violation(node_id, extra * n):
            return None
        return ok

    def _mig_fits(self, b: GpuBin, cand: Candidate) -> bool:
        return self._slot_fits(b, cand) and self._mig_power_fits(b, cand)

    def _mig_power_fits(self, b: GpuBin, cand: Candidate) -> bool:
        extra = cand.power_w - cand.gpu_equiv * b.idle_w
        return self._thermal_ok(b, extra) and not self.ledger.violation(b.node_id, extra)

    def _slot_fits(self, b: GpuBin, cand: Candidate) -> bool:
        """The GPU has (or can lay out) a slice of the candidate's profile."""
        if b.mode == "mig_existing":
            return bool(b.free_slices.get(cand.config.mig_profile))
        key = (b.gpu_type, tuple(b.fresh_layout), cand.config.mig_profile)
        if key not in self._slot_ok:  # memo: every open bin is asked on every MIG placement
            names = tuple(sorted([*b.fresh_layout, cand.config.mig_profile]))
            self._slot_ok[key] = self._layout_fits(b.gpu_type, names)
        return self._slot_ok[key]

    def _layout_fits(self, gpu_type: str, names: tuple[str, ...]) -> bool:
        memo_key = (gpu_type, names)
        if memo_key not in self._layout_ok:
            try:
                place_mig_layout(GPU_MODELS[gpu_type].mig_profiles, names)
                self._layout_ok[memo_key] = True
            except InvalidArgument:
                self._layout_ok[memo_key] = False
        return self._layout_ok[memo_key]

    def _mig_score(self, b: GpuBin, cand: Candidate) -> float:
        slices, slots = b.used()
        r = [1 - slices / MIG_COMPUTE_SLICES, 1 - slots / MIG_MEMORY_SLOTS,
             1 - b.power_w / b.max_w]
        v = [cand.slices / MIG_COMPUTE_SLICES, cand.mem_slots / MIG_MEMORY_SLOTS,
             cand.power_w / b.max_w]
        return _score(self.fit, v, r)

    def _place_mig(self, key: str, cand: Candidate) -> Placed | None:
        opened = self._open_mig.get(cand.config.gpu_type, {})
        b = self._best_open_mig(opened, cand) or self._open_fresh_mig(cand)
        if b is None:
            return None
        self._touch(b)
        uuid = ""
        if b.mode == "mig_existing":
            uuid = b.free_slices[cand.config.mig_profile].pop()
        else:
            b.fresh_layout.append(cand.config.mig_profile)
        self._occupy(b, key, cand, 1)
        slices, _ = b.used()
        if slices >= MIG_COMPUTE_SLICES:
            opened.pop((b.node_id, b.index), None)
        return Placed(key, b.node_id, (b.index,), uuid)

    def _best_open_mig(self, opened: dict[tuple[str, int], None], cand: Candidate
                       ) -> GpuBin | None:
        """The best-scoring open MIG bin that fits (the first such in `opened` on a tie).

        Scores are cheap and the power check (thermal, ledger) is not: check the bins with a
        free slot in score order and stop at the first that fits, the bin a full scan picks."""
        bins = [b for k in opened if self._slot_fits(b := self.gpus[k], cand)]
        order = sorted(range(len(bins)), key=lambda i: (-self._mig_score(bins[i], cand), i))
        return next((bins[i] for i in order if self._mig_power_fits(bins[i], cand)), None)

    def _open_fresh_mig(self, cand: Candidate) -> GpuBin | None:
        buckets = self._free.get(cand.config.gpu_type, {})
        if not self._layout_fits(cand.config.gpu_type, (cand.config.mig_profile,)):
            return None
        for free in sorted(buckets):
            for node_id in list(buckets.get(free, {})):
                per_gpu = cand.power_w + (1 - cand.gpu_equiv) * self._idle_w(node_id)
                chosen = self._free_bins(node_id, 1, cand, per_gpu_w=per_gpu)
                if chosen is not None:
                    b = chosen[0]
                    self._touch(b)
                    self._set_free(b, False)
                    b.mode = "mig_fresh"
                    self._open_mig.setdefault(b.gpu_type, {})[(b.node_id, b.index)] = None
                    return b
        return None

    def _idle_w(self, node_id: str) -> float:
        bins = self.node_gpus[node_id]
        return bins[0].idle_w if bins else 0.0

    # ------------------------------------------------------------------ results

    def used_gpus(self) -> int:
        return sum(1 for b in self.gpus.values() if b.occupants)

    def mig_changes(self) -> list[GpuBin]:
        return [b for b in self.gpus.values() if b.mode == "mig_fresh"]

    def full_on_mig(self) -> list[GpuBin]:
        """GPUs now hosting a whole-GPU instance whose MIG mode is on (must be turned off)."""
        return [b for b in self.gpus.values() if b.mode == "full" and b.mig_enabled_now]


def _coolest(bins: list[GpuBin], n: int) -> list[GpuBin]:
    return sorted(bins, key=lambda b: b.inlet_c + b.power_w)[:n]


def _score(fit: str, item: list[float], residual: list[float]) -> float:
    """Higher is better. dot: Σ item·residual; l2: -‖residual - item‖²."""
    if fit == "dot":
        return sum(i * r for i, r in zip(item, residual, strict=True))
    return -sum((r - i) ** 2 for i, r in zip(item, residual, strict=True))
