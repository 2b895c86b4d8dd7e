"""Chat examples as token ids with labels on the assistant's words, and the batches a training step takes."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from appliance.trainer.data import Example

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE except on assistant tokens

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode(tokenizer: Any, ex: Example, max_length: int) -> Encoded | None:
    """Chat template applied; labels only on assistant content and its end-of-turn token."""
    msgs = ex.as_dicts()
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False))
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = [], []
    for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        ids.append(tok)
        labels.append(tok if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE)
    ids, labels = ids[:max_length], labels[:max_length]
    out = Encoded(ids, labels)
    return out if out.n_labels > 0 else None


def length_grouped(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length (sorted, random tie-break), in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def uniform_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches drawn uniformly, whatever the examples' lengths (differential privacy: a batch must not depend
    on what its examples say)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(items: list[Encoded], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, e in enumerate(items):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
