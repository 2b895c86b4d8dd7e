"""A run's deadline and its checkpoints: it stops in time for the morning, and a killed run resumes instead of starting over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from appliance import adapters as reg
from appliance.trainer.checkpoint import CHECKPOINT_NAME, Checkpointer, Deadline, identity, next_deadline
from appliance.trainer.settings import TrainerConfigError
from appliance.trainer.train import train_lora
from tests.test_trainer_loop import pattern, settings, tiny_lora
from tests.trainer_fixtures import REPO, TrainerRoot, demo_lines, quick_settings
from tests.waiting import wait_until

LOCAL = datetime(2026, 3, 2, 3, 0).astimezone()


def quiet(_line: str) -> None:
    pass


def test_the_deadline_is_the_next_time_of_day_after_the_start():
    assert next_deadline("06:30", LOCAL) == LOCAL.replace(hour=6, minute=30)
    assert next_deadline("06:30", LOCAL.replace(hour=7)) == LOCAL.replace(hour=6, minute=30) + timedelta(days=1)
    assert next_deadline("", LOCAL) is None
    for bad in ("6.30", "25:00", "06:61", "soon"):
        with pytest.raises(TrainerConfigError, match="HH:MM"):
            next_deadline(bad, LOCAL)


def test_the_deadline_keeps_the_next_step_the_evaluation_and_the_reserve():
    at = LOCAL.replace(hour=6, minute=30)
    d = Deadline(at, reserve_s=600, clock=lambda: at - timedelta(seconds=1000))
    assert d.leaves_time(step_s=100, eval_s=50)  # 100 + 4 × 50 + 600 = 900 s of the 1000 left
    assert not d.leaves_time(step_s=100, eval_s=80)  # 100 + 320 + 600 = 1020 s
    assert not Deadline(at, 0, clock=lambda: at + timedelta(seconds=1)).leaves_time(0, 0)
    assert Deadline(None).leaves_time(1e9, 1e9)


def test_a_deadline_stops_the_loop_early_with_the_weights_evaluated():
    ticks = iter(range(10_000))
    at = LOCAL.replace(hour=6, minute=30)
    d = Deadline(at, clock=lambda: at - timedelta(minutes=5) + timedelta(minutes=next(ticks)))  # a minute per step
    r = train_lora(tiny_lora(), pattern(48, 50), pattern(8, 50, 1), settings(), 0, log=quiet, deadline=d)
    assert r.stopped_at_deadline and r.steps == 5 and r.planned_steps == 18
    assert r.history[-1]["step"] == 5 and r.best_val_loss < 10  # what it has is still a candidate


class Killed(Exception):
    pass


def test_a_killed_loop_resumes_where_its_checkpoint_was_and_ends_as_an_uninterrupted_one(tmp_path: Path):
    import torch

    train, val, s = pattern(48, 50), pattern(8, 50, 1), settings(epochs=2, checkpoint_minutes=0)
    whole = tiny_lora()
    full = train_lora(whole, train, val, s, 0, log=quiet)
    ident = identity(train, val, s, "base", None)
    calls = []

    def kill_in_step_8(n: int) -> None:
        calls.append(n)
        if len(calls) == 8:
            raise Killed

    with pytest.raises(Killed):
        train_lora(tiny_lora(), train, val, s, 0, log=quiet, before_micro=kill_in_step_8,
                   checkpoint=Checkpointer(tmp_path, ident, 0, quiet))
    lines: list[str] = []
    again = tiny_lora()
    r = train_lora(again, train, val, s, 0, log=quiet, checkpoint=Checkpointer(tmp_path, ident, 0, lines.append))
    assert r.resumed_at_step == 7 and r.steps == full.steps == 12
    assert any("resuming from the checkpoint at step 7/12" in x for x in lines)
    assert [h["step"] for h in r.history] == [h["step"] for h in full.history]
    done = dict(whole.named_parameters())
    for n, p in again.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, done[n], atol=1e-6), n  # the same weights as the run that was never killed


def test_a_checkpoint_of_other_data_is_discarded_with_a_log_line(tmp_path: Path):
    s = settings(checkpoint_minutes=0)
    train_lora(tiny_lora(), pattern(16, 50), pattern(4, 50, 1), s, 0, log=quiet,
               checkpoint=Checkpointer(tmp_path, "data-a", 0, quiet))
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    lines: list[str] = []
    r = train_lora(tiny_lora(), pattern(16, 50, 2), pattern(4, 50, 1), s, 0, log=quiet,
                   checkpoint=Checkpointer(tmp_path, "data-b", 0, lines.append))
    assert r.resumed_at_step is None and r.steps == 6
    assert any("made for other data or settings: discarded" in x for x in lines)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"torn")
    assert Checkpointer(tmp_path, "data-b", 0, lines.append).load() is None and "unreadable" in lines[-1]
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_identity_follows_the_data_and_the_training_settings_not_the_deadline():
    train, val = pattern(8, 50), pattern(2, 50, 1)
    a = identity(train, val, settings(), "base", None)
    assert a == identity(train, val, settings(deadline="05:00", threads=3, checkpoint_minutes=1), "base", None)
    assert a != identity(pattern(8, 50, 9), val, settings(), "base", None)
    assert a != identity(train, val, settings(learning_rate=1e-3), "base", None)
    assert a != identity(train, val, settings(), "base", "parent-adapter")


def _resume_config(root: TrainerRoot) -> None:
    cfg = (root.layout.config_file.read_text().replace("epochs = 1", "epochs = 2").replace("batch_size = 8", "batch_size = 4")
           .replace("max_length = 160", "max_length = 96"))
    assert "max_length = 96" in cfg
    root.layout.config_file.write_text(cfg + 'patience = 50\ncheckpoint_minutes = 0\ndeadline = ""\n')


def test_a_run_killed_after_its_first_checkpoint_resumes_and_trains_the_same_steps(trainer_root: TrainerRoot):
    from appliance.trainer.run import RunOptions, run_training

    _resume_config(trainer_root)
    trainer_root.add_inbox("manual.jsonl", demo_lines("train.jsonl")[:32])
    ckpt = trainer_root.layout.var / "trainer" / CHECKPOINT_NAME
    p = subprocess.Popen([sys.executable, "-m", "appliance.cli", "train", "--now", "--root", str(trainer_root.layout.root)],
                         cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: ckpt.is_file() or p.poll() is not None, "the first checkpoint", timeout=600)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL and ckpt.is_file()
    assert reg.list_adapters(trainer_root.layout) == []
    lines: list[str] = []
    report = run_training(trainer_root.layout, RunOptions(now=True, log=lines.append))
    train = report["stages"]["train"]
    assert report["status"] in ("promoted", "kept"), report.get("reason")
    assert 1 <= train["resumed_at_step"] < train["planned_steps"] and train["steps"] == train["planned_steps"]
    assert f"resumed from the checkpoint at step {train['resumed_at_step']}" in report["reason"]
    assert any(x.startswith("resuming from the checkpoint") for x in lines)
    meta = reg.list_adapters(trainer_root.layout)[0].metadata
    assert meta["training"]["steps"] == train["planned_steps"]
    assert not ckpt.exists()  # served: the next run starts from its own data


def test_a_run_at_its_deadline_stops_early_and_still_goes_through_the_gate(trainer_root: TrainerRoot):
    from appliance.trainer.run import RunOptions, run_training

    trainer_root.add_inbox("manual.jsonl", demo_lines("train.jsonl")[:24])
    almost = datetime(2026, 3, 2, 6, 29, 59, 900_000).astimezone()  # the first step takes longer than the 0.1 s left
    # The scheduled run (not --now, which trains to the end): 24 new examples are enough with min_new_examples = 1.
    settings = quick_settings(deadline="06:30", deadline_reserve_minutes=0, min_new_examples=1)
    report = run_training(trainer_root.layout, RunOptions(now=False, settings=settings, clock=lambda: almost, log=quiet))
    train = report["stages"]["train"]
    assert train["stopped_at_deadline"] and train["steps"] == 1 < train["planned_steps"]
    assert report["status"] in ("promoted", "kept") and "gate" in report["stages"]
    assert f"stopped at the deadline after 1 of {train['planned_steps']} steps" in report["reason"]
    assert report.get("adapter")


def test_an_explicit_run_now_is_not_bound_by_the_morning_deadline():
    from appliance.trainer.run import RunOptions, _deadline_for

    scheduled = quick_settings(deadline="06:30")
    assert _deadline_for(scheduled, RunOptions(now=False)).deadline == "06:30"
    assert _deadline_for(scheduled, RunOptions(now=True)).deadline == ""
