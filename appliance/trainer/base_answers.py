"""The base model's greedy answers, kept in the trainer's state: each computed once per base model.

The gate compares the candidate with the base model's answers to the anchor prompts every run, and
to the held-out items until an adapter is active. Those answers change only with the base model
(its content hash), the engine that runs it and the answer length, so each is stored under a key of
those and the conversation, one small JSON file per answer; the oldest go beyond `MAX_FILES`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from appliance.atomic import atomic_write_json

MAX_FILES = 2048

Conversation = list[dict[str, str]]
Ask = Callable[[list[Conversation], bool], list[str | None]]


def _key(base_sha: str, backend: str, max_tokens: int, conversation: Conversation) -> str:
    return hashlib.sha256(json.dumps([base_sha, backend, max_tokens, conversation]).encode()).hexdigest()[:32]


def _read(path: Path, conversation: Conversation) -> str | None:
    try:
        kept = json.loads(path.read_text())
        if kept.get("conversation") == conversation and isinstance(kept.get("answer"), str):
            return str(kept["answer"])
    except (OSError, ValueError, AttributeError):
        pass
    return None


def base_answers(cache_dir: Path, base_sha: str, backend: str, max_tokens: int, conversations: list[Conversation],
                 ask: Ask) -> list[str | None]:
    """One answer per conversation, from the cache where it holds one, else from `ask` (without the adapter)."""
    paths = [cache_dir / f"{_key(base_sha, backend, max_tokens, c)}.json" for c in conversations]
    got = [_read(p, c) for p, c in zip(paths, conversations, strict=True)]
    todo = [i for i, a in enumerate(got) if a is None]
    if not todo:
        return got
    for i, answer in zip(todo, ask([conversations[i] for i in todo], False), strict=True):
        got[i] = answer
        if answer is not None:  # a failed answer is asked again next time
            atomic_write_json(paths[i], {"base_sha256": base_sha, "backend": backend, "max_tokens": max_tokens,
                                         "conversation": conversations[i], "answer": answer})
    _prune(cache_dir)
    return got


def _prune(cache_dir: Path) -> None:
    files = sorted(cache_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
    for old in files[:max(0, len(files) - MAX_FILES)]:
        old.unlink(missing_ok=True)
