"""The example type every stage passes along, and the stages before training: collect, validate, mask.

Inbox lines are chat records `{"messages": [...]}` or `{"prompt": ..., "completion": ...}`; feedback
rows come from the feedback store. Each stage takes values and returns values plus counts, so the run
report can say what happened to every line.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.feedback_store import FeedbackStore
from appliance.pii import Network, mask_messages, mask_text

ROLES = ("system", "user", "assistant")
MAX_CHARS = 32_000


@dataclass(frozen=True)
class Example:
    messages: tuple[tuple[str, str], ...]  # (role, content); immutable so examples hash and compare
    source: str  # "inbox/file.jsonl:12" or "feedback:34": where a line came from, for reports
    # The words a right answer must contain (a record's "key": a string or a list of them), for the
    # outcome gate's key recall; none: the answer is scored by token F1 against the reference.
    answer_keys: tuple[str, ...] = ()
    sender: str = ""  # "key:<id>", the API key whose feedback this is ("" for the site's inbox): max_per_source counts by it

    @property
    def key(self) -> str:
        """Content hash (the source does not count): equal conversations are the same example."""
        return hashlib.sha256(json.dumps(self.messages, ensure_ascii=False).encode()).hexdigest()

    @property
    def prompt_key(self) -> str:
        """Hash of everything but the final answer: the split uses it, so one question never lands on both sides."""
        return hashlib.sha256(json.dumps(self.messages[:-1], ensure_ascii=False).encode()).hexdigest()

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_json(self) -> dict[str, Any]:
        return ({"messages": self.as_dicts(), "source": self.source} | ({"key": list(self.answer_keys)} if self.answer_keys else {})
                | ({"sender": self.sender} if self.sender else {}))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        return cls(tuple((m["role"], m["content"]) for m in d["messages"]), str(d.get("source", "")), _answer_keys(d),
                   str(d.get("sender", "")))


@dataclass(frozen=True)
class RawRecord:
    source: str
    value: Any  # parsed JSON, or None when the line did not parse
    error: str | None = None
    sender: str = ""  # see Example.sender


@dataclass
class Collected:
    records: list[RawRecord]
    inbox_files: list[Path]
    feedback_last_row: int
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class Rejected:
    source: str
    reason: str


@dataclass
class Validated:
    examples: list[Example]
    rejected: list[Rejected]


def collect(inbox: Path, store: FeedbackStore | None, last_row: int) -> Collected:
    """Every line of `inbox/*.jsonl` (oldest file first), then feedback rated good or corrected since
    `last_row`: newest last, since a later source's answer to the same question supersedes (dedupe)."""
    records: list[RawRecord] = []
    counts: Counter[str] = Counter()
    new_last = last_row
    files = sorted((p for p in inbox.glob("*.jsonl") if p.is_file()), key=lambda p: (p.stat().st_mtime, p.name)) if inbox.is_dir() else []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                src = f"inbox/{path.name}:{n}"
                try:
                    records.append(RawRecord(src, json.loads(line)))
                except json.JSONDecodeError as e:
                    records.append(RawRecord(src, None, f"not JSON ({e.msg})"))
                counts["inbox_lines"] += 1
    if store is not None:
        for ex in store.examples_since(last_row):
            new_last = max(new_last, ex.row)
            if ex.usable:
                records.append(RawRecord(f"feedback:{ex.row}", {"messages": ex.to_chat()}, sender=f"key:{ex.key_id or 'none'}"))
                counts["feedback"] += 1
            else:
                counts["feedback_not_usable"] += 1
    counts["inbox_files"] = len(files)
    return Collected(records, files, new_last, counts)


def _to_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    if "messages" in value:
        msgs = value["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("messages is not a non-empty list")
        return msgs
    if "prompt" in value and "completion" in value:
        return [{"role": "user", "content": value["prompt"]}, {"role": "assistant", "content": value["completion"]}]
    raise ValueError('neither "messages" nor "prompt" and "completion"')


def _answer_keys(value: dict[str, Any]) -> tuple[str, ...]:
    key = value.get("key")
    if key is None:
        return ()
    keys = [key] if isinstance(key, str) else key
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
        raise ValueError("key is not a non-empty string or a list of them")
    return tuple(keys)


def check_record(value: Any) -> Example:
    """One record as an Example, or ValueError saying what is wrong with it."""
    msgs = _to_messages(value)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}, not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {i} has no text content")
        out.append((role, content))
    if out[-1][0] != "assistant":
        raise ValueError("the last message is not the assistant's answer")
    if not any(r == "user" for r, _ in out):
        raise ValueError("there is no user message")
    if sum(len(c) for _, c in out) > MAX_CHARS:
        raise ValueError(f"longer than {MAX_CHARS} characters")
    return Example(tuple(out), "", _answer_keys(value) if isinstance(value, dict) else ())


def validate(collected: Collected) -> Validated:
    """Keep the good records; a bad line is skipped and counted with its file and line, never fatal."""
    examples, rejected = [], []
    for rec in collected.records:
        if rec.error:
            rejected.append(Rejected(rec.source, rec.error))
            continue
        try:
            ex = check_record(rec.value)
        except ValueError as e:
            rejected.append(Rejected(rec.source, mask_text(str(e))))  # a reason quotes the line (a role): it goes into the report
            continue
        examples.append(Example(ex.messages, rec.source, ex.answer_keys, sender=rec.sender))
    return Validated(examples, rejected)


def mask_examples(examples: list[Example], keep: tuple[Network, ...] = ()) -> tuple[list[Example], Counter[str]]:
    """Mask PII in every message (addresses in `keep` stay); the counts say how many values of each kind were masked."""
    total: Counter[str] = Counter()
    out = []
    for ex in examples:
        masked, counts = mask_messages(ex.as_dicts(), keep)
        total.update(counts)
        out.append(Example(tuple((m["role"], m["content"]) for m in masked), ex.source, ex.answer_keys, sender=ex.sender))
    return out, total
