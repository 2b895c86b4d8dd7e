"""The outcome gate on SmolLM2 through the llama.cpp engine: a style-only candidate is not promoted."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from appliance import adapters as reg
from appliance.trainer.anchor_prompts import PROMPTS
from appliance.trainer.base_answers import base_answers
from appliance.trainer.outcome import EVAL_DIR, cap, load_frozen
from appliance.trainer.run import RunOptions, run_training
from tests.trainer_fixtures import TrainerRoot, demo_lines, quick_settings


def _shuffled(lines: list[str], seed: int = 0) -> list[dict]:
    """The demo conversations with every answer moved to another question: the style stays, the facts go."""
    records = [json.loads(line) for line in lines]
    answers = [r["messages"][-1]["content"] for r in records]
    random.Random(seed).shuffle(answers)
    for r, a in zip(records, answers, strict=True):
        r["messages"][-1]["content"] = a
    return records


def test_frozen_set_is_read_checked_and_capped(tmp_path: Path):
    inbox = tmp_path / "inbox"
    (inbox / EVAL_DIR).mkdir(parents=True)
    (inbox / EVAL_DIR / "a.jsonl").write_text("\n".join(demo_lines("heldout.jsonl")[:5] + ["{broken", '{"prompt": "q", "completion": "a", "key": 3}']) + "\n")
    items, files, rejected = load_frozen(inbox)
    assert files == ["a.jsonl"] and len(items) == 5 and all(x.answer_keys for x in items)
    assert [r.source for r in rejected] == ["inbox/eval/a.jsonl:6", "inbox/eval/a.jsonl:7"]
    assert "key is not" in rejected[1].reason
    assert cap(items, 3) == cap(list(reversed(items)), 3) and len(cap(items, 3)) == 3


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_candidate_trained_on_shuffled_answers_is_not_promoted(trainer_root: TrainerRoot, gguf_sha: str):
    """The loss-only gate promoted it (its validation loss falls as it learns the style); answers tell."""
    train = trainer_root.add_inbox("manual.jsonl", _shuffled(demo_lines("train.jsonl")))
    eval_dir = trainer_root.inbox / EVAL_DIR
    eval_dir.mkdir()
    frozen = eval_dir / "heldout.jsonl"
    frozen.write_text("\n".join(demo_lines("heldout.jsonl")[:16]) + "\n")
    settings = quick_settings(eval_max_items=16, eval_max_tokens=32)
    report = run_training(trainer_root.layout, RunOptions(now=True, settings=settings, max_steps=12, log=lambda s: None))
    gate = report["stages"]["gate"]
    assert report["status"] == "kept" and gate["promote"] is False, report["reason"]
    failed = [c["detail"] for c in gate["checks"] if not c["passed"]]
    assert failed and report["reason"] == failed[0]  # the report names why
    assert gate["source"] == "inbox/eval" and gate["items"] == 16 and gate["reference"] == "base model"
    assert gate["failed_answers"] == 0 and len(gate["answers"]) == 16 and len(gate["anchor_answers"]) == 20
    assert gate["losses"]["candidate"] < gate["losses"]["base"]  # the loss fell: a loss-only gate would have promoted it
    assert reg.active_adapter(trainer_root.layout) is None and len(reg.list_adapters(trainer_root.layout)) == 1
    # The frozen set is read, never consumed; the training file is.
    assert frozen.is_file() and not train.exists()
    processed = trainer_root.layout.data / "processed" / report["id"]
    assert (processed / "manual.jsonl").is_file() and not list(processed.rglob("heldout.jsonl"))
    assert report["stages"]["split"]["evaluation"] == {"source": "inbox/eval", "items": 16, "files": ["heldout.jsonl"],
                                                       "rejected": 0, "rejected_lines": [], "keyed": 16}
    # The base model's answers (to the anchor prompts and to the items) are kept: the next run does not ask it again.
    items, _, _ = load_frozen(trainer_root.inbox)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS] + [list(x.as_dicts()[:-1]) for x in items]

    def ask(convs: list, adapter: bool) -> list:
        raise AssertionError(f"the base model was asked {len(convs)} questions again")

    kept = base_answers(trainer_root.layout.var / "trainer" / "base-answers", gguf_sha, "llama.cpp", 32, conversations, ask)
    assert len(kept) == 36 and all(isinstance(a, str) for a in kept)
