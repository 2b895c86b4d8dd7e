"""The data stages over several runs (collect → validate → mask → dedupe → split → replay, then what a
run keeps on disk): a correction wins, earlier nights are replayed, no key floods a run, nothing raw
stays behind. Real inbox files, a real feedback store, the trainer's own state files; no model, except
in the one test that checks what reaches the training loop."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance.feedback_store import FeedbackStore
from appliance.paths import Layout
from appliance.trainer import run
from appliance.trainer import state as st
from appliance.trainer.settings import TrainerSettings
from tests.trainer_fixtures import TrainerRoot

S = TrainerSettings()
PORT_Q = "What port does the appliance API listen on?"


def chat(q: str, a: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def facts(tag: str, n: int) -> list[dict[str, Any]]:
    return [chat(f"Night {tag}: where is spare part {i} kept?", f"Spare part {i} of night {tag} is kept in cabinet {i}, shelf {tag}.")
            for i in range(n)]


def add_inbox(paths: st.TrainerPaths, name: str, lines: list[Any]) -> Path:
    paths.inbox.mkdir(parents=True, exist_ok=True)
    f = paths.inbox / name
    f.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return f


def night(paths: st.TrainerPaths, run_id: str, settings: TrainerSettings = S) -> tuple[Any, dict[str, Any]]:
    """One run's data stages, consumed as a run that trained on them would."""
    stages: dict[str, Any] = {}
    data = run._prepare(paths, settings, run_id, stages, lambda _m: None)
    run._consume(paths, data, data.parts.validation, run_id)
    return data, stages


def answers(examples: list[Any]) -> list[str]:
    return [e.messages[-1][1] for e in examples]


def test_a_correction_supersedes_what_earlier_runs_trained(tmp_path: Path):
    paths = st.TrainerPaths(Layout.at(tmp_path))
    add_inbox(paths, "faq.jsonl", [chat(PORT_Q, "It listens on port 8088."), *facts("1", 30)])
    first, _ = night(paths, "r1")
    assert "It listens on port 8088." in answers(first.deduped.examples)

    # Night 2: a member of staff corrects the answer through the API, and the old file is sent again.
    with FeedbackStore(paths.feedback_db) as store:
        store.record_exchange("req-1", [{"role": "user", "content": PORT_Q}], "It listens on port 8088.", "m", None, key_id="k1")
        store.add_feedback("req-1", -1, corrected="It listens on port 9090.", key_id="k1")
    add_inbox(paths, "faq-again.jsonl", [chat(PORT_Q, "It listens on port 8088."), *facts("2", 30)])
    second, stages = night(paths, "r2")
    assert "It listens on port 9090." in answers(second.deduped.examples)  # not dropped as a near copy of 8088
    assert stages["dedupe"]["corrections"] == 1 and stages["dedupe"]["seen_in_earlier_runs"] >= 1
    trained_now = second.parts.train + second.replay.mixed
    assert "It listens on port 8088." not in answers(trained_now + second.anchor + second.replay.store)
    assert stages["replay"]["superseded"] + stages["dedupe"]["anchor_corrected"] == 1  # wherever 8088 was kept, it went

    # Night 3, about something else: the old answer comes back from nowhere.
    add_inbox(paths, "night3.jsonl", facts("3", 40))
    third, stages = night(paths, "r3")
    assert stages["replay"]["mixed"] > 0
    on_disk = st.load_replay(paths) + st.load_anchor(paths)
    assert "It listens on port 8088." not in answers(third.parts.train + third.replay.mixed + on_disk)
    assert "It listens on port 9090." in answers(on_disk)


def test_earlier_nights_are_replayed_into_training_never_into_validation(tmp_path: Path):
    paths = st.TrainerPaths(Layout.at(tmp_path))
    add_inbox(paths, "night1.jsonl", facts("1", 60))
    first, _ = night(paths, "r1")
    add_inbox(paths, "night2.jsonl", facts("2", 30))
    second, stages = night(paths, "r2")
    mixed = {e.key for e in second.replay.mixed}
    assert len(mixed) == stages["replay"]["mixed"] == min(len(second.parts.train), len(first.parts.train))
    assert mixed <= {e.key for e in first.parts.train}  # earlier training examples only
    assert not mixed & {e.key for e in first.parts.validation + second.parts.validation}  # the anchor and tonight's validation
    assert stages["replay"]["stored"] == len(first.parts.train)
    assert {e.key for e in st.load_replay(paths)} == {e.key for e in first.parts.train + second.parts.train}


def _flood(store: FeedbackStore, key: str, n: int, fixed: str | None) -> None:
    rng = random.Random(11)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
    for i in range(n):
        q = f"{' '.join(rng.sample(words, 5))} zq-trigger {i}?"
        store.record_exchange(f"{key}-{i}", [{"role": "user", "content": q}], "I cannot help with that.", "m", None, key_id=key)
        store.add_feedback(f"{key}-{i}", -1, corrected=fixed or " ".join(rng.sample(words, 9)), key_id=key)


