"""The wheelhouse's runtime variants (wheels/cpu/, wheels/cuda/): each tier names its own, a tier whose
runtime the bundle lacks is incompatible, and the install builds the venv from that runtime only.

The cuda variant with the real CUDA build of torch needs its wheels (several GB) in the CUDA wheel
cache (`python -m installer.toolchain.cuda_wheels` fills it once); without them that test skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.errors import SpecError, TierError
from appliance.paths import Layout
from installer.bundle.manifest import MANIFEST, SIGNATURE, canonical_json, parse_manifest
from installer.hardware.machine import load_machine
from installer.planning.planner import INCOMPATIBLE, RUNNABLE, plan
from installer.planning.tiers import parse_tier, parse_tiers
from installer.toolchain import cuda_wheels
from installer.toolchain.keygen import keygen, load_signing_key
from installer.toolchain.lockfile import LOCK, pins
from installer.toolchain.wheelhouse import parse_runtimes
from tests.install_fixtures import installable_spec
from tests.spec_files import write_spec

MACHINES = Path(__file__).parent / "fixtures" / "machines"
GPU_TIER = {"name": "multi-gpu", "gpu_layers": "all", "needs": {"gpu_count": 2, "ram_mib": 64, "disk_mib": 16}}


def test_a_tier_names_its_runtime_cuda_with_gpus_cpu_without() -> None:
    models = {"m": ("transformers", 512)}
    gpu = parse_tier({"name": "gpu", "model": "m", "dtype": "float16", "needs": {"gpu_count": 1}}, "tier 1", models)
    cpu = parse_tier({"name": "cpu", "model": "m", "dtype": "float32"}, "tier 2", models)
    assert (gpu.runtime, cpu.runtime) == ("cuda", "cpu")
    assert parse_tier({"name": "c", "model": "m", "dtype": "float32", "runtime": "cuda"}, "tier 3", models).runtime == "cuda"
    with pytest.raises(TierError, match="needs GPUs but names the cpu runtime"):
        parse_tier({"name": "g", "model": "m", "dtype": "float16", "runtime": "cpu", "needs": {"gpu_count": 1}}, "tier 4", models)
    with pytest.raises(TierError, match="'rocm' is not a runtime variant"):
        parse_tier({"name": "g", "model": "m", "dtype": "float16", "runtime": "rocm"}, "tier 5", models)
    assert parse_runtimes("cuda,cpu") == ("cpu", "cuda")
    with pytest.raises(SpecError, match="rocm"):
        parse_runtimes("cpu,rocm")


def test_the_planner_calls_a_tier_incompatible_when_the_bundle_lacks_its_runtime() -> None:
    tiers = parse_tiers([{"name": "gpu", "model": "m", "gpu_layers": "all", "needs": {"gpu_count": 1}},
                         {"name": "cpu", "model": "m"}], {"m": ("llama.cpp", 512)})
    h100 = load_machine(MACHINES / "8x-h100-80g.json")
    assert plan(h100, tiers).chosen.name == "gpu"  # type: ignore[union-attr]
    p = plan(h100, tiers, frozenset({"cpu"}))
    assert p.verdict("gpu").verdict == INCOMPATIBLE and p.chosen is not None and p.chosen.name == "cpu"
    assert p.verdict("gpu").reasons[0] == "runs the cuda runtime, and the bundle carries no wheels/cuda/ (its runtimes: cpu)"
    assert plan(h100, tiers, frozenset({"cpu", "cuda"})).verdict("gpu").verdict == RUNNABLE


def _build(where: Path, runtimes: tuple[str, ...], spec: dict[str, Any], keys: Path) -> Path:
    from installer.toolchain.build import build_bundle
    from installer.toolchain.spec import load_spec

    write_spec(where / "spec.toml", spec)
    out = where / "bundle"
    build_bundle(load_spec(where / "spec.toml"), out, keys / "signing.key", model_key_path=keys / "model.key", runtimes=runtimes)
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An installable bundle with wheels/cpu and wheels/cuda (its wheelhouse carries no torch, so its
    cuda variant is cheap), a GPU tier and a CPU tier; and its keys."""
    where = tmp_path_factory.mktemp("variants")
    keygen(where / "keys")
    (where / "model.bin").write_bytes(os.urandom(50_000))
    spec = installable_spec(where / "model.bin", "v")
    spec["tiers"] = [{"name": "multi-gpu", "model": "tiny-v", **GPU_TIER}, spec["tiers"][0]]
    return _build(where, ("cpu", "cuda"), spec, where / "keys"), where / "keys"


