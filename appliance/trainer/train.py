"""LoRA training with peft in a plain torch loop: loss on assistant turns only, length-grouped batches.

Why not HF Trainer: a plain loop on CPU/GPU is shorter and faster here. Two levers make it so:
batches group examples of similar length (little padding computed), and the LM head runs only at
positions that carry a label (the 49k-wide vocabulary projection is skipped for prompt tokens).
Out of memory halves the micro-batch and accumulates gradients (below a floor the run gives up), and
the micro-batch doubles back after a few steps without one; evaluation halves its batch the same way.
On a GPU it computes in bf16 (fp16 with a gradient scaler), and under torchrun each rank takes its
share of every step (appliance/trainer/distributed.py).
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
from appliance.trainer.distributed import FP32, Precision, World
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


def loss_sum(model: Any, batch: dict[str, Any], precision: Precision = FP32) -> tuple[Any, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were."""
    import torch.nn.functional as F

    lm = causal_lm(model)
    dev = lm.device
    targets = batch["labels"][:, 1:].to(dev)
    sel = targets != IGNORE
    with precision.compute(str(dev)):
        hidden = lm.model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).last_hidden_state
        logits = lm.lm_head(hidden[:, :-1][sel]).float()
    return F.cross_entropy(logits, targets[sel], reduction="sum"), int(sel.sum())


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower())


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Called before each micro-batch (training) or batch (evaluation) with its size: where tests inject an allocation failure.
MicroHook = Callable[[int], None]


def _eval_pass(model: Any, data: list[Encoded], pad_id: int, batch_size: int, precision: Precision,
               before: MicroHook | None) -> float:
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for b in length_grouped([len(e.input_ids) for e in data], batch_size, random.Random(0)):
            if before:
                before(len(b))
            s, k = loss_sum(model, collate([data[i] for i in b], pad_id), precision)
            total += float(s)
            n += k
    return total / max(n, 1)


def evaluate_loss(model: Any, data: list[Encoded], pad_id: int, batch_size: int = 8, precision: Precision = FP32,
                  before_batch: MicroHook | None = None) -> float:
    """Mean per-token loss on assistant tokens (NaN for no data); out of memory halves the batch and tries again."""
    if not data:
        return math.nan
    was_training = model.training
    model.eval()
    try:
        while True:
            try:
                return _eval_pass(model, data, pad_id, batch_size, precision, before_batch)
            except Exception as e:
                if not _is_oom(e):
                    raise
                _free_cuda()
                if batch_size == 1:
                    raise TrainingError("Evaluation ran out of memory even with a batch of 1.",
                                        "Lower max_length in [trainer], or free memory on this machine.") from None
                batch_size //= 2
    finally:
        model.train(was_training)


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
    micro_regrown: int = 0  # times the micro-batch doubled back after running without out-of-memory


# Optimizer steps without an out-of-memory after which a halved micro-batch doubles again (the memory
# another process held may be free by now; a long run should not stay at its worst moment's size).
GROW_AFTER = 4


@dataclass
class _Loop:
    """What every step of one run shares."""

    model: Any
    params: list[Any]
    opt: Any
    settings: TrainerSettings
    pad_id: int
    log: Callable[[str], None]
    before_micro: MicroHook | None
    world: World
    precision: Precision
    scaler: Any  # torch.amp.GradScaler for fp16, else None


def _backward(loop: _Loop, items: list[Encoded], n_labels: int, micro: int) -> tuple[float, int, int, int]:
    """The gradients of one optimizer step (this rank's share of `items`) in micro-batches of `micro`, halved at
    each out-of-memory. Returns the loss sum, the tokens seen, the micro-batch that fitted, and how many OOMs it took."""
    ooms, mine = 0, loop.world.shard(items)
    while True:
        try:
            loop.opt.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for j in range(0, len(mine), micro):
                chunk = mine[j : j + micro]
                if loop.before_micro:
                    loop.before_micro(len(chunk))
                s, _ = loss_sum(loop.model, collate(chunk, loop.pad_id), loop.precision)
                scaled = s / n_labels  # the whole step's labels: summed over ranks, the one-process gradient
                (loop.scaler.scale(scaled) if loop.scaler else scaled).backward()
                step_loss += float(s.detach())
                step_tokens += sum(len(e.input_ids) for e in chunk)
            return step_loss, step_tokens, micro, ooms
        except Exception as e:
            if not _is_oom(e):
                raise
            ooms += 1
            loop.opt.zero_grad(set_to_none=True)
            _free_cuda()
            if micro // 2 < loop.settings.min_batch_size:
                raise TrainingError(f"Training ran out of memory even with a micro-batch of {micro}.",
                                    "Lower max_length or lora_rank in [trainer], or free memory on this machine.") from None
            micro //= 2
            loop.log(f"out of memory: micro-batch {micro}, accumulating {math.ceil(loop.settings.batch_size / micro)} steps")


