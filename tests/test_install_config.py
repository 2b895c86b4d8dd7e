"""appliance.toml's three-way merge (pure), the step runner's events, and the answers file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from appliance.cli.lifecycle import _answers, _bind
from appliance.errors import StateError, UsageError
from installer.steps.framework import Skip, Step, StepEvent, run_steps
from installer.system.config_file import desired_values, merge, render

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the CPU tier's, measured (bench/RESULTS.md)


def _values(path: str = "/m/a/model.gguf", port_default: bool = True) -> dict:
    return desired_values({"tier": "cpu", "id": "a", "backend": "llama.cpp", "path": path, "threads": 2}, {"lora_rank": 8}, {})


def test_first_write_renders_every_section_and_reads_back() -> None:
    m = merge(None, {}, _values())
    data = tomllib.loads(m.text)
    assert data["model"]["path"] == "/m/a/model.gguf" and data["server"]["port"] == 8088
    assert data["trainer"]["schedule"] == "*-*-* 03:00:00" and data["trainer"]["lora_targets"] == SEVEN
    assert m.kept == []


def test_upgrade_changes_installer_values_and_keeps_user_edits_and_comments() -> None:
    first = merge(None, {}, _values())
    edited = first.text.replace("port = 8088", "port = 9001  # the proxy wants this").replace(
        'schedule = "*-*-* 03:00:00"', '# nights are busy here\nschedule = "*-*-* 05:00:00"')
    edited += "\n[site]\nname = \"ward 7\"\n"
    second = merge(edited, first.installed, _values(path="/m/b/model.gguf"))
    data = tomllib.loads(second.text)
    assert data["model"]["path"] == "/m/b/model.gguf"  # the installer's value moved with the release
    assert data["server"]["port"] == 9001 and data["trainer"]["schedule"] == "*-*-* 05:00:00"
    assert data["site"] == {"name": "ward 7"}  # unknown sections survive
    assert "# the proxy wants this" in second.text and "# nights are busy here" in second.text
    assert sorted(second.kept) == ["server.port", "trainer.schedule"]


def test_a_key_the_user_deleted_comes_back_and_a_new_key_is_added_to_its_section() -> None:
    first = merge(None, {}, _values())
    without = "".join(line for line in first.text.splitlines(keepends=True) if not line.startswith("threads"))
    wanted = _values()
    wanted["model"]["gpu_layers"] = 0
    data = tomllib.loads(merge(without, first.installed, wanted).text)
    assert data["model"]["threads"] == 2 and data["model"]["gpu_layers"] == 0


def test_a_broken_config_is_reported_not_overwritten() -> None:
    with pytest.raises(StateError, match="not valid TOML"):
        merge("[model\npath = 1", {}, _values())


def test_render_writes_toml_types() -> None:
    text = render({"s": {"b": True, "f": 0.5, "i": 3, "l": ["x", "y"], "q": 'a "quoted" \\ value'}})
    assert tomllib.loads(text)["s"] == {"b": True, "f": 0.5, "i": 3, "l": ["x", "y"], "q": 'a "quoted" \\ value'}


def test_steps_emit_start_done_skipped_failed_in_order() -> None:
    events: list[StepEvent] = []

    def skip(ctx: object, progress: object) -> str:
        raise Skip("already there")

    def work(ctx: object, progress) -> str:  # type: ignore[no-untyped-def]
        progress("half", 0.5)
        return "did it"

    def fail(ctx: object, progress: object) -> str:
        raise UsageError("no disk")

    with pytest.raises(UsageError):
        run_steps([Step("a", "first", work), Step("b", "second", skip), Step("c", "third", fail), Step("d", "never", work)],
                  None, events.append)
    assert [(e.step, e.status) for e in events] == [("a", "start"), ("a", "progress"), ("a", "done"), ("b", "start"),
                                                    ("b", "skipped"), ("c", "start"), ("c", "failed")]
    assert events[1].fraction == 0.5 and events[4].message == "already there" and events[6].message == "no disk"


def test_answers_file_paths_are_relative_to_it_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "answers.toml"
    f.write_text('tier = "cpu"\nkey_file = "keys/model.key"\nbind = "0.0.0.0:9000"\n')
    a = _answers(str(f))
    assert a["key_file"] == str(tmp_path / "keys/model.key") and _bind(a["bind"]) == ("0.0.0.0", 9000)
    assert _bind("10.0.0.5") == ("10.0.0.5", None) and _bind("[::1]:8088") == ("::1", 8088)
    f.write_text('tier = "cpu"\npassword = "x"\n')
    with pytest.raises(UsageError, match="unknown key 'password'"):
        _answers(str(f))
    with pytest.raises(UsageError, match="no valid port"):
        _bind("host:http")