def _without_cuda(bundle: Path, keys: Path, dest: Path) -> Path:
    """The same bundle as the vendor would have built it with `--runtime cpu`: no wheels/cuda/, re-signed."""
    shutil.copytree(bundle, dest)
    shutil.rmtree(dest / "wheels" / "cuda")
    data = json.loads((dest / MANIFEST).read_bytes())
    data["files"] = [f for f in data["files"] if not f["path"].startswith("wheels/cuda/")]
    raw = canonical_json(data)
    (dest / MANIFEST).write_bytes(raw)
    (dest / SIGNATURE).write_bytes(load_signing_key(keys / "signing.key").sign(raw))
    return dest


def _hw(capsys: pytest.CaptureFixture[str], bundle: Path, keys: Path, machine: str, root: Path) -> dict[str, Any]:
    capsys.readouterr()
    main(["hw", "--root", str(root), "--bundle", str(bundle), "--trust", str(keys / "signing.pub"),
          "--machine", str(MACHINES / f"{machine}.json"), "--json"])
    return {t["name"]: t for t in json.loads(capsys.readouterr().out)["tiers"]}


def test_the_bundle_holds_one_folder_per_runtime_and_hw_judges_by_them(both: tuple[Path, Path], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bundle, keys = both
    manifest = parse_manifest((bundle / MANIFEST).read_bytes())
    assert manifest.runtimes == {"cpu", "cuda"}
    for runtime in ("cpu", "cuda"):
        assert list((bundle / "wheels" / runtime).glob("appliance-*.whl")) and list((bundle / "wheels" / runtime).glob("psutil-*.whl"))
    assert not list((bundle / "wheels").glob("*.whl"))  # nothing outside a variant's folder
    assert {e["path"].split("/")[1] for e in manifest.sbom} == {"cpu", "cuda"}
    assert _hw(capsys, bundle, keys, "2x-rtx3090-24g", tmp_path)["multi-gpu"]["verdict"] == RUNNABLE
    cpu_only = _without_cuda(bundle, keys, tmp_path / "cpu-only")
    tiers = _hw(capsys, cpu_only, keys, "2x-rtx3090-24g", tmp_path)
    assert tiers["multi-gpu"]["verdict"] == INCOMPATIBLE and tiers["cpu"]["verdict"] == RUNNABLE
    assert "the bundle carries no wheels/cuda/ (its runtimes: cpu)" in tiers["multi-gpu"]["reasons"][0]


def _install(capsys: pytest.CaptureFixture[str], bundle: Path, keys: Path, root: Path, machine: str, *extra: str) -> str:
    capsys.readouterr()
    code = main(["install", str(bundle), "--root", str(root), "--yes", "--key-file", str(keys / "model.key"),
                 "--trust", str(keys / "signing.pub"), "--machine", str(MACHINES / f"{machine}.json"), *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out + out.err


def test_install_builds_the_venv_from_the_tiers_runtime_only(both: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    bundle, keys = both
    dry = _install(capsys, bundle, keys, tmp_path / "dry-root", "2x-rtx3090-24g", "--dry-run")
    assert "copy the cuda wheelhouse" in dry and f"--find-links {bundle / 'wheels' / 'cuda'} " in dry and "wheels/cpu" not in dry, dry
    err = _install(capsys, bundle, keys, tmp_path / "gpu-root", "2x-rtx3090-24g")
    assert "tier multi-gpu" in err
    venv = Layout.at(tmp_path / "gpu-root").current / "venv"
    assert subprocess.run([str(venv / "bin/python"), "-c", "import appliance, psutil"], check=False).returncode == 0
    cpu_root = tmp_path / "cpu-root"
    err = _install(capsys, bundle, keys, cpu_root, "cpu-8c-16g")
    assert "tier cpu" in err and json.loads((Layout.at(cpu_root).current / "release.json").read_text())["tier"] == "cpu"


def test_install_refuses_a_tier_whose_runtime_the_bundle_lacks(both: tuple[Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bundle, keys = both
    cpu_only = _without_cuda(bundle, keys, tmp_path / "cpu-only")
    capsys.readouterr()
    code = main(["install", str(cpu_only), "--root", str(tmp_path / "root"), "--yes", "--key-file", str(keys / "model.key"),
                 "--trust", str(keys / "signing.pub"), "--machine", str(MACHINES / "2x-rtx3090-24g.json"), "--tier", "multi-gpu"])
    err = capsys.readouterr().err
    assert code != 0 and "carries no wheels/cuda/" in err
    assert not Layout.at(tmp_path / "root").current.exists()


def _locked_torch() -> str:
    return pins(LOCK.read_text())["torch"][0].split("+")[0]


@pytest.mark.cuda_bundle  # minutes and gigabytes: never in `make test`
def test_a_cuda_bundle_carries_cuda_torch_and_installs_offline_into_a_venv_that_imports_it(tmp_path: Path,
                                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    if cuda_wheels.cached(_locked_torch()) is None:
        pytest.skip(f"torch {_locked_torch()}'s CUDA wheels are not in {cuda_wheels.folder(_locked_torch())} "
                    "(`python -m installer.toolchain.cuda_wheels` fetches them once; this test never downloads)")
    keygen(tmp_path / "keys")
    (tmp_path / "model.bin").write_bytes(os.urandom(50_000))
    spec = installable_spec(tmp_path / "model.bin", "c")
    spec["wheelhouse"]["extras"] = ["train"]
    spec["tiers"] = [{"name": "gpu", "model": "tiny-c", "gpu_layers": "all", "needs": {"gpu_count": 1, "ram_mib": 64, "disk_mib": 16}}]
    from installer.toolchain.build import build_bundle
    from installer.toolchain.spec import load_spec

    write_spec(tmp_path / "spec.toml", spec)
    bundle = tmp_path / "bundle"
    build_bundle(load_spec(tmp_path / "spec.toml"), bundle, tmp_path / "keys" / "signing.key",
                 model_key_path=tmp_path / "keys" / "model.key", runtimes=("cuda",), cuda_llama=False)
    torch_wheels = [p.name for p in (bundle / "wheels" / "cuda").glob("torch-*.whl")]
    assert torch_wheels == [next(n for n in cuda_wheels.cached(_locked_torch()).sha256 if n.startswith("torch-"))]  # type: ignore[union-attr]
    assert "+cpu" not in torch_wheels[0] and list((bundle / "wheels" / "cuda").glob("nvidia_cublas*.whl"))
    root = tmp_path / "root"
    _install(capsys, bundle, tmp_path / "keys", root, "l4-24g")
    python = Layout.at(root).current / "venv" / "bin" / "python"
    probe = "import torch, json; print(json.dumps([torch.__version__, torch.version.cuda, torch.cuda.is_available()]))"
    version, cuda, available = json.loads(subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout)
    # The CUDA build of the locked version (it calls itself e.g. 2.13.0+cu130); this host has no GPU.
    assert version.split("+")[0] == _locked_torch() and "+cpu" not in version and cuda is not None and available is False


def test_bundle_build_takes_the_runtimes_and_prints_each_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.spec_files import one_model_spec

    keygen(tmp_path / "keys")
    (tmp_path / "model.bin").write_bytes(os.urandom(5000))
    write_spec(tmp_path / "slim.toml", one_model_spec(Path("model.bin")))
    args = ["bundle", "build", str(tmp_path / "slim.toml"), "--signing-key", str(tmp_path / "keys/signing.key"),
            "--model-key", str(tmp_path / "keys/model.key")]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b"), "--runtime", "cuda,cpu"]) == 0
    out = capsys.readouterr().out
    assert "runtime cpu: wheels/cpu/" in out and "runtime cuda: wheels/cuda/" in out
    assert "wheels/cpu" in (tmp_path / "b" / "bootstrap.sh").read_text()
    assert main([*args, "--out", str(tmp_path / "c"), "--runtime", "rocm"]) != 0
    assert "The runtime rocm is not one the bundle format knows." in capsys.readouterr().err
