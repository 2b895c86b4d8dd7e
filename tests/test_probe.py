"""The probe: the real one on this machine (no NVML library: the CPU case), and NVML answers recorded from
the machines in tests/fixtures/machines through a fake pynvml (NVML cannot exist here)."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pynvml
import pytest

from appliance.cli import main
from installer.hardware.machine import Machine, load_machine
from installer.hardware.probe import probe
from installer.planning.planner import INCOMPATIBLE, RUNNABLE, plan
from installer.planning.tiers import models_of, parse_tiers
from installer.toolchain.spec import load_spec
from tests.fake_pynvml import API, FakeNvml

MACHINES = Path(__file__).parent / "fixtures" / "machines"
FILES = sorted(MACHINES.glob("*.json"))
REPO = Path(__file__).resolve().parent.parent


def raw(name: str) -> dict:
    return json.loads((MACHINES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def demo_tiers() -> list:
    spec = load_spec(REPO / "bundles" / "demo.toml")
    return parse_tiers(spec.tiers, models_of(spec.models))


def test_the_fake_only_uses_names_the_real_pynvml_has() -> None:
    missing = [n for n in API if not hasattr(pynvml, n)]
    assert missing == []


def test_real_probe_on_this_machine_is_the_cpu_case(tmp_path: Path) -> None:
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):  # the premise: no NVML library here
        pynvml.nvmlInit()
    m = probe(tmp_path / "not" / "yet" / "there")  # an install root that does not exist yet
    assert m.gpus == () and m.driver_version is None and m.cuda_driver_version is None
    assert any("libnvidia-ml" in n for n in m.notes)
    assert m.cpu.logical_cores == psutil.cpu_count() and m.cpu.physical_cores >= 1
    assert m.ram_mib == psutil.virtual_memory().total >> 20
    assert m.disk_free_mib > 0 and m.python_version and m.python_version.startswith("3.")
    assert Machine.from_json(json.loads(json.dumps(m.to_json()))) == m


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_probe_reads_back_every_recorded_machine(path: Path) -> None:
    recorded = load_machine(path)
    fake = FakeNvml(json.loads(path.read_text()))
    m = probe(Path("/"), nvml=fake)
    assert m.gpus == recorded.gpus
    assert (m.driver_version, m.cuda_driver_version) == (recorded.driver_version, recorded.cuda_driver_version)
    assert not fake.initialised  # shut down after a successful init
    assert m.notes == recorded.notes


@pytest.mark.parametrize("fault, words", [
    ("LIBRARY_NOT_FOUND", "libnvidia-ml.so"),
    ("DRIVER_NOT_LOADED", "kernel driver is not loaded"),
    ("NO_PERMISSION", "run `appliance hw` as root"),
])
def test_nvml_that_does_not_start_is_the_cpu_case(fault: str, words: str, demo_tiers: list) -> None:
    m = probe(Path("/"), nvml=FakeNvml(raw("l4-24g"), {"nvmlInit": fault}))
    assert m.gpus == () and any(words in n for n in m.notes)
    assert plan(m, demo_tiers).chosen.name == "cpu"


def test_no_permission_on_one_gpu_leaves_it_unknown_and_the_answer_usable(demo_tiers: list) -> None:
    m = probe(Path("/"), nvml=FakeNvml(raw("2x-rtx3090-24g"), {"nvmlDeviceGetHandleByIndex:1": "NO_PERMISSION"}))
    assert m.gpus[0].memory_total_mib == 24576 and m.gpus[0].name == "NVIDIA GeForce RTX 3090"
    assert m.gpus[1].name is None and m.gpus[1].memory_total_mib is None
    assert any("GPU 1" in n and "no permission" in n and "root" in n for n in m.notes)
    p = plan(m, demo_tiers)
    assert p.chosen.name == "gpu" and p.verdict("gpu").gpus == (0,)
    multi = p.verdict("multi-gpu")
    assert multi.verdict == INCOMPATIBLE and any("GPU 1" in r and "could not be read" in r for r in multi.reasons)


def test_no_permission_on_memory_of_every_gpu(demo_tiers: list) -> None:
    m = probe(Path("/"), nvml=FakeNvml(raw("t4-16g"), {"nvmlDeviceGetMemoryInfo": "NO_PERMISSION"}))
    assert m.gpus[0].compute_capability == "7.5" and m.gpus[0].memory_total_mib is None
    p = plan(m, demo_tiers)
    assert p.chosen.name == "cpu"
    assert "GPU 0: its memory could not be read" in " ".join(p.verdict("gpu-small").reasons)


def test_mig_gpu_whose_parent_memory_fails_uses_its_instances(demo_tiers: list) -> None:
    m = probe(Path("/"), nvml=FakeNvml(raw("a100-40g-mig")))
    g = m.gpus[0]
    assert g.mig_enabled and g.memory_total_mib is None and [d.memory_total_mib for d in g.mig_devices] == [19968, 9856, 4864]
    assert any("MIG mode" in n for n in m.notes)
    p = plan(m, demo_tiers)
    assert p.chosen.name == "gpu" and "MIG instance 0" in p.verdict("gpu").reasons[0]


def test_mig_gpu_where_every_memory_query_fails_is_not_guessed(demo_tiers: list) -> None:
    faults = {f"nvmlDeviceGetMemoryInfo:0/{j}": "NOT_SUPPORTED" for j in range(3)}
    m = probe(Path("/"), nvml=FakeNvml(raw("a100-40g-mig"), faults))
    assert all(d.memory_total_mib is None for d in m.gpus[0].mig_devices)
    p = plan(m, demo_tiers)
    assert p.chosen.name == "cpu"
    for name in ("gpu", "gpu-small"):
        assert p.verdict(name).verdict == INCOMPATIBLE
        assert any("MIG mode" in r and "no memory" in r for r in p.verdict(name).reasons)


def test_driver_without_gpus() -> None:
    m = probe(Path("/"), nvml=FakeNvml(dict(raw("l4-24g"), gpus=[])))
    assert m.gpus == () and m.driver_version == "550.90.07" and any("reports no GPU" in n for n in m.notes)


def test_hw_on_this_machine_chooses_cpu_and_says_why_each_gpu_tier_is_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hw", "--json", "--bundle", str(REPO / "bundles" / "demo.toml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"] == "cpu" and out["machine"]["gpus"] == []
    verdicts = {t["name"]: t for t in out["tiers"]}
    assert list(verdicts) == ["multi-gpu", "gpu", "gpu-small", "cpu"]
    for name in ("multi-gpu", "gpu", "gpu-small"):
        assert verdicts[name]["verdict"] == INCOMPATIBLE
        assert any("the machine has none" in r for r in verdicts[name]["reasons"])
    assert verdicts["cpu"]["verdict"] == RUNNABLE

    assert main(["hw", "--bundle", str(REPO / "bundles" / "demo.toml")]) == 0
    text = capsys.readouterr().out
    assert "* cpu" in text and "chosen    cpu" in text and "needs 1 GPU with 8 GiB free" in text


def test_hw_record_then_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = tmp_path / "site.json"
    assert main(["hw", "--record", str(rec)]) == 0
    assert f"recorded this machine to {rec}" in capsys.readouterr().out
    recorded = load_machine(rec)
    assert recorded.gpus == () and recorded.cpu.logical_cores == psutil.cpu_count()
    assert main(["hw", "--machine", str(MACHINES / "8x-h100-80g.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"] == "multi-gpu" and out["tiers"][0]["gpus"] == list(range(8))
    assert main(["hw", "--machine", str(rec), "--record", str(tmp_path / "x.json")]) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_hw_modules_import_no_ml_framework() -> None:
    """The installer side never pulls torch or transformers (conversion imports them only when it runs)."""
    import subprocess
    import sys

    code = ("import sys, appliance.cli, appliance.cli.hw, installer.hardware.probe, installer.planning.planner, installer.planning.preflight, "
            "installer.toolchain.convert, installer.toolchain.build; appliance.cli.build_parser(); "
            "print([m for m in ('torch', 'transformers', 'peft', 'textual') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


@pytest.mark.gpu
def test_real_probe_where_a_gpu_exists(demo_tiers: list) -> None:
    m = probe(Path("/"))
    assert m.gpus and m.driver_version and m.cuda_driver_version
    for g in m.gpus:
        assert g.pci_device_id and g.pci_device_id.endswith("10DE") and g.compute_capability
        assert g.mig_enabled or (g.memory_total_mib and 0 <= g.memory_free_mib <= g.memory_total_mib)
    p = plan(m, demo_tiers)
    assert p.chosen is not None and p.verdict(p.chosen.name).verdict == RUNNABLE
