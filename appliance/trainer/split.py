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


def hold_back(parts: Split, fraction: float, exclude: frozenset[str] = frozenset()) -> tuple[Split, list[Example], int]:
    """(parts without the held-back slice, the slice, how many examples were dropped as `exclude`d prompts).

    The slice comes out of the training side only, by another part of the prompt's hash than the
    validation split, so early stopping never sees it and validation stays as it was. Prompts in
    `exclude` (a site's frozen evaluation set) are never trained or validated on.
    """
    train = [e for e in parts.train if e.prompt_key not in exclude]
    validation = [e for e in parts.validation if e.prompt_key not in exclude]
    dropped = len(parts.train) + len(parts.validation) - len(train) - len(validation)
    cut = int(fraction * 10_000)
    held = [e for e in train if int(e.prompt_key[8:16], 16) % 10_000 < cut]
    if len(held) >= len(train):  # a tiny run trains on what it has rather than on nothing
        held = []
    keep = {id(e) for e in held}
    return Split([e for e in train if id(e) not in keep], validation), held, dropped
