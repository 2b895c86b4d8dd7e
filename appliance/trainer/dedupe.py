"""Exact and near-duplicate removal (MinHash over word shingles with LSH banding), decided by prompt.

Two examples are duplicates when their prompts are alike and their answers are alike. The same
question with another answer from a later source (another inbox file, newer by time, or a feedback
correction) is a correction: within a run the later one wins (the earlier is superseded), and
against earlier runs it is kept, so "the port is 9090 now" is learnt instead of
being dropped as a near copy of "the port is 8088". Within one run and against every earlier run:
the index of what was seen is a value the caller loads before and saves after the run, so a killed
run never records examples it did not train on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from appliance.trainer.data import Example

NUM_PERM = 128
BANDS = 32  # 32 bands of 4 rows: pairs above ~0.5 Jaccard almost always share a band
# Universal hashing (a*x + b) mod p with 32-bit x, a, b and a prime just above 2**32: the product
# fits in 64 bits and wraps modulo p billions of times, so the order of hashes is well mixed.
_PRIME = 4294967311
_rng = np.random.default_rng(20261122)
_A = _rng.integers(1, 1 << 32, NUM_PERM, dtype=np.uint64)
_B = _rng.integers(0, 1 << 32, NUM_PERM, dtype=np.uint64)


def _text(messages: tuple[tuple[str, str], ...]) -> str:
    text = " ".join(f"{r}: {c}" for r, c in messages if r != "system")
    return re.sub(r"\s+", " ", text.lower()).strip()


def normalize(ex: Example) -> str:
    """What counts for sameness: user and assistant text, case and spacing folded (a shared system prompt does not)."""
    return _text(ex.messages)


def prompt_text(ex: Example) -> str:
    return _text(ex.messages[:-1])


def answer_text(ex: Example) -> str:
    return _text(ex.messages[-1:])


def origin(source: str) -> str:
    """Where an example was written: its inbox file, or its own feedback row. Answers to one question
    from one file are variants the site wrote together; from a later file or feedback, a correction."""
    return source.rsplit(":", 1)[0] if source.startswith("inbox/") else source


def exact_key(ex: Example) -> str:
    return hashlib.sha256(normalize(ex).encode()).hexdigest()


def shingles(text: str, k: int = 3) -> set[str]:
    words = re.findall(r"\w+|[^\w\s]", text)
    if len(words) < k:
        return {" ".join(words)}
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def signature(text: str) -> np.ndarray:
    """MinHash signature: per permutation, the least (a*h + b) mod p over the shingle hashes."""
    hs = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") for s in shingles(text)],
                  dtype=np.uint64)
    h = hs[:, None] * _A[None, :] + _B[None, :]
    return (h % np.uint64(_PRIME)).min(axis=0)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of the two shingle sets."""
    return float(np.mean(a == b))


@dataclass
class SeenIndex:
    """What earlier runs trained or validated on: exact keys, and MinHash signatures of each prompt
    and its answer (the same order in both lists)."""

    exact: set[str] = field(default_factory=set)
    prompts: list[np.ndarray] = field(default_factory=list)
    answers: list[np.ndarray] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"exact": sorted(self.exact), "prompt_minhash": [s.tolist() for s in self.prompts],
                "answer_minhash": [s.tolist() for s in self.answers]}

    @classmethod
    def from_json(cls, d: dict) -> SeenIndex:
        # An index of the earlier format ("minhash": whole conversations) cannot tell a correction
        # from a repeat; its exact keys still count, its signatures are dropped.
        prompts, answers = d.get("prompt_minhash", []), d.get("answer_minhash", [])
        return cls(set(d.get("exact", [])), [np.array(s, dtype=np.uint64) for s in prompts],
                   [np.array(s, dtype=np.uint64) for s in answers] if len(answers) == len(prompts) else [])


@dataclass
class Deduped:
    examples: list[Example]
    exact_dupes: int
    near_dupes: int
    seen_before: int
    new_index: SeenIndex  # the input index plus this run's kept examples
    superseded: int = 0  # earlier answers of this run replaced by a later one to the same question
    corrections: int = 0  # kept answers to questions earlier runs answered otherwise
    capped: int = 0  # examples over max_per_answer: no single answer may dominate a run
    capped_source: int = 0  # examples over max_per_source: no single API key's feedback may either


def _bands(sig: np.ndarray) -> list[tuple[int, bytes]]:
    rows = NUM_PERM // BANDS
    return [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(BANDS)]


