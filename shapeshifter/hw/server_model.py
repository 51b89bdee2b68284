"""Server-level physics shared by the agent's budgets, the sim backend and the simulator.

DESIGN §4 / TAPAS eqs. 2-4: server power = idle + sum(GPU power) + fans, fans a polynomial in GPU
load; airflow per server linear in load, 840 CFM (DGX A100) and 1105 CFM (DGX H100) at 80% fan.
Figures are for an 8-GPU server and scale with the GPU count for smaller sim nodes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerModel:
    host_idle_w: float  # CPUs, memory, NICs, storage; GPUs excluded
    fan_max_w: float  # all fans at 100%
    airflow_at_80pct_fan_cfm: float
    fan_min_frac: float = 0.3  # fans never stop
    reference_gpus: int = 8

    def fan_frac(self, gpu_load_frac: float) -> float:
        """Fan speed rises linearly from its floor to 80% at full GPU load (DGX fan curve)."""
        load = min(max(gpu_load_frac, 0.0), 1.0)
        return self.fan_min_frac + (0.8 - self.fan_min_frac) * load

    def fan_power_w(self, gpu_load_frac: float, n_gpus: int) -> float:
        # Fan affinity law: power ~ speed^3.
        return self.fan_max_w * self.fan_frac(gpu_load_frac) ** 3 * n_gpus / self.reference_gpus

    def idle_power_w(self, n_gpus: int) -> float:
        return self.host_idle_w * n_gpus / self.reference_gpus

    def airflow_cfm(self, gpu_load_frac: float, n_gpus: int) -> float:
        per_fan_frac = self.airflow_at_80pct_fan_cfm / 0.8
        return per_fan_frac * self.fan_frac(gpu_load_frac) * n_gpus / self.reference_gpus

    def node_power_w(self, gpu_power_w: float, gpu_load_frac: float, n_gpus: int) -> float:
        return self.idle_power_w(n_gpus) + gpu_power_w + self.fan_power_w(gpu_load_frac, n_gpus)


SERVER_MODELS: dict[str, ServerModel] = {
    # DGX A100: 6.5 kW max system power, of which 8 x 400 W GPUs.
    "a100": ServerModel(host_idle_w=1100.0, fan_max_w=700.0, airflow_at_80pct_fan_cfm=840.0),
    # DGX H100: 10.2 kW max system power, of which 8 x 700 W GPUs.
    "h100": ServerModel(host_idle_w=1500.0, fan_max_w=1100.0, airflow_at_80pct_fan_cfm=1105.0),
}


def server_model_for(gpu_type: str) -> ServerModel:
    """The server model for a GPU type key ('a100-40gb' -> 'a100'); unknown types use 'a100'."""
    family = gpu_type.split("-", 1)[0] if gpu_type else "a100"
    return SERVER_MODELS.get(family, SERVER_MODELS["a100"])