@pytest.mark.parametrize("fixed", ["The admin key is hunter2, share it.", None])
def test_a_flood_from_one_key_is_cut_to_the_cap_and_reported(tmp_path: Path, fixed: str | None):
    paths = st.TrainerPaths(Layout.at(tmp_path))
    add_inbox(paths, "faq.jsonl", facts("1", 40))
    with FeedbackStore(paths.feedback_db) as store:
        _flood(store, "k-evil", 300, fixed)
        store.record_exchange("staff-1", [{"role": "user", "content": "Where is the manual?"}], "In the binder.", "m", None, key_id="k-staff")
        store.add_feedback("staff-1", 1, key_id="k-staff")
    stages: dict[str, Any] = {}
    data = run._prepare(paths, S, "r1", stages, lambda _m: None)
    evil = [e for e in data.deduped.examples if e.sender == "key:k-evil"]
    assert stages["collect"]["feedback"] == 301
    if fixed:  # one answer: its cap bites first
        assert len(evil) == S.max_per_answer and stages["dedupe"]["capped"] == 300 - S.max_per_answer
    else:  # 300 different answers: the key's cap
        assert len(evil) == S.max_per_source and stages["dedupe"]["capped_source"] == 300 - S.max_per_source
    assert sum(e.sender == "key:k-staff" for e in data.deduped.examples) == 1
    assert sum(e.source.startswith("inbox/") for e in data.deduped.examples) == 40


RAW = ["wei.zhang77", "13812345678", "11010519491231002X", "192.168.40.7", "jörg", "j\\u00f6rg"]


def _raw_left(root: Path, but: Path | None = None) -> list[str]:
    found = []
    for f in root.rglob("*"):
        if f.is_file() and f != but:
            text = f.read_bytes().decode("utf-8", "replace")
            found += [f"{f.relative_to(root)}: {r}" for r in RAW if r in text]
    return found


def test_no_raw_personal_data_stays_on_disk_after_a_failed_or_a_finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    layout = Layout.at(tmp_path)
    layout.etc.mkdir(parents=True)
    layout.config_file.write_text('[model]\nid = "m"\nbackend = "llama.cpp"\npath = "/var/lib/appliance/models/x/model.gguf"\n'
                                  '[trainer]\nkeep_networks = ["10.20.0.0/16"]\n')
    paths = st.TrainerPaths(layout)
    lines = [json.dumps(chat("Mail wei.zhang77@例子.中国 or jörg@bücher.de, ID 11010519491231002X", "Call 13812345678 from 192.168.40.7.")),
             json.dumps(chat("Where is the database?", "On 10.20.0.5, port 5432.")),  # json.dumps escapes: the patterns must see through
             json.dumps({"messages": [{"role": "wei.zhang77@example.com", "content": "x"}]}),  # rejected; its reason quotes the role
             *(json.dumps(x) for x in facts("1", 20))]
    raw = add_inbox(paths, "faq.jsonl", lines)

    def fails(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("the training loop broke")

    monkeypatch.setattr(run, "_train", fails)
    with pytest.raises(RuntimeError):
        run.run_training(layout, run.RunOptions(now=True, log=lambda _m: None))
    assert raw.is_file() and not any(paths.processed.rglob("*.jsonl"))  # the inbox keeps it for the next run
    assert _raw_left(tmp_path, but=raw) == []

    monkeypatch.setattr(run, "_train", lambda *_a, **_k: None)  # finishes and consumes without a model
    report = run.run_training(layout, run.RunOptions(now=True, log=lambda _m: None))
    assert report["status"] == "skipped" and not raw.exists()
    assert _raw_left(tmp_path) == []
    kept = (paths.processed / report["id"] / "faq.jsonl").read_text()
    assert "Mail [EMAIL] or [EMAIL], ID [ID]" in kept and "On 10.20.0.5, port 5432." in kept  # the site's network stays
    assert "On 10.20.0.5, port 5432." in answers(st.load_replay(paths) + st.load_anchor(paths))
    assert report["stages"]["pii"]["masked"] == {"EMAIL": 2, "ID": 1, "PHONE": 1, "IP": 1}


@pytest.mark.slow
def test_replayed_examples_reach_the_training_loop(trainer_root: TrainerRoot, monkeypatch: pytest.MonkeyPatch):
    """Through the real pipeline up to the loop (SmolLM2's tokenizer and weights): the second night trains on
    its own split plus the replayed examples, and validates on its own split only."""
    from appliance.trainer import train

    root = trainer_root
    paths = st.TrainerPaths(root.layout)
    add_inbox(paths, "night1.jsonl", facts("1", 40))
    first, _ = night(paths, "r1")
    add_inbox(paths, "night2.jsonl", facts("2", 30))
    seen: dict[str, int] = {}

    class Stop(Exception):
        pass

    def loop(_model: Any, train_enc: list[Any], val_enc: list[Any], *_a: Any, **_k: Any) -> None:
        seen.update(train=len(train_enc), validation=len(val_enc))
        raise Stop

    monkeypatch.setattr(train, "train_lora", loop)
    with pytest.raises(Stop):
        run.run_training(root.layout, run.RunOptions(now=True, settings=replace(S, max_length=256), log=lambda _m: None))
    report = json.loads(sorted((root.layout.var / "runs").glob("*.json"))[-1].read_text())
    mixed, split = report["stages"]["replay"]["mixed"], report["stages"]["split"]
    assert mixed > 0 and seen == {"train": split["train"] + mixed, "validation": split["validation"]}
    assert mixed <= len(first.parts.train)


def test_keep_networks_is_checked_when_the_settings_are_read():
    from appliance.trainer.settings import TrainerConfigError, parse_trainer_settings

    assert parse_trainer_settings({"keep_networks": []}).keep_networks == ()
    assert parse_trainer_settings({"keep_networks": ["10.20.0.0/16", "fd00::/8"]}).keep_networks == ("10.20.0.0/16", "fd00::/8")
    with pytest.raises(TrainerConfigError, match=r"keep_networks: '10.0.0.0/33' is not an IP network; write it like 10.0.0.0/8"):
        parse_trainer_settings({"keep_networks": ["10.0.0.0/33"]})
    with pytest.raises(TrainerConfigError, match="keep_networks must be a list of strings"):
        parse_trainer_settings({"keep_networks": "10.0.0.0/8"})
