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
