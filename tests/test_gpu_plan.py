"""The plan reaches the processes, on recorded GPU machines: [model] carries the devices, the units set
CUDA_VISIBLE_DEVICES to them (a MIG instance by its UUID), the trainer of a multi-GPU tier runs under
torchrun, each replica is pinned to its GPU, and a GPU tier on this CPU host refuses to start."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.config import ModelConfig, model_config
from appliance.engines import load_engine
from appliance.engines.replicas import replica_devices
from appliance.errors import EngineError, StateError
from installer.hardware.machine import load_machine
from installer.planning.planner import plan
from installer.planning.tiers import Tier, parse_tiers
from installer.steps.activate import unit_settings
from installer.system.units import SERVER, TRAINER, load_templates, render_units
from installer.toolchain.spec import load_spec
from tests.server_fixtures import make_root

REPO = Path(__file__).resolve().parent.parent
MACHINES = Path(__file__).parent / "fixtures" / "machines"
REFUSED = "never falls back to the CPU"


@pytest.fixture(scope="module")
def demo() -> list[Tier]:
    spec = load_spec(REPO / "bundles" / "demo.toml")
    return parse_tiers(spec.tiers, {m.id: (m.backend, m.context_length) for m in spec.models})


def _planned(demo: list[Tier], machine: str, tier: str | None = None) -> tuple[Tier, dict[str, Any]]:
    p = plan(load_machine(MACHINES / f"{machine}.json"), demo)
    chosen = p.select(tier)
    return chosen, dict(p.model_settings(chosen), path="/var/lib/appliance/models/x")


def _units(t: Tier, settings: dict[str, Any]) -> dict[str, str]:
    ctx = SimpleNamespace(config={"model": settings})
    return render_units(unit_settings(ctx, SimpleNamespace(backend=t.backend, uses_gpu=t.uses_gpu)), load_templates())  # type: ignore[arg-type]


def _env(unit: str) -> list[str]:
    return [line for line in unit.splitlines() if line.startswith("Environment=CUDA")]


def test_eight_gpus_reach_both_units_by_uuid_and_the_trainer_runs_one_process_per_gpu(demo: list[Tier]) -> None:
    t, settings = _planned(demo, "8x-h100-80g")
    uuids = [g.uuid for g in load_machine(MACHINES / "8x-h100-80g.json").gpus]
    assert t.name == "multi-gpu" and settings["gpus"] == list(range(8)) and settings["cuda_visible_devices"] == ",".join(uuids)
    units = _units(t, settings)
    for name in (SERVER, TRAINER):
        assert _env(units[name]) == [f"Environment=CUDA_VISIBLE_DEVICES={','.join(uuids)}"]
    assert ("ExecStart=/opt/appliance/current/venv/bin/torchrun --standalone --nproc-per-node=8 --no-python "
            "/opt/appliance/current/venv/bin/appliance train") in units[TRAINER].splitlines()


def test_a_mig_instance_is_named_by_its_uuid_and_one_gpu_trains_in_one_process(demo: list[Tier]) -> None:
    t, settings = _planned(demo, "a100-40g-mig")
    mig = load_machine(MACHINES / "a100-40g-mig.json").gpus[0].mig_devices[0].uuid
    assert mig is not None and mig.startswith("MIG-")
    units = _units(t, settings)
    assert _env(units[SERVER]) == [f"Environment=CUDA_VISIBLE_DEVICES={mig}"] == _env(units[TRAINER])
    assert "ExecStart=/opt/appliance/current/venv/bin/appliance train" in units[TRAINER].splitlines()


def test_a_cpu_tier_hides_every_gpu_and_indices_keep_nvmls_order(demo: list[Tier]) -> None:
    t, settings = _planned(demo, "cpu-8c-16g")
    assert _env(_units(t, settings)[SERVER]) == ["Environment=CUDA_VISIBLE_DEVICES="]  # CUDA sees no GPU at all
    t, settings = _planned(demo, "2x-rtx3090-24g")
    indices = dict(settings, cuda_visible_devices="0,1")  # a driver that reported no UUIDs
    assert _env(_units(t, indices)[SERVER]) == ["Environment=CUDA_VISIBLE_DEVICES=0,1 CUDA_DEVICE_ORDER=PCI_BUS_ID"]
    with pytest.raises(StateError, match="not a list of GPU UUIDs"):
        _units(t, dict(settings, cuda_visible_devices="0\nExecStartPre=/bin/sh"))
    unplanned = {k: v for k, v in settings.items() if k != "cuda_visible_devices"}
    assert _env(_units(t, unplanned)[SERVER]) == []  # absent from appliance.toml: left as systemd has it


def _cuda_sees(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """What torch answers on a host with `n` GPUs (the one part of this test that cannot be real here)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("machine, devices", [
    ("8x-h100-80g", [f"cuda:{i}" for i in range(8)]),  # one replica pinned to each planned GPU
    ("2x-rtx3090-24g", ["cuda:0", "cuda:1"]),
    ("a100-40g-mig", ["cuda:0"]),  # the MIG instance is the one device CUDA_VISIBLE_DEVICES shows
    ("cpu-8c-16g", [None]),
])
def test_each_replica_is_pinned_to_a_planned_gpu(machine: str, devices: list[str | None], demo: list[Tier],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    t, settings = _planned(demo, machine)
    cfg = model_config(settings)  # what the server reads from appliance.toml
    assert cfg.gpus == tuple(settings["gpus"]) and cfg.replicas == max(1, len(devices))
    _cuda_sees(monkeypatch, len(settings["gpus"]))
    assert replica_devices(cfg) == devices
    _cuda_sees(monkeypatch, 1)
    if len(devices) > 1:  # fewer GPUs than planned: refused, naming both counts
        with pytest.raises(EngineError, match=f"planned for {len(devices)} GPUs .* and CUDA sees 1"):
            replica_devices(cfg)


def test_two_replicas_on_one_gpu_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda_sees(monkeypatch, 2)
    cfg = ModelConfig(path="/m", backend="transformers", tier="multi-gpu", gpus=(3, 5), replicas=4)
    assert replica_devices(cfg) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_a_transformers_gpu_tier_on_this_cpu_host_refuses_to_start(smollm2_safetensors: Path, tmp_path: Path, demo: list[Tier]) -> None:
    _, settings = _planned(demo, "l4-24g")
    root = make_root(tmp_path, smollm2_safetensors, backend="transformers")
    gpu = dataclasses.replace(root.config.model, tier="gpu", gpus=(0,), dtype="bfloat16", cuda_visible_devices=settings["cuda_visible_devices"])
    with pytest.raises(EngineError) as e:
        load_engine(gpu, root.layout, max_batch=1, max_queue=1)
    assert e.value.message.startswith("The tier gpu runs on GPU 0, but torch ") and REFUSED in e.value.message
    assert e.value.message.count(". ") == 0 and "--tier cpu" in e.value.hint  # one sentence, and what to do
    from appliance.engines.transformers_engine import TransformersBackend

    with pytest.raises(EngineError, match=REFUSED):  # asked directly for cuda, the backend refuses too
        TransformersBackend(root.config.model.resolve_path(root.layout), context_length=64, device="cuda:0")


def test_a_llama_cpp_gpu_tier_on_the_cpu_only_build_refuses_to_start(smollm2_gguf: Path, tmp_path: Path) -> None:
    root = make_root(tmp_path, smollm2_gguf)
    gpu = dataclasses.replace(root.config.model, tier="gpu-small", gpu_layers=-1)
    with pytest.raises(EngineError) as e:
        load_engine(gpu, root.layout, max_batch=1, max_queue=1)
    assert e.value.message == ("The tier gpu-small puts every layer of the model on a GPU, but this llama.cpp build has no GPU "
                               "backend (it is the CPU-only build), so the server will not start (it never falls back to the CPU).")


def test_the_installers_engine_check_stops_a_gpu_tier_on_this_host(smollm2_gguf: Path, demo: list[Tier]) -> None:
    from appliance.engines import selftest

    _, settings = _planned(demo, "t4-16g")  # gpu-small: llama.cpp, every layer on the GPU
    with pytest.raises(EngineError) as e:
        selftest.run(sys.executable, Path("/"), dict(settings, path=str(smollm2_gguf)))
    assert REFUSED in e.value.message, e.value.message


def _fake_nvml(machine: str, **gpu_fields: Any) -> Any:
    import json

    from tests.fake_pynvml import FakeNvml

    data = json.loads((MACHINES / f"{machine}.json").read_text())
    for g in data["gpus"]:
        g.update(gpu_fields)
    return FakeNvml(data)


def test_metrics_export_memory_and_utilisation_of_the_servers_gpus_and_the_console_reads_them() -> None:
    from appliance.console.sources.prom import gpus, parse
    from appliance.server.metrics import Metrics

    m = Metrics()
    m.bind_gpus((0, 1), _fake_nvml("4x-a100-80g", utilization_pct=37))
    text = m.render().decode()
    machine = load_machine(MACHINES / "4x-a100-80g.json")
    g0 = machine.gpus[0]
    assert g0.memory_total_mib is not None and g0.memory_free_mib is not None
    used = (g0.memory_total_mib - g0.memory_free_mib) << 20
    labels = (("gpu", "0"), ("name", str(g0.name)), ("uuid", str(g0.uuid)))
    assert parse(text)[("appliance_gpu_memory_used_bytes", labels)] == used
    assert 'appliance_gpu_utilization_percent{gpu="1"' in text and 'gpu="2"' not in text  # only the planned GPUs
    stats = gpus(parse(text))
    assert [(s.gpu, s.util_pct, s.total_mib) for s in stats] == [("0", 37.0, float(g0.memory_total_mib)),
                                                                 ("1", 37.0, float(machine.gpus[1].memory_total_mib or 0))]


def test_a_mig_gpu_reports_its_instances_memory_and_no_nvml_is_no_gpu_lines() -> None:
    from appliance.gpu_metrics import read_gpus
    from tests.fake_pynvml import FakeNvml

    (g,) = read_gpus([0], _fake_nvml("a100-40g-mig"))
    mig = load_machine(MACHINES / "a100-40g-mig.json").gpus[0].mig_devices
    assert g.memory_total_bytes == sum((d.memory_total_mib or 0) << 20 for d in mig) and g.utilization_pct is None
    no_driver = FakeNvml({"gpus": [], "driver_version": None})
    assert read_gpus(None, no_driver) == []
