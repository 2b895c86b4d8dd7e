"""Machine files: the contract shape, strict loading, atomic saving, and realistic recorded machines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import HardwareError
from installer.hardware.machine import Machine, gib, load_machine, save_machine, version_tuple

MACHINES = Path(__file__).parent / "fixtures" / "machines"
FILES = sorted(MACHINES.glob("*.json"))

ISSUE_EXAMPLE = {
    "gpus": [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "pci_device_id": "0x20B210DE",
              "memory_total_mib": 81920, "memory_free_mib": 81000, "compute_capability": "8.0", "mig_enabled": False}],
    "driver_version": "550.54.15", "cuda_driver_version": "12.4",
    "cpu": {"model": "AMD EPYC 7763", "physical_cores": 64, "logical_cores": 128},
    "ram_mib": 515000, "disk_free_mib": 2000000,
}

# PCI device ids (device << 16 | 0x10DE) and compute capabilities as NVIDIA ships them.
KNOWN_GPUS = {
    "Tesla T4": ("0x1EB810DE", "7.5"), "NVIDIA L4": ("0x27B810DE", "8.9"),
    "NVIDIA GeForce RTX 3090": ("0x220410DE", "8.6"), "NVIDIA A100-SXM4-40GB": ("0x20B010DE", "8.0"),
    "NVIDIA A100-SXM4-80GB": ("0x20B210DE", "8.0"), "NVIDIA H100 80GB HBM3": ("0x233010DE", "9.0"),
    "NVIDIA A10": ("0x223610DE", "8.6"), "NVIDIA RTX A6000": ("0x223010DE", "8.6"),
}
# Driver branch -> the CUDA version it supports (NVIDIA's CUDA toolkit release notes, table 3).
DRIVER_CUDA = {"470": "11.4", "535": "12.2", "545": "12.3", "550": "12.4"}


def test_the_issue_example_loads_and_round_trips() -> None:
    m = Machine.from_json(ISSUE_EXAMPLE)
    assert m.gpus[0].pci_device_id == "0x20B210DE" and m.cpu.physical_cores == 64 and m.python_version is None
    out = m.to_json()
    assert {k: out[k] for k in ISSUE_EXAMPLE} == ISSUE_EXAMPLE


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_recorded_machines_load_round_trip_and_are_realistic(path: Path) -> None:
    data = json.loads(path.read_text())
    m = load_machine(path)
    assert m.to_json() == data  # the file is exactly what the probe would write
    for g in m.gpus:
        assert KNOWN_GPUS[g.name] == (g.pci_device_id, g.compute_capability)
        if g.memory_total_mib is not None:
            assert 0 <= g.memory_free_mib <= g.memory_total_mib
    if m.gpus:
        assert DRIVER_CUDA[m.driver_version.split(".")[0]] == m.cuda_driver_version
    assert m.cpu.physical_cores <= m.cpu.logical_cores


def test_the_expected_set_of_recorded_machines_is_there() -> None:
    summaries = {p.stem: load_machine(p) for p in FILES}
    assert summaries["cpu-8c-16g"].gpus == () and summaries["cpu-8c-16g"].cpu.physical_cores == 8
    assert len(summaries["8x-h100-80g"].gpus) == 8 and len(summaries["4x-a100-80g"].gpus) == 4
    assert summaries["a100-40g-mig"].gpus[0].mig_enabled
    assert len(FILES) == 10


def test_save_then_load(tmp_path: Path) -> None:
    m = load_machine(MACHINES / "a100-40g-mig.json")
    save_machine(m, tmp_path / "sub" / "m.json")
    assert load_machine(tmp_path / "sub" / "m.json") == m
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.json"]  # no temp file left behind


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.pop("ram_mib"), "no 'ram_mib' in top level"),
    (lambda d: d["gpus"][0].update(memory_total_mib="80G"), "gpus[0].memory_total_mib = '80G', which is not a int"),
    (lambda d: d["gpus"][0].update(pci_device_id="A100"), "not a PCI id"),
    (lambda d: d.update(cuda_driver_version="twelve"), "not a dotted version"),
    (lambda d: d["cpu"].update(physical_cores=-1), "negative cpu.physical_cores"),
    (lambda d: d["gpus"][0].update(mig_enabled="yes"), "mig_enabled = 'yes', which is not a bool"),
    (lambda d: d.update(gpus={}), "gpus = {}, which is not a list"),
])
def test_bad_machine_files_name_the_key(tmp_path: Path, mutate, words: str) -> None:
    data = json.loads(json.dumps(ISSUE_EXAMPLE))
    mutate(data)
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(HardwareError) as e:
        load_machine(tmp_path / "m.json")
    assert words in e.value.message and "m.json" in e.value.message


def test_unreadable_machine_files(tmp_path: Path) -> None:
    with pytest.raises(HardwareError, match="does not exist") as e:
        load_machine(tmp_path / "absent.json")
    assert "--record" in e.value.hint
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(HardwareError, match="not valid JSON"):
        load_machine(tmp_path / "bad.json")


def test_lowercase_pci_ids_are_normalised() -> None:
    data = json.loads(json.dumps(ISSUE_EXAMPLE))
    data["gpus"][0]["pci_device_id"] = "0x20b210de"
    assert Machine.from_json(data).gpus[0].pci_device_id == "0x20B210DE"


def test_versions_compare_as_numbers_and_sizes_read_as_gib() -> None:
    assert version_tuple("550.54.15") > version_tuple("535.183.01") > version_tuple("470.199.02")
    assert version_tuple("12.10") > version_tuple("12.4")  # as strings this would be the other way round
    assert (gib(8192), gib(15360), gib(4864), gib(81559)) == ("8", "15", "4.8", "80")
