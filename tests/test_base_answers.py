"""The base model's gate answers are kept per base model, engine, length and conversation (trainer/base_answers.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.trainer import base_answers as ba


def asker(answers: dict[str, str | None], asked: list[str]):
    def ask(convs, adapter):
        assert adapter is False  # the base model, never the candidate
        asked.extend(c[0]["content"] for c in convs)
        return [answers[c[0]["content"]] for c in convs]
    return ask


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_an_answer_is_asked_once_and_a_failed_one_again(tmp_path: Path):
    asked: list[str] = []
    ask = asker({"a": "alpha", "b": None, "c": "gamma"}, asked)
    assert ba.base_answers(tmp_path, "sha1", "llama.cpp", 16, [conv("a"), conv("b")], ask) == ["alpha", None]
    assert ba.base_answers(tmp_path, "sha1", "llama.cpp", 16, [conv("a"), conv("b"), conv("c")], ask) == ["alpha", None, "gamma"]
    assert asked == ["a", "b", "b", "c"]  # "a" came from the cache, the failed "b" was asked again
    # another base model, engine or answer length is another answer
    for key in (("sha2", "llama.cpp", 16), ("sha1", "transformers", 16), ("sha1", "llama.cpp", 32)):
        ba.base_answers(tmp_path, *key, [conv("a")], ask)
    assert asked[4:] == ["a", "a", "a"]


def test_a_damaged_file_is_asked_again_and_the_oldest_go_beyond_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    asked: list[str] = []
    ask = asker({k: k.upper() for k in "abcde"}, asked)
    ba.base_answers(tmp_path, "s", "llama.cpp", 8, [conv("a")], ask)
    (kept,) = tmp_path.glob("*.json")
    kept.write_text("{not json")
    assert ba.base_answers(tmp_path, "s", "llama.cpp", 8, [conv("a")], ask) == ["A"] and asked == ["a", "a"]
    monkeypatch.setattr(ba, "MAX_FILES", 3)
    os.utime(kept, (1000, 1000))
    for i, k in enumerate("bcde"):
        ba.base_answers(tmp_path, "s", "llama.cpp", 8, [conv(k)], ask)
        for f in tmp_path.glob("*.json"):  # the one just written: one second after the previous one
            if json.loads(f.read_text())["answer"] == k.upper():
                os.utime(f, (1001 + i, 1001 + i))
    assert sorted(json.loads(f.read_text())["answer"] for f in tmp_path.glob("*.json")) == ["C", "D", "E"]