def _apply(loop: _Loop) -> None:
    """Sum the gradients over the ranks, clip, step (through the scaler in fp16)."""
    import torch

    loop.world.sum_grads(loop.params)
    if loop.scaler is not None:
        loop.scaler.unscale_(loop.opt)
    torch.nn.utils.clip_grad_norm_(loop.params, 1.0)
    if loop.scaler is not None:
        loop.scaler.step(loop.opt)
        loop.scaler.update()
    else:
        loop.opt.step()


def _new_loop(model: Any, settings: TrainerSettings, pad_id: int, log: Callable[[str], None], before_micro: MicroHook | None,
              world: World | None, precision: Precision | None) -> _Loop:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    precision = precision or FP32
    scaler = torch.amp.GradScaler("cuda") if precision.scaler else None
    return _Loop(model, params, opt, settings, pad_id, log, before_micro, world or World(), precision, scaler)


@dataclass
class _Progress:
    micro: int
    steps: int = 0
    tokens: int = 0
    ooms: int = 0
    calm: int = 0  # steps since the last out-of-memory
    regrown: int = 0

    def after_step(self, oom: int, batch_size: int, log: Callable[[str], None]) -> None:
        """A halved micro-batch doubles back after GROW_AFTER steps without an out-of-memory."""
        self.ooms += oom
        self.calm = 0 if oom else self.calm + 1
        if self.micro < batch_size and self.calm >= GROW_AFTER:
            self.micro, self.calm, self.regrown = min(batch_size, self.micro * 2), 0, self.regrown + 1
            log(f"no out-of-memory for {GROW_AFTER} steps: micro-batch back up to {self.micro}")


def train_lora(model: Any, train: list[Encoded], val: list[Encoded], settings: TrainerSettings, pad_id: int,
               log: Callable[[str], None] = print, before_micro: MicroHook | None = None,
               max_steps: int | None = None, world: World | None = None, precision: Precision | None = None,
               before_eval: MicroHook | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters of `model`; on return it holds the best weights seen on validation.
    Under torchrun every rank calls it with the same data (`world`: this rank's share of each step)."""
    import torch

    if not train:
        raise TrainingError("There are no training examples left after filtering.")
    loop = _new_loop(model, settings, pad_id, log, before_micro, world, precision)
    rng = random.Random(settings.seed)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs if max_steps is None else min(max_steps, steps_per_epoch * settings.epochs)
    warmup = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        loop.opt, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    eval_every = max(1, steps_per_epoch // 2)
    p = _Progress(settings.batch_size)
    best, best_state, bad_evals, stopped = math.inf, None, 0, False
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(settings.epochs):
        for batch_idx in length_grouped([len(e.input_ids) for e in train], settings.batch_size, rng):
            if p.steps >= total_steps:
                break
            items = [train[i] for i in batch_idx]
            n_labels = sum(e.n_labels for e in items)
            step_loss, step_tokens, p.micro, oom = _backward(loop, items, n_labels, p.micro)
            _apply(loop)
            sched.step()
            step_loss, step_tokens_f = loop.world.sum_floats(step_loss, step_tokens)
            p.steps, p.tokens = p.steps + 1, p.tokens + int(step_tokens_f)
            p.after_step(oom, settings.batch_size, log)
            if p.steps % eval_every == 0 or p.steps == total_steps:
                v = evaluate_loss(model, val, pad_id, precision=loop.precision, before_batch=before_eval)
                history.append({"step": p.steps, "train_loss": step_loss / n_labels, "val_loss": v})
                log(f"step {p.steps}/{total_steps} epoch {epoch + 1} train_loss {step_loss / n_labels:.4f} val_loss {v:.4f}")
                if v < best:
                    best, bad_evals = v, 0
                    best_state = {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}
                else:
                    bad_evals += 1
                    if bad_evals >= settings.patience:
                        stopped = True
                        log(f"early stop: validation loss has not improved for {bad_evals} evaluations")
                        break
        if stopped or p.steps >= total_steps:
            break
    _restore(model, best_state)
    return TrainResult(best, p.steps, round(p.steps / steps_per_epoch, 3), stopped, p.micro,
                       math.ceil(settings.batch_size / p.micro), p.ooms, p.tokens, time.perf_counter() - t0, history, p.regrown)


def _restore(model: Any, best_state: dict[str, Any] | None) -> None:
    import torch

    if best_state is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in best_state.items():
                named[n].copy_(v)
    model.eval()