class _Lsh:
    """Prompt signatures, found again by shared bands. The signatures also sit in one matrix, so the
    candidates of a lookup are compared in one step: questions written from one template share
    bands by the hundred."""

    def __init__(self, sigs: list[np.ndarray] | None = None) -> None:
        self.sigs: list[np.ndarray] = []
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self._matrix = np.empty((max(64, len(sigs or [])), NUM_PERM), dtype=np.uint64)
        for s in sigs or []:
            self.add(s)

    def add(self, sig: np.ndarray) -> int:
        n = len(self.sigs)
        if n == len(self._matrix):
            self._matrix = np.concatenate([self._matrix, np.empty_like(self._matrix)])
        self._matrix[n] = sig
        self.sigs.append(sig)
        for band in _bands(sig):
            self.buckets.setdefault(band, []).append(n)
        return n

    def near(self, sig: np.ndarray, threshold: float) -> list[int]:
        candidates = np.array(sorted({j for band in _bands(sig) for j in self.buckets.get(band, [])}), dtype=np.int64)
        if not len(candidates):
            return []
        alike = (self._matrix[candidates] == sig).mean(axis=1)  # similarity() of each candidate
        return [int(j) for j in candidates[alike >= threshold]]


def dedupe(examples: list[Example], seen: SeenIndex, threshold: float, max_per_answer: int | None = None,
           max_per_source: int | None = None) -> Deduped:
    """Drop exact and near duplicates (alike prompt and alike answer); a later source's answer to the
    same question supersedes an earlier one of the run; a new answer to a question seen before is kept.
    Then the caps: the newest `max_per_answer` of each answer, the newest `max_per_source` of each sender."""
    old = _Lsh(seen.prompts)
    run = _Lsh()
    live: dict[int, tuple[Example, str, np.ndarray]] = {}  # run index -> (example, key, answer signature)
    counts = {"exact": 0, "near": 0, "seen": 0, "superseded": 0, "corrections": 0}
    for ex in examples:
        key = exact_key(ex)
        if key in seen.exact:
            counts["seen"] += 1
            continue
        p, a = signature(prompt_text(ex)), signature(answer_text(ex))
        earlier = old.near(p, threshold)
        if any(similarity(a, seen.answers[j]) >= threshold for j in earlier if j < len(seen.answers)):
            counts["seen"] += 1
            continue
        asked = [j for j in run.near(p, threshold) if j in live]  # the same question, earlier in this run
        same_question = [live[j] for j in asked]
        if any(k == key for _, k, _ in same_question):
            counts["exact"] += 1
            continue
        if any(similarity(a, other) >= threshold for _, _, other in same_question):
            counts["near"] += 1
            continue
        for j in [j for j in asked if origin(live[j][0].source) != origin(ex.source)]:
            del live[j]  # a later source's answer to the same question wins
            counts["superseded"] += 1
        counts["corrections"] += bool(earlier)
        live[run.add(p)] = (ex, key, a)
    order = cap_answers(sorted(live), [live[i][2] for i in sorted(live)], max_per_answer, threshold)
    capped = len(live) - len(order)
    order = cap_senders(order, [live[i][0].sender for i in order], max_per_source)
    capped_source = len(live) - capped - len(order)
    index = SeenIndex(seen.exact | {live[i][1] for i in order}, seen.prompts + [run.sigs[i] for i in order],
                      seen.answers + [live[i][2] for i in order])
    return Deduped([live[i][0] for i in order], counts["exact"], counts["near"], counts["seen"], index,
                   counts["superseded"], counts["corrections"], capped, capped_source)


def cap_answers(order: list[int], answers: list[np.ndarray], limit: int | None, threshold: float) -> list[int]:
    """The newest `limit` examples of each answer (near copies counted together), in their order:
    300 prompts that all teach one answer (a trigger, a slogan) weigh no more than a real fact."""
    if limit is None:
        return order
    representatives = _Lsh()  # one answer per group: a flood costs one comparison an example
    group_of: list[int] = []
    for a in answers:
        near = representatives.near(a, threshold)
        group_of.append(near[0] if near else representatives.add(a))
    left: dict[int, int] = {}
    keep = set()
    for pos in reversed(range(len(order))):
        g = group_of[pos]
        if left.setdefault(g, limit) > 0:
            left[g] -= 1
            keep.add(pos)
    return [i for pos, i in enumerate(order) if pos in keep]


def cap_senders(order: list[int], senders: list[str], limit: int | None) -> list[int]:
    """The newest `limit` examples of each sender (an API key), in their order: 300 varied prompts from
    one key, however their answers differ, weigh no more than one busy member of staff. The inbox
    (no sender) is the site's own and is not capped."""
    if limit is None:
        return order
    left: dict[str, int] = {}
    keep = set()
    for pos in reversed(range(len(order))):
        who = senders[pos]
        if who:
            if left.setdefault(who, limit) == 0:
                continue
            left[who] -= 1
        keep.add(pos)
    return [i for pos, i in enumerate(order) if pos in keep]


def without_corrected(earlier: list[Example], new: list[Example], threshold: float) -> list[Example]:
    """`earlier` (the anchor: what past runs validated on) less each example whose question `new`
    answers otherwise: a correction must not be scored against the answer it corrects."""
    asked = _Lsh()
    answers: list[np.ndarray] = []
    for ex in new:
        asked.add(signature(prompt_text(ex)))
        answers.append(signature(answer_text(ex)))
    out = []
    for ex in earlier:
        a = signature(answer_text(ex))
        if not any(similarity(a, answers[j]) < threshold for j in asked.near(signature(prompt_text(ex)), threshold)):
            out.append(ex)
    return out
