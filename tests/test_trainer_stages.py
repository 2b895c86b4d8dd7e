"""Trainer stages without a model: settings, collect/validate, split, batching (the gate: tests/test_scoring.py)."""

from __future__ import annotations

import json
import random

import pytest

from appliance.feedback_store import FeedbackStore
from appliance.paths import Layout
from appliance.trainer.data import Example, collect, mask_examples, validate
from appliance.trainer.settings import TrainerConfigError, load_base_model_ref, load_trainer_settings
from appliance.trainer.split import split
from appliance.trainer.train import length_grouped


def test_settings_from_toml_and_errors(tmp_path):
    layout = Layout.at(tmp_path)
    layout.etc.mkdir(parents=True)
    layout.config_file.write_text('[model]\npath = "/m/model.gguf"\nbackend = "llama.cpp"\nid = "x"\n'
                                  '[trainer]\nlearning_rate = 1e-3\nlora_targets = ["q_proj"]\n')
    s = load_trainer_settings(layout)
    assert s.learning_rate == 1e-3 and s.lora_targets == ["q_proj"] and s.patience == 3 and s.gate_margin == 0.02
    ref = load_base_model_ref(layout)
    assert ref.path == layout.root / "m/model.gguf" and ref.backend == "llama.cpp"
    layout.config_file.write_text("[trainer]\nepochs = 0\n")
    with pytest.raises(TrainerConfigError, match="epochs is 0; it must be between 1 and 100"):
        load_trainer_settings(layout)
    layout.config_file.write_text("[trainer\n")
    with pytest.raises(TrainerConfigError, match="not valid TOML"):
        load_trainer_settings(layout)
    with pytest.raises(TrainerConfigError, match="no \\[model\\] path"):
        layout.config_file.write_text("[trainer]\n")
        load_base_model_ref(layout)


def test_collect_and_validate_count_bad_lines_with_file_and_line(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (inbox / "a.jsonl").write_text("\n".join([
        json.dumps(good),
        "{not json",
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        json.dumps([1, 2]),
        "",
        json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}),
    ]) + "\n")
    (inbox / "ignored.txt").write_text("not an inbox file")
    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.record_exchange("r1", [{"role": "user", "content": "good q"}], "good a", "m", None)
    store.record_exchange("r2", [{"role": "user", "content": "bad q"}], "bad a", "m", None)
    store.record_exchange("r3", [{"role": "user", "content": "fix q"}], "wrong", "m", None)
    store.add_feedback("r1", 1)
    store.add_feedback("r2", -1)
    store.add_feedback("r3", -1, corrected="right")
    c = collect(inbox, store, 0)
    assert c.counts["feedback"] == 2 and c.counts["feedback_not_usable"] == 1 and c.counts["inbox_lines"] == 7
    assert c.feedback_last_row == 3 and [p.name for p in c.inbox_files] == ["a.jsonl"]
    v = validate(c)
    assert len(v.examples) == 4
    assert {r.source: r.reason for r in v.rejected} == {
        "inbox/a.jsonl:2": v.rejected[0].reason,
        "inbox/a.jsonl:4": "the last message is not the assistant's answer",
        "inbox/a.jsonl:5": "message 0 has role 'robot', not one of system, user, assistant",
        "inbox/a.jsonl:6": "not a JSON object",
        "inbox/a.jsonl:8": "message 0 has no text content",
    }
    assert v.rejected[0].reason.startswith("not JSON")
    fixed = next(e for e in v.examples if e.source == "feedback:3")
    assert fixed.messages[-1] == ("assistant", "right")
    assert collect(inbox, store, 3).counts["feedback"] == 0


def test_mask_stage():
    ex = Example((("user", "my phone is 13812345678"), ("assistant", "ok")), "s")
    out, counts = mask_examples([ex])
    assert out[0].messages[0][1] == "my phone is [PHONE]" and counts["PHONE"] == 1 and out[0].source == "s"


def test_split_is_deterministic_and_keeps_questions_on_one_side():
    exs = [Example((("user", f"question {i // 2}"), ("assistant", f"answer {i}")), str(i)) for i in range(400)]
    a = split(exs, 0.1)
    b = split(list(reversed(exs)), 0.1)
    assert {e.key for e in a.validation} == {e.key for e in b.validation}
    assert 20 <= len(a.validation) <= 60
    assert not {e.prompt_key for e in a.train} & {e.prompt_key for e in a.validation}
    tiny = split(exs[:2], 0.1)
    assert len(tiny.train) == 0 or len(tiny.validation) >= 1


def test_length_grouped_batches_cover_everything_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(103)]
    batches = length_grouped(lengths, 8, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(103))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded / sum(lengths) < 1.1


def test_a_processed_inbox_file_keeps_no_raw_personal_data(tmp_path):
    from appliance.trainer import state as st

    paths = st.TrainerPaths(Layout.at(tmp_path))
    paths.inbox.mkdir(parents=True)
    raw = paths.inbox / "faq.jsonl"
    line = {"messages": [{"role": "user", "content": "Who runs 127.0.0.1:8088? Mail zhang.wei@hospital.example.cn"},
                         {"role": "assistant", "content": "IT, on 010-12345678."}]}
    raw.write_text(json.dumps(line, ensure_ascii=False) + "\n")
    assert st.move_processed(paths, [raw], "run1") == ["faq.jsonl"]
    kept = (paths.processed / "run1" / "faq.jsonl").read_text()
    assert not raw.exists() and "zhang.wei" not in kept and "12345678" not in kept
    assert json.loads(kept)["messages"][0]["content"] == "Who runs 127.0.0.1:8088? Mail [EMAIL]"  # the site's own address stays


def test_run_ids_sort_by_start_time_within_one_second(tmp_path):
    import time

    from appliance.trainer.report import list_reports, write_report
    from appliance.trainer.run import new_run_id

    ids = []
    for _ in range(40):  # 40 ids in about 0.1 s: random suffixes alone would sort them at random
        ids.append(new_run_id())
        time.sleep(0.002)
        write_report(tmp_path, {"id": ids[-1]})
    assert [r["id"] for r in list_reports(tmp_path)] == ids
