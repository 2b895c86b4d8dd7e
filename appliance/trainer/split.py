"""Deterministic train/validation split by hash: the same question always lands on the same side."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.trainer.data import Example


@dataclass
class Split:
    train: list[Example]
    validation: list[Example]


def split(examples: list[Example], validation_fraction: float) -> Split:
    """Hash of the prompt (not the answer) decides, so two answers to one question never straddle the split."""
    train: list[Example] = []
    val: list[Example] = []
    cut = int(validation_fraction * 10_000)
    for ex in examples:
        (val if int(ex.prompt_key[:8], 16) % 10_000 < cut else train).append(ex)
    if not val and len(train) >= 2:
        # A tiny run still needs something to validate on: the example with the lowest hash moves over.
        first = min(train, key=lambda e: e.prompt_key)
        val = [e for e in train if e.prompt_key == first.prompt_key]
        train = [e for e in train if e.prompt_key != first.prompt_key]
    return Split(train, val)


def hold_back(parts: Split, fraction: float, exclude: frozenset[str] = frozenset(),
              max_prompts: int | None = None) -> tuple[Split, list[Example], int]:
    """(parts without the held-back slice, the slice, how many examples were dropped as `exclude`d prompts).

    The slice is the training side's questions with the lowest values of another part of the prompt's
    hash than the validation split uses: `fraction` of them, at most `max_prompts`, so a large run
    holds back only what the gate asks. Early stopping never sees it and validation stays as it
    was. Prompts in `exclude` (a site's frozen evaluation set) are never trained or validated on.
    """
    train = [e for e in parts.train if e.prompt_key not in exclude]
    validation = [e for e in parts.validation if e.prompt_key not in exclude]
    dropped = len(parts.train) + len(parts.validation) - len(train) - len(validation)
    prompts = sorted({e.prompt_key for e in train}, key=lambda k: (k[8:16], k))
    n = int(fraction * len(prompts))
    if max_prompts is not None:
        n = min(n, max_prompts)
    if n >= len(prompts):  # a tiny run trains on what it has rather than on nothing
        n = 0
    chosen = set(prompts[:n])
    held = [e for e in train if e.prompt_key in chosen]
    return Split([e for e in train if e.prompt_key not in chosen], validation), held, dropped
