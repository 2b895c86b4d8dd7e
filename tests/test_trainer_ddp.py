"""Data-parallel training under torchrun: two processes on gloo (CPU) train the same steps as one
process and end with the same adapter shape and, within tolerance, the same losses and weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "ddp_worker.py"


def _run(cmd: list[str], out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(trainer_base_dir: Path, tmp_path: Path) -> None:
    one = _run([sys.executable, str(WORKER), str(trainer_base_dir), str(tmp_path / "one.json")], tmp_path / "one.json")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    two = _run([*torchrun, str(WORKER), str(trainer_base_dir), str(tmp_path / "two.json")], tmp_path / "two.json")
    assert (one["world"], two["world"]) == (1, 2) and one["steps"] == two["steps"] == 3
    assert two["shapes"] == one["shapes"] and len(one["shapes"]) == 2 * 2 * 30  # q and v, A and B, 30 layers
    assert two["tokens"] == one["tokens"]  # every example seen once per step, by one rank or the other
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    for name, s in one["sums"].items():
        assert two["sums"][name] == pytest.approx(s, rel=1e-2, abs=1e-4)


# --- what the GPU tiers need of the loop, shown on a tiny random Llama on the CPU ---------------------

def test_evaluation_out_of_memory_halves_its_batch_and_gives_the_same_loss() -> None:
    from appliance.trainer.train import TrainingError, evaluate_loss
    from tests.test_trainer_loop import pattern, tiny_lora

    model, val = tiny_lora(), pattern(8, 50, 1)
    seen: list[int] = []

    def fail_above_two(n: int) -> None:
        seen.append(n)
        if n > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")

    plain = evaluate_loss(model, val, 0)
    assert evaluate_loss(model, val, 0, before_batch=fail_above_two) == pytest.approx(plain, rel=1e-5)
    assert seen[:3] == [8, 4, 2] and set(seen[3:]) == {2}

    def always(n: int) -> None:
        raise MemoryError("simulated")

    with pytest.raises(TrainingError, match="Evaluation ran out of memory even with a batch of 1"):
        evaluate_loss(model, val, 0, before_batch=always)


def test_the_micro_batch_grows_back_after_steps_without_out_of_memory() -> None:
    from appliance.trainer.train import GROW_AFTER, train_lora
    from tests.test_trainer_loop import pattern, settings, tiny_lora

    calls = {"n": 0}

    def fail_first_step(n: int) -> None:  # the memory another process held is freed after the first step
        calls["n"] += 1
        if calls["n"] <= 2 and n > 2:
            raise MemoryError("simulated")

    logged: list[str] = []
    r = train_lora(tiny_lora(), pattern(96, 50), pattern(4, 50, 1), settings(epochs=1), 0, log=logged.append,
                   before_micro=fail_first_step)
    assert r.steps == 12 > 2 * GROW_AFTER and r.oom_retries == 2
    assert r.micro_batch == 8 and r.accumulation == 1 and r.micro_regrown == 2  # 2 -> 4 -> 8
    assert any("micro-batch back up to 4" in line for line in logged) and any("back up to 8" in line for line in logged)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    from peft import get_peft_model_state_dict

    from appliance.trainer.modeling import new_lora
    from appliance.trainer.train import collate, loss_sum
    from tests.test_trainer_loop import pattern, settings

    def grads(checkpointing: bool) -> dict[str, object]:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
        model = new_lora(base, settings(gradient_checkpointing=checkpointing, lora_targets=["q_proj", "v_proj"]))
        model.train()
        assert base.is_gradient_checkpointing == checkpointing
        s, n = loss_sum(model, collate(pattern(4, 50), 0))
        (s / n).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None} | {
            "_": get_peft_model_state_dict(model)}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 1
    for k in plain:
        if k != "_":
            assert (plain[k] - ckpt[k]).abs().max() < 1e-6, k  # type: ignore[operator]


def test_autocast_trains_and_fp32_is_the_cpu_precision() -> None:
    from appliance.trainer.distributed import FP32, Precision, precision_for
    from appliance.trainer.train import train_lora
    from tests.test_trainer_loop import pattern, settings, tiny_lora

    assert precision_for("cpu") == FP32
    r = train_lora(tiny_lora(), pattern(32, 50), pattern(8, 50, 1), settings(epochs=2), 0, log=lambda _m: None,
                   precision=Precision("float32", "bfloat16", False))  # bf16 autocast, as on an Ampere GPU
    assert r.history[-1]["val_loss"] < r.history[0]["val_loss"]


# --- the trainer never starts on a GPU the server leaves too little of -------------------------------

def _nvml(machine: str):  # type: ignore[no-untyped-def]
    from tests.fake_pynvml import FakeNvml

    return FakeNvml(json.loads((Path(__file__).parent / "fixtures/machines" / f"{machine}.json").read_text()))


def test_the_free_memory_check_reads_nvml_and_says_what_is_missing(trainer_base_dir: Path) -> None:
    from appliance.trainer.distributed import DeviceError, check_gpu_memory, needed_gpu_mib, weights_mib

    assert weights_mib(trainer_base_dir, "bfloat16") == 256 and needed_gpu_mib(trainer_base_dir, "bfloat16") == 256 * 5 // 4 + 1024
    check_gpu_memory([0], 4096, _nvml("a6000-busy"))  # 5 GiB free: enough for 4
    with pytest.raises(DeviceError) as e:
        check_gpu_memory([0], 8192, _nvml("a6000-busy"))
    assert e.value.message == ("GPU 0 has 5.0 GiB free of 48.0 GiB (the server's replica and other processes hold the rest), "
                               "and training needs about 8.0 GiB, so it does not start.")


def _gpu_root(tmp_path: Path, smollm2_gguf: Path, gguf_sha: str, base_dir: Path):  # type: ignore[no-untyped-def]
    from tests.trainer_fixtures import demo_lines, make_root

    root = make_root(tmp_path / "root", smollm2_gguf, gguf_sha, base_dir)
    cfg = root.layout.config_file
    cfg.write_text(cfg.read_text().replace("context_length = 2048", "context_length = 2048\ngpus = [0]"))
    root.add_inbox("manual.jsonl", demo_lines("train.jsonl"))
    return root


def test_a_run_refuses_to_start_on_a_full_gpu_and_on_a_host_without_cuda(tmp_path: Path, smollm2_gguf: Path, gguf_sha: str,
                                                                         trainer_base_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.trainer.distributed import DeviceError
    from appliance.trainer.run import RunOptions, run_training
    from tests.trainer_fixtures import quick_settings

    root = _gpu_root(tmp_path, smollm2_gguf, gguf_sha, trainer_base_dir)
    monkeypatch.setitem(sys.modules, "pynvml", _nvml("a6000-busy"))
    with pytest.raises(DeviceError, match="GPU 0 has 5.0 GiB free of 48.0 GiB"):
        run_training(root.layout, RunOptions(now=True, settings=quick_settings(gpu_memory_mib=8192), log=lambda _m: None))
    # Enough free memory, but this host's torch has no CUDA: refused too, never trained on the CPU instead.
    with pytest.raises(DeviceError, match="sees no CUDA device on this host, so training does not start"):
        run_training(root.layout, RunOptions(now=True, settings=quick_settings(gpu_memory_mib=1024), log=lambda _m: None))
    last = json.loads(sorted((root.layout.var / "runs").glob("*.json"))[-1].read_text())
    assert last["status"] == "failed" and "sees no CUDA device" in last["reason"]
    assert not list(root.inbox.glob("*.done*")) and list(root.inbox.glob("*.jsonl"))  # nothing consumed


@pytest.mark.slow
def test_appliance_train_under_torchrun_as_the_multi_gpu_trainer_unit_runs_it(trainer_root, tmp_path: Path) -> None:
    """What the trainer unit of a multi-GPU tier runs (installer/system/units.py), with gloo on this CPU host:
    both ranks train, rank 0 alone reports, registers and promotes."""
    import shutil

    from appliance import adapters
    from tests.trainer_fixtures import THREADS, demo_lines

    trainer_root.add_inbox("manual.jsonl", demo_lines("train.jsonl")[:40])
    config = trainer_root.layout.config_file  # two ranks share this host's cores: one thread each
    config.write_text(config.read_text().replace(f"threads = {THREADS}", "threads = 1"))
    appliance = shutil.which("appliance", path=str(Path(sys.executable).parent))
    assert appliance is not None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
           appliance, "train", "--now", "--max-steps", "2", "--root", str(trainer_root.layout.root)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("run ") and "train /" in line and ";" in line]
    assert len(summaries) == 1, proc.stdout  # one report, from rank 0
    reports = list((trainer_root.layout.var / "runs").glob("*.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["status"] in ("promoted", "kept")
    assert len(adapters.list_adapters(trainer_root.layout)) == 1
