"""Differential privacy's cost: the LoRA loop with and without DP-SGD on the same demo slice, same steps.

Each configuration trains a fresh LoRA on SmolLM2-135M from the same split of the demo data and
reports the best validation loss (assistant tokens of held-out examples), the base model's loss on
the same examples, the outcome score (appliance/trainer/scoring.py: key recall of greedy answers to
the first --heldout questions of bundles/demo-data/heldout.jsonl, generated here through PEFT in
transformers, not through llama.cpp as the gate does), the training loop's seconds and, under DP,
the ε spent at δ = 1/n.

    .venv/bin/python bench/train_dp.py [--examples 96] [--epochs 2] [--threads 1] [--epsilons 8,1] [--heldout 12]

Last line: `nodp_val=… dp_val=… seconds_ratio=<DP ÷ non-DP, first ε>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train_throughput import TARGETS, base_dir, examples  # noqa: E402


def outcome(model: object, tok: object, items: list, max_new: int = 32) -> float:
    """Mean score of greedy answers (the gate's scoring, through PEFT)."""
    import torch

    from appliance.trainer.scoring import mean, score_answer

    scores = []
    for x in items:
        ids = tok.apply_chat_template(x.as_dicts()[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)  # type: ignore[attr-defined]
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new, do_sample=False)  # type: ignore[attr-defined]
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)  # type: ignore[attr-defined]
        scores.append(score_answer(answer, x.messages[-1][1], x.answer_keys))
    return round(mean(scores), 4)


def heldout(n: int) -> list:
    from appliance.trainer.data import Example

    lines = (REPO / "bundles/demo-data/heldout.jsonl").read_text().splitlines()[:n]
    return [Example.from_json(json.loads(line)) for line in lines]


def run(a: argparse.Namespace) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.trainer.modeling import new_lora
    from appliance.trainer.settings import TrainerSettings
    from appliance.trainer.split import split
    from appliance.trainer.train import encode, evaluate_loss, train_lora

    torch.set_num_threads(a.threads)
    d = base_dir()
    tok = AutoTokenizer.from_pretrained(d)
    parts = split(examples(a.examples), 0.15)
    base = TrainerSettings(learning_rate=5e-3, epochs=a.epochs, batch_size=8, max_length=160, lora_targets=TARGETS, patience=50)
    enc = lambda xs: [e for e in (encode(tok, x, base.max_length) for x in xs) if e is not None]  # noqa: E731
    train, val = enc(parts.train), enc(parts.validation)
    rows, questions = [], heldout(a.heldout)
    configs = [("no DP", base)] + [(f"DP ε={e:g}", replace(base, dp_epsilon=e)) for e in a.epsilons]
    for name, s in configs:
        model = new_lora(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), s)
        with model.disable_adapter():
            base_val = evaluate_loss(model, val, tok.pad_token_id)
            base_score = outcome(model, tok, questions) if not rows else rows[0]["base_outcome"]
        r = train_lora(model, train, val, s, tok.pad_token_id, log=lambda _m: None)
        row = {"config": name, "train": len(train), "validation": len(val), "steps": r.steps, "base_val": round(base_val, 4),
               "best_val": round(r.best_val_loss, 4), "base_outcome": base_score, "outcome": outcome(model, tok, questions),
               "seconds": round(r.seconds, 1), "privacy": r.privacy}
        print(json.dumps(row, ensure_ascii=False), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--epsilons", type=lambda v: [float(x) for x in v.split(",")], default=[8.0, 1.0])
    rows = run(ap.parse_args())
    print(f"nodp_val={rows[0]['best_val']} dp_val={rows[1]['best_val']} seconds_ratio={rows[1]['seconds'] / rows[0]['seconds']:.2f}")


if __name__ == "__main__":
    main()
