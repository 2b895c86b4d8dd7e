"""Tier planning over every recorded machine, the tier table's validation, overrides, preflight, and a
property test (hypothesis) of the planner against an independent statement of what "fits" means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import SpecError, TierError
from installer.hardware.machine import Cpu, Gpu, Machine, load_machine, version_tuple
from installer.planning.planner import INCOMPATIBLE, LOW_MEMORY, RUNNABLE, plan
from installer.planning.preflight import bundle_python, preflight, venv_estimate
from installer.planning.tiers import ALL_LAYERS, Tier, parse_tier, parse_tiers
from installer.toolchain.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
MACHINES = Path(__file__).parent / "fixtures" / "machines"
R, L, X = RUNNABLE, LOW_MEMORY, INCOMPATIBLE

# machine -> (the tier a person would pick, verdicts of multi-gpu / gpu / gpu-small / cpu, GPUs used)
EXPECTED = {
    "cpu-8c-16g": ("cpu", (X, X, X, R), ()),
    "t4-16g": ("gpu-small", (X, X, R, R), (0,)),  # compute capability 7.5: no bf16
    "l4-24g": ("gpu", (X, R, R, R), (0,)),
    "2x-rtx3090-24g": ("multi-gpu", (R, R, R, R), (0, 1)),
    "a100-40g": ("gpu", (X, R, R, R), (0,)),
    "4x-a100-80g": ("multi-gpu", (R, R, R, R), (0, 1, 2, 3)),
    "8x-h100-80g": ("multi-gpu", (R, R, R, R), tuple(range(8))),
    "a100-40g-mig": ("gpu", (X, R, R, R), (0,)),  # on its 3g.20gb instance
    "a10-old-driver": ("cpu", (X, X, X, R), ()),  # driver 470 / CUDA 11.4 under the 12.1 floor
    "a6000-busy": ("gpu-small", (X, L, R, R), (0,)),  # 5 GiB free of 48: not enough for gpu
}


@pytest.fixture(scope="module")
def demo() -> list[Tier]:
    spec = load_spec(REPO / "bundles" / "demo.toml")
    return parse_tiers(spec.tiers, {m.id: (m.backend, m.context_length) for m in spec.models})


def test_every_recorded_machine_is_covered() -> None:
    assert sorted(EXPECTED) == sorted(p.stem for p in MACHINES.glob("*.json"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_machine_gets_the_tier_a_person_would_pick(name: str, demo: list[Tier]) -> None:
    chosen, verdicts, gpus = EXPECTED[name]
    p = plan(load_machine(MACHINES / f"{name}.json"), demo)
    assert p.chosen is not None and p.chosen.name == chosen
    assert tuple(v.verdict for v in p.verdicts) == verdicts
    assert p.verdict(chosen).gpus == gpus
    assert all(v.reasons for v in p.verdicts)  # every verdict says why
    js = p.to_json()
    assert js["chosen"] == chosen and [t["name"] for t in js["tiers"]] == ["multi-gpu", "gpu", "gpu-small", "cpu"]
    assert js["machine"]["gpus"] == p.machine.to_json()["gpus"]


@pytest.mark.parametrize("name, tier, words", [
    ("t4-16g", "gpu", "needs compute capability 8.0, GPU 0 has 7.5"),
    ("a6000-busy", "gpu", "needs 8 GiB free per GPU, GPU 0 has 5 GiB free of 48 GiB"),
    ("a10-old-driver", "gpu-small", "needs a driver that supports CUDA 12.1, driver 470.199.02 supports CUDA 11.4"),
    ("l4-24g", "multi-gpu", "needs 2 GPUs with 8 GiB free and compute capability 8.0, the machine has 1"),
    ("cpu-8c-16g", "gpu", "needs 1 GPU with 8 GiB free and compute capability 8.0, the machine has none"),
    ("cpu-8c-16g", "multi-gpu", "needs 16 GiB RAM, the machine has 15 GiB"),
    ("4x-a100-80g", "multi-gpu", "GPU 3 (79 GiB free): 4 replicas"),
])
def test_reasons_are_in_numbers(name: str, tier: str, words: str, demo: list[Tier]) -> None:
    assert words in " | ".join(plan(load_machine(MACHINES / f"{name}.json"), demo).verdict(tier).reasons)


def test_appliance_toml_settings_from_the_plan(demo: list[Tier]) -> None:
    cpu = plan(load_machine(MACHINES / "cpu-8c-16g.json"), demo)
    assert cpu.model_settings() == {
        "tier": "cpu", "id": "smollm2-135m-instruct-q4_1", "backend": "llama.cpp", "context_length": 2048,
        "threads": 8, "gpu_layers": 0, "replicas": 1, "tensor_parallel": 1, "gpus": [], "quantization": "Q4_1",
        "cuda_visible_devices": ""}  # empty: CUDA sees no GPU at all
    assert cpu.chosen.trainer_settings() == {"lora_rank": 8, "lora_alpha": 16, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "batch_size": 4}
    h100 = plan(load_machine(MACHINES / "8x-h100-80g.json"), demo).model_settings()
    assert (h100["backend"], h100["dtype"], h100["replicas"], h100["gpus"]) == ("transformers", "bfloat16", 8, list(range(8)))
    h100_gpus = load_machine(MACHINES / "8x-h100-80g.json").gpus
    assert h100["cuda_visible_devices"] == ",".join(g.uuid for g in h100_gpus) and h100["cuda_visible_devices"].startswith("GPU-")
    mig = plan(load_machine(MACHINES / "a100-40g-mig.json"), demo).model_settings()
    mig_gpu = load_machine(MACHINES / "a100-40g-mig.json").gpus[0]
    assert mig["cuda_visible_devices"] == mig_gpu.mig_devices[0].uuid  # the 3g.20gb instance, not the whole GPU
    no_uuid = Machine(tuple(Gpu(**{**g.__dict__, "uuid": None}) for g in h100_gpus[:2]),
                      *(getattr(load_machine(MACHINES / "8x-h100-80g.json"), k) for k in ("driver_version", "cuda_driver_version", "cpu", "ram_mib", "disk_free_mib")))
    assert plan(no_uuid, demo).model_settings()["cuda_visible_devices"] == "0,1"
    t4 = plan(load_machine(MACHINES / "t4-16g.json"), demo).model_settings()
    assert (t4["gpu_layers"], t4["replicas"], "dtype" in t4) == (ALL_LAYERS, 1, False)


def test_override(demo: list[Tier]) -> None:
    busy = plan(load_machine(MACHINES / "a6000-busy.json"), demo)
    assert busy.select().name == "gpu-small"
    assert busy.select("gpu").name == "gpu"  # low memory: the administrator may know it frees up
    assert busy.select("cpu").name == "cpu"
    with pytest.raises(TierError) as e:
        busy.select("multi-gpu")
    assert "cannot run on this machine: needs 2 GPUs" in e.value.message and "'gpu-small'" in e.value.hint
    with pytest.raises(TierError, match="no tier 'huge'"):
        busy.select("huge")


def test_no_runnable_tier_says_why(demo: list[Tier]) -> None:
    m = load_machine(MACHINES / "a6000-busy.json")
    p = plan(m, [t for t in demo if t.name == "gpu"])
    assert p.chosen is None and "gpu would run once GPU memory is freed" in p.reason
    with pytest.raises(TierError, match="No tier of this bundle is runnable"):
        p.select()
    assert plan(m, []).chosen is None and "no tiers" in plan(m, []).reason


MINIMAL = {"name": "cpu", "model": "m"}
MODELS = {"m": ("llama.cpp", 4096), "s": ("transformers", 8192)}


@pytest.mark.parametrize("change, words", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"model": "nope"}, "names the model 'nope', which the bundle does not have"),
    ({"backend": "transformers"}, "runs 'm' on transformers, but that model is for llama.cpp"),
    ({"context_length": 9000}, "asks for a 9000-token context; the model 'm' supports 4096"),
    ({"model": "s", "dtype": "bfloat16", "needs": {"gpu_count": 1, "compute_capability": "7.5"}}, "without requiring compute capability 8.0"),
    ({"model": "s", "dtype": "int3"}, "dtype 'int3'"),
    ({"dtype": "float16"}, "sets dtype for llama.cpp"),
    ({"gpu_layers": "all"}, "puts layers on a GPU but needs no GPU"),
    ({"replicas": "per-gpu"}, "spreads over GPUs but needs none"),
    ({"needs": {"gpu_count": 1}, "replicas": 2}, "runs 2 replica(s) over 1 GPU(s) each but needs only 1 GPUs"),
    ({"needs": {"gpu_memory": 8}}, "needs has an unknown key 'gpu_memory'"),
    ({"needs": {"cuda": "12"}, "threads": 0}, "threads must be a positive count"),
    ({"needs": {"pci_device_ids": ["A100"]}}, "not a PCI id"),
    ({"needs": {"ram_mib": -1}}, "ram_mib = -1 must be at least 0"),
    ({"lora": {"targets": []}}, "lora.targets must be a non-empty list"),
    ({"name": "GPU Tier"}, "must be lowercase letters"),
])
def test_bad_tiers_are_refused_with_the_key(change: dict[str, Any], words: str) -> None:
    with pytest.raises(TierError) as e:
        parse_tiers([MINIMAL, {**MINIMAL, "name": "other", **change}], MODELS)
    assert words in e.value.message


def test_a_minimal_tier_takes_the_models_settings() -> None:
    (t,) = parse_tiers([MINIMAL], MODELS)
    assert (t.backend, t.context_length, t.gpu_layers, t.threads, t.needs.gpu_count) == ("llama.cpp", 4096, 0, "physical-cores", 0)
    with pytest.raises(TierError, match="names 'cpu' twice"):
        parse_tiers([MINIMAL, MINIMAL], MODELS)


def test_a_bad_tier_fails_the_spec_at_build_time(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    spec = tmp_path / "s.toml"
    spec.write_text(f'name = "x"\nversion = "1"\n[wheelhouse]\nproject = "{REPO}"\n'
                    '[[models]]\nid = "m"\nbackend = "llama.cpp"\nformat = "gguf"\ncontext_length = 512\n'
                    '[[models.files]]\nname = "model.gguf"\nsource = "model.bin"\n'
                    '[[tiers]]\nname = "gpu"\nmodel = "m"\nneeds = { gpu_count = 1, compute_capability = "8" }\ngpu_layers = "some"\n')
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    assert "tier 1 (gpu).gpu_layers" in e.value.message


def _machine(**kw: Any) -> Machine:
    base = load_machine(MACHINES / "l4-24g.json")
    return Machine(**{**base.__dict__, **kw})


def test_preflight(demo: list[Tier]) -> None:
    gpu = next(t for t in demo if t.name == "gpu")
    ok = _machine(python_version="3.11.2", systemd=True)
    assert preflight(ok, gpu, model_bytes=300 << 20, venv_bytes=venv_estimate(1 << 30), python="3.11") == []
    problems = preflight(_machine(disk_free_mib=2048, ram_mib=4096, python_version="3.12.1", systemd=False,
                                  driver_version="470.199.02", cuda_driver_version="11.4"),
                         gpu, model_bytes=300 << 20, venv_bytes=3 << 30, python=bundle_python("linux-x86_64-cp311"))
    text = "\n".join(problems)
    assert "needs 8 GiB RAM, the machine has 4 GiB" in text
    assert "needs 3.6 GiB free disk for the decrypted model (0.3 GiB) and the venv (3 GiB), the install root has 2 GiB free" in text
    assert "supports CUDA 11.4" in text and "Python 3.11" in text and "3.12.1" in text and "--no-systemd" in text
    assert not any("systemd" in p for p in preflight(_machine(systemd=False), gpu, model_bytes=0, no_systemd=True))
    assert "needs 1 GPU(s), the machine has none" in " ".join(preflight(_machine(gpus=()), gpu, model_bytes=0))


# ---- property: the planner against an independent statement of "fits" ----

CCS = ["6.1", "7.0", "7.5", "8.0", "8.6", "9.0"]
PCI = ["0x1EB810DE", "0x20B210DE", "0x233010DE", "0x220410DE"]
DRIVERS = [("470.199.02", "11.4"), ("525.60.13", "12.0"), ("535.183.01", "12.2"), ("550.54.15", "12.4")]


@st.composite
def gpus(draw: st.DrawFn, index: int) -> Gpu:
    total = draw(st.sampled_from([4096, 8192, 16384, 24576, 81920]))
    known = draw(st.booleans()) or draw(st.booleans())  # mostly known; sometimes NVML refused
    # Boundaries next to the tiers' floors, where an off-by-one in the planner would show.
    edges = [v for need in (4096, 8192, 20000, 80000) for v in (need - 1, need) if v <= total]
    free = draw(st.one_of(st.integers(0, total), st.sampled_from(edges)))
    return Gpu(index, "GPU", draw(st.sampled_from(PCI)), total if known else None, free if known else None, draw(st.sampled_from(CCS)))


@st.composite
def machines(draw: st.DrawFn) -> Machine:
    n = draw(st.integers(0, 8))
    driver, cuda = draw(st.sampled_from(DRIVERS)) if n else (None, None)
    return Machine(tuple(draw(gpus(i)) for i in range(n)), driver, cuda, Cpu("cpu", draw(st.integers(1, 64)), 128),
                   draw(st.integers(512, 1 << 20)), draw(st.integers(0, 1 << 22)))


@st.composite
def tier_tables(draw: st.DrawFn) -> list[Tier]:
    tiers = []
    for i in range(draw(st.integers(1, 5))):
        count = draw(st.integers(0, 4))
        needs: dict[str, Any] = {"gpu_count": count, "ram_mib": draw(st.sampled_from([0, 4096, 65536])),
                                 "disk_mib": draw(st.sampled_from([0, 4096, 1 << 21]))}
        if count:
            needs["gpu_memory_mib"] = draw(st.sampled_from([0, 4096, 8192, 20000, 80000]))
            for key, values in (("compute_capability", CCS), ("cuda", ["11.8", "12.1", "12.4"]), ("driver", ["450.80.02", "525.60.13"])):
                if draw(st.booleans()):
                    needs[key] = draw(st.sampled_from(values))
            if draw(st.integers(0, 3)) == 0:
                needs["pci_device_ids"] = draw(st.lists(st.sampled_from(PCI), min_size=1, max_size=2))
        data = {"name": f"t{i}", "model": "m", "backend": "llama.cpp", "context_length": 512, "needs": needs,
                "gpu_layers": "all" if count else 0, "replicas": draw(st.sampled_from(["per-gpu", 1])) if count else 1}
        tiers.append(parse_tier(data, f"tier {i + 1}"))
    return tiers


def fits(m: Machine, t: Tier) -> bool:
    """What "runnable" means, stated directly from the needs."""
    n = t.needs
    if m.ram_mib < n.ram_mib or m.disk_free_mib < n.disk_mib:
        return False
    if not n.gpu_count:
        return True
    if not m.gpus:
        return False
    assert m.cuda_driver_version and m.driver_version
    if (n.cuda and version_tuple(m.cuda_driver_version) < version_tuple(n.cuda)) or (n.driver and version_tuple(m.driver_version) < version_tuple(n.driver)):
        return False
    good = [g for g in m.gpus
            if (not n.gpu_memory_mib or (g.memory_free_mib is not None and g.memory_free_mib >= n.gpu_memory_mib))
            and (not n.compute_capability or version_tuple(g.compute_capability) >= version_tuple(n.compute_capability))
            and (not n.pci_device_ids or g.pci_device_id in n.pci_device_ids)]
    return len(good) >= n.gpu_count


@settings(max_examples=300, deadline=None)
@given(machines(), tier_tables())
def test_planner_chooses_the_first_runnable_tier_and_never_an_incompatible_one(m: Machine, tiers: list[Tier]) -> None:
    p = plan(m, tiers)
    runnable = [t for t, v in zip(tiers, p.verdicts, strict=True) if v.verdict == RUNNABLE]
    assert p.chosen is (runnable[0] if runnable else None)
    for t, v in zip(tiers, p.verdicts, strict=True):
        assert (v.verdict == RUNNABLE) == fits(m, t), (t, v)
        assert v.reasons
        if v.verdict == RUNNABLE:
            assert len(v.gpus) >= t.needs.gpu_count and len(set(v.gpus)) == len(v.gpus)
        else:
            with pytest.raises(TierError) if v.verdict == INCOMPATIBLE else _nothing():
                p.select(t.name)
    # Freeing every GPU's memory never makes a runnable tier worse, and cures every low-memory one.
    idle = Machine(tuple(Gpu(**{**g.__dict__, "memory_free_mib": g.memory_total_mib}) for g in m.gpus),
                   *(getattr(m, k) for k in ("driver_version", "cuda_driver_version", "cpu", "ram_mib", "disk_free_mib")))
    for before, after in zip(p.verdicts, plan(idle, tiers).verdicts, strict=True):
        if before.verdict in (RUNNABLE, LOW_MEMORY):
            assert after.verdict == RUNNABLE


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False
