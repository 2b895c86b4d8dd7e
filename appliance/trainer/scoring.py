"""Scoring generated answers, pure: key recall, token F1, repetition, and the paired sign test.

Words are runs of letters and digits (an underscore or a dot separates them, so
"adp_adapter_adapter" is three words); each CJK character is a word of its own, since those
scripts put no spaces between words.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")


def words(text: str) -> list[str]:
    """The text's words, lower-cased."""
    return _WORD.findall(text.lower())


def key_recall(answer: str, keys: Sequence[str]) -> float:
    """Share of the keys the answer contains (case-insensitive substring); no keys scores 0."""
    if not keys:
        return 0.0
    low = answer.lower()
    return sum(k.lower() in low for k in keys) / len(keys)


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 of the answer's words against the reference's (multisets); two empty texts agree."""
    a, r = Counter(words(answer)), Counter(words(reference))
    if not a or not r:
        return float(not a and not r)
    common = sum((a & r).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def score_answer(answer: str, reference: str, keys: Sequence[str] = ()) -> float:
    """Key recall where the example names keys (the words a right answer must contain), else token F1."""
    return key_recall(answer, keys) if keys else token_f1(answer, reference)


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test: the chance of at least `wins` of `wins + losses` fair coin flips (ties dropped).

    With right/wrong scores this is the exact McNemar test on the items that changed.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
