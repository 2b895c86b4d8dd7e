"""LoRA training with peft in a plain torch loop: loss on assistant turns only, length-grouped batches.

Why not HF Trainer: a plain loop on CPU/GPU is shorter and faster here. Two levers make it so:
batches group examples of similar length (little padding computed), and the LM head runs only at
positions that carry a label (the 49k-wide vocabulary projection is skipped for prompt tokens).
Out of memory halves the micro-batch and accumulates gradients; below a floor the run gives up.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import ApplianceError
from appliance.trainer.data import Example
from appliance.trainer.settings import TrainerSettings

IGNORE = -100


class TrainingError(ApplianceError):
    """A training run that cannot start or did not finish."""


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


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were."""
    import torch.nn.functional as F

    lm = causal_lm(model)
    dev = lm.device
    hidden = lm.model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).last_hidden_state
    targets = batch["labels"][:, 1:].to(dev)
    sel = targets != IGNORE
    logits = lm.lm_head(hidden[:, :-1][sel]).float()
    return F.cross_entropy(logits, targets[sel], reduction="sum"), int(sel.sum())


def evaluate_loss(model: Any, data: list[Encoded], pad_id: int, batch_size: int = 8) -> float:
    """Mean per-token loss on assistant tokens (NaN for no data)."""
    import torch

    if not data:
        return math.nan
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in length_grouped([len(e.input_ids) for e in data], batch_size, random.Random(0)):
            s, k = loss_sum(model, collate([data[i] for i in b], pad_id))
            total += float(s)
            n += k
    model.train(was_training)
    return total / max(n, 1)


@dataclass
class TrainResult:
    best_val_loss: float
    steps: int
    epochs_run: float
    stopped_early: bool
    micro_batch: int
    accumulation: int
    oom_retries: int
    trained_tokens: int  # real (non-padding) tokens through forward and backward
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower())


# Called before each micro-batch with its size: the point where tests inject an allocation failure.
MicroHook = Callable[[int], None]


def _backward(model: Any, items: list[Encoded], n_labels: int, micro: int, pad_id: int, opt: Any,
              settings: TrainerSettings, log: Callable[[str], None], before_micro: MicroHook | None) -> tuple[float, int, int, int]:
    """The gradients of one optimizer step in micro-batches of `micro`, halved at each out-of-memory.
    Returns the loss sum, the tokens seen, the micro-batch that fitted, and how many OOMs it took."""
    import torch

    ooms = 0
    while True:
        try:
            opt.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for j in range(0, len(items), micro):
                chunk = items[j : j + micro]
                if before_micro:
                    before_micro(len(chunk))
                s, _ = loss_sum(model, collate(chunk, pad_id))
                (s / n_labels).backward()
                step_loss += float(s.detach())
                step_tokens += sum(len(e.input_ids) for e in chunk)
            return step_loss, step_tokens, micro, ooms
        except Exception as e:
            if not _is_oom(e):
                raise
            ooms += 1
            opt.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if micro // 2 < settings.min_batch_size:
                raise TrainingError(f"Training ran out of memory even with a micro-batch of {micro}.",
                                    "Lower max_length or lora_rank in [trainer], or free memory on this machine.") from None
            micro //= 2
            log(f"out of memory: micro-batch {micro}, accumulating {math.ceil(settings.batch_size / micro)} steps")


def train_lora(model: Any, train: list[Encoded], val: list[Encoded], settings: TrainerSettings, pad_id: int,
               log: Callable[[str], None] = print, before_micro: MicroHook | None = None,
               max_steps: int | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters of `model`; on return it holds the best weights seen on validation."""
    import torch

    if not train:
        raise TrainingError("There are no training examples left after filtering.")
    rng = random.Random(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs if max_steps is None else min(max_steps, steps_per_epoch * settings.epochs)
    warmup = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    eval_every = max(1, steps_per_epoch // 2)
    micro = settings.batch_size
    best, best_state, bad_evals = math.inf, None, 0
    step, tokens, ooms, stopped = 0, 0, 0, False
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(settings.epochs):
        for batch_idx in length_grouped([len(e.input_ids) for e in train], settings.batch_size, rng):
            if step >= total_steps:
                break
            items = [train[i] for i in batch_idx]
            n_labels = sum(e.n_labels for e in items)
            step_loss, step_tokens, micro, oom = _backward(model, items, n_labels, micro, pad_id, opt, settings, log, before_micro)
            ooms += oom
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            tokens += step_tokens
            if step % eval_every == 0 or step == total_steps:
                v = evaluate_loss(model, val, pad_id)
                history.append({"step": step, "train_loss": step_loss / n_labels, "val_loss": v})
                log(f"step {step}/{total_steps} epoch {epoch + 1} train_loss {step_loss / n_labels:.4f} val_loss {v:.4f}")
                if v < best:
                    best, bad_evals = v, 0
                    best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                else:
                    bad_evals += 1
                    if bad_evals >= settings.patience:
                        stopped = True
                        log(f"early stop: validation loss has not improved for {bad_evals} evaluations")
                        break
        if stopped or step >= total_steps:
            break
    if best_state is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in best_state.items():
                named[n].copy_(v)
    model.eval()
    return TrainResult(best, step, round(step / steps_per_epoch, 3), stopped, micro,
                       math.ceil(settings.batch_size / micro), ooms, tokens, time.perf_counter() - t0, history)
