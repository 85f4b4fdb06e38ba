"""SE-MoE's capacity model: what each tier must hold, per machine, for a model on a cluster.

With ``D`` dense and ``S`` sparse (expert) parameters, ``L`` MoE layers, ``N`` machines and
``alpha`` the fraction of the sparse parameters a step activates (paper, section 3.2)::

    device  16 D + 4 alpha S / L  <=  M_dev  * N   dense fp32 weights, grads and two Adam moments
                                                   (sharded over the machines, stage-3 style), plus
                                                   the fp32 compute copy of one MoE layer's
                                                   activated experts
    host    16 alpha S            <=  M_host * N   the activated experts' fp32 master weights,
                                                   gradients and two moments
    SSD     12 S                  <=  M_ssd  * N   every expert's fp32 master weights and moments

This module evaluates the three inequalities (bytes per machine = left side / N), reports what
does not fit and the largest ``alpha`` that would, and compares with keeping everything on
the device (``16 (D + S)``). The model is given by parameter counts or by a training config.
:func:`cpu_knobs` sizes this implementation's ``storage`` settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from paddle_semoe.config.schema import suggest_key

GIB = 1 << 30

BYTES_DENSE = 16  # fp32 weight + grad + 2 Adam moments
BYTES_SPARSE_ACTIVE_HOST = 16  # the same, for activated experts on the host
BYTES_SPARSE_COMPUTE = 4  # fp32 compute copy on the device
BYTES_SPARSE_SSD = 12  # fp32 master + 2 moments


@dataclass(frozen=True)
class MachineSpec:
    """One machine of the cluster (capacities in bytes, summed over its devices)."""

    devices: int
    device_memory_bytes: float
    host_memory_bytes: float
    ssd_bytes: float
    name: str = "machine"

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"machine.devices must be >= 1, got {self.devices}")
        for key in ("device_memory_bytes", "host_memory_bytes", "ssd_bytes"):
            if getattr(self, key) <= 0:
                raise ValueError(f"machine.{key.replace('_bytes', '_gb')} must be positive")


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    machines: int
    machine: MachineSpec

    def __post_init__(self) -> None:
        if self.machines < 1:
            raise ValueError(f"machines must be >= 1, got {self.machines}")


@dataclass(frozen=True)
class ModelSpec:
    """Parameter counts of the model to place."""

    name: str
    dense_params: float  # D
    sparse_params: float  # S
    moe_layers: int  # L
    alpha: float  # activated fraction of S per step

    def __post_init__(self) -> None:
        if self.dense_params < 0 or self.sparse_params <= 0:
            raise ValueError("model.dense_params must be >= 0 and model.sparse_params > 0")
        if self.moe_layers < 1:
            raise ValueError(f"model.moe_layers must be >= 1, got {self.moe_layers}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"model.alpha must be in (0, 1], got {self.alpha}")


@dataclass(frozen=True)
class TierPlan:
    tier: str
    holds: str
    bytes_per_machine: float
    capacity_per_machine: float

    @property
    def fits(self) -> bool:
        return self.bytes_per_machine <= self.capacity_per_machine

    @property
    def utilization(self) -> float:
        return self.bytes_per_machine / self.capacity_per_machine


@dataclass(frozen=True)
class CapacityPlan:
    model: ModelSpec
    cluster: ClusterSpec
    tiers: tuple[TierPlan, ...]
    resident_bytes_per_machine: float  # everything on the device: 16 (D + S) / N
    max_alpha_host: float  # largest alpha the host inequality allows
    max_alpha_device: float  # ... the device inequality allows (inf when alpha does not matter)

    @property
    def fits(self) -> bool:
        return all(t.fits for t in self.tiers)

    @property
    def resident_fits(self) -> bool:
        return self.resident_bytes_per_machine <= self.cluster.machine.device_memory_bytes


def plan(model: ModelSpec, cluster: ClusterSpec) -> CapacityPlan:
    """Evaluate the three inequalities of the paper for ``model`` on ``cluster``."""
    D, S, L, a, N = model.dense_params, model.sparse_params, model.moe_layers, model.alpha, cluster.machines
    m = cluster.machine
    tiers = (
        TierPlan(
            "device",
            f"dense fp32 weights+grads+Adam moments (16 B x D, sharded over {N} machines) + fp32 compute copy of one "
            f"MoE layer's activated experts (4 B x alpha S / L)",
            (BYTES_DENSE * D + BYTES_SPARSE_COMPUTE * a * S / L) / N,
            m.device_memory_bytes,
        ),
        TierPlan(
            "host",
            "activated experts' fp32 master weights + grads + Adam moments (16 B x alpha S)",
            BYTES_SPARSE_ACTIVE_HOST * a * S / N,
            m.host_memory_bytes,
        ),
        TierPlan("ssd", "every expert's fp32 master weights + Adam moments (12 B x S)", BYTES_SPARSE_SSD * S / N, m.ssd_bytes),
    )
    dev_room = m.device_memory_bytes * N - BYTES_DENSE * D
    max_alpha_device = dev_room * L / (BYTES_SPARSE_COMPUTE * S) if dev_room > 0 else 0.0
    return CapacityPlan(
        model, cluster, tiers,
        resident_bytes_per_machine=BYTES_DENSE * (D + S) / N,
        max_alpha_host=min(m.host_memory_bytes * N / (BYTES_SPARSE_ACTIVE_HOST * S), 1.0),
        max_alpha_device=min(max_alpha_device, 1.0),
    )


def _gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB"


def format_plan(p: CapacityPlan) -> str:
    """A table of the plan plus a verdict line per tier that does not fit."""
    md, c = p.model, p.cluster
    lines = [
        f"=== capacity plan: {md.name} on {c.name} ===",
        f"model: D={md.dense_params / 1e9:.3f}B dense, S={md.sparse_params / 1e9:.3f}B sparse params, "
        f"L={md.moe_layers} MoE layers, alpha={md.alpha:g}",
        f"cluster: N={c.machines} machine(s) x {c.machine.devices} device(s); per machine: device "
        f"{_gib(c.machine.device_memory_bytes)}, host {_gib(c.machine.host_memory_bytes)}, SSD {_gib(c.machine.ssd_bytes)}",
        "",
        f"{'tier':<7} {'needs/machine':>16} {'capacity':>16} {'use':>7}  fits  holds",
    ]
    for t in p.tiers:
        lines.append(
            f"{t.tier:<7} {_gib(t.bytes_per_machine):>16} {_gib(t.capacity_per_machine):>16} "
            f"{100 * t.utilization:>6.1f}%  {'yes ' if t.fits else 'NO  '}  {t.holds}"
        )
    lines.append("")
    lines.append(
        f"all-resident (16 B x (D+S) on devices): {_gib(p.resident_bytes_per_machine)} per machine -> "
        f"{'fits' if p.resident_fits else 'does NOT fit'} in {_gib(c.machine.device_memory_bytes)} of device memory"
    )
    ssd_machines = int(-(-BYTES_SPARSE_SSD * md.sparse_params // c.machine.ssd_bytes))
    hints = {
        "device": f"; device fits up to alpha={p.max_alpha_device:.3g}" if p.max_alpha_device > 0
        else "; the dense states alone do not fit",
        "host": f"; host fits up to alpha={p.max_alpha_host:.3g}",
        "ssd": f"; needs >= {ssd_machines} machines' SSDs",
    }
    for t in p.tiers:
        if not t.fits:
            short = _gib(t.bytes_per_machine - t.capacity_per_machine)
            lines.append(f"DOES NOT FIT: {t.tier} short by {short} per machine{hints[t.tier]}")
    if p.fits:
        lines.append(
            f"verdict: fits (host allows alpha <= {p.max_alpha_host:.3g}, device allows alpha <= {p.max_alpha_device:.3g})"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- YAML input
def _gb(d: Mapping[str, Any], key: str, where: str) -> float:
    if key not in d:
        raise ValueError(f"{where}: missing '{key}'")
    v = d[key]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{where}.{key} must be a positive number (GiB), got {v!r}")
    return float(v) * GIB


_CLUSTER_KEYS = {"name", "machines", "machine", "model", "notes"}
_MACHINE_KEYS = {"devices", "device_memory_gb", "host_memory_gb", "ssd_gb"}
_MODEL_KEYS = {"name", "dense_params", "sparse_params", "moe_layers", "alpha", "train_config", "notes"}


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        near = suggest_key(extra[0], sorted(allowed))
        hint = f" (did you mean '{near}'?)" if near else ""
        raise ValueError(f"{where}: unknown key '{extra[0]}'{hint}; valid keys: {sorted(allowed)}")


def cluster_from_dict(d: Mapping[str, Any], where: str = "cluster") -> ClusterSpec:
    """``{name, machines, machine: {devices, device_memory_gb (per device), host_memory_gb, ssd_gb}}``."""
    _check_keys(d, _CLUSTER_KEYS, where)
    m = d.get("machine")
    if not isinstance(m, Mapping):
        raise ValueError(f"{where}: 'machine' must be a mapping with {sorted(_MACHINE_KEYS)}")
    _check_keys(m, _MACHINE_KEYS, f"{where}.machine")
    devices = int(m.get("devices", 1))
    spec = MachineSpec(
        devices=devices,
        device_memory_bytes=_gb(m, "device_memory_gb", f"{where}.machine") * devices,
        host_memory_bytes=_gb(m, "host_memory_gb", f"{where}.machine"),
        ssd_bytes=_gb(m, "ssd_gb", f"{where}.machine"),
    )
    machines = d.get("machines")
    if not isinstance(machines, int) or isinstance(machines, bool):
        raise ValueError(f"{where}.machines must be an integer, got {machines!r}")
    return ClusterSpec(str(d.get("name", where)), machines, spec)


#: Counts a training config's model: ``(path, alpha, name) -> ModelSpec``
#: (:func:`paddle_semoe.engine.plan.model_spec_from_train_config`; storage cannot import the engine).
TrainConfigCounter = Callable[[Path, float | None, str | None], ModelSpec]


def model_from_dict(
    d: Mapping[str, Any], base_dir: Path | None = None, where: str = "model", count_train_config: TrainConfigCounter | None = None
) -> ModelSpec:
    """Counts given directly, or ``train_config: <yaml>`` (counted by ``count_train_config``)."""
    _check_keys(d, _MODEL_KEYS, where)
    if "train_config" in d:
        if count_train_config is None:
            raise ValueError(f"{where}: 'train_config' needs a config counter (tools/plan.py passes one); give the counts instead")
        path = Path(d["train_config"])
        if base_dir is not None and not path.is_absolute():
            path = (base_dir / path).resolve()
        return count_train_config(path, d.get("alpha"), d.get("name"))
    for key in ("dense_params", "sparse_params", "moe_layers", "alpha"):
        if key not in d:
            raise ValueError(f"{where}: missing '{key}' (or give 'train_config')")
    return ModelSpec(str(d.get("name", "model")), float(d["dense_params"]), float(d["sparse_params"]), int(d["moe_layers"]), float(d["alpha"]))


@dataclass(frozen=True)
class CpuKnobs:
    """Suggested ``storage`` settings of this implementation for one rank."""

    working_set_mb: float  # 4 B x alpha x S_local (all MoE layers of a micro-batch)
    host_cache_mb: float  # 12 B x alpha x S_local (the activated states) -- the least that avoids re-reads
    ssd_mb: float  # 4096-byte header + padded 12 B x S_local
    resident_mb: float  # 16 B x S_local kept resident instead


def cpu_knobs(model: ModelSpec, ranks: int = 1) -> CpuKnobs:
    s_local = model.sparse_params / ranks
    mib = float(1 << 20)
    return CpuKnobs(
        working_set_mb=BYTES_SPARSE_COMPUTE * model.alpha * s_local / mib,
        host_cache_mb=BYTES_SPARSE_SSD * model.alpha * s_local / mib,
        ssd_mb=BYTES_SPARSE_SSD * s_local / mib,
        resident_mb=BYTES_DENSE * s_local / mib,
    )
