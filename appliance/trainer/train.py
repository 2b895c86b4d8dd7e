"""LoRA training with peft in a plain torch loop: loss on assistant turns only, length-grouped batches.

Why not HF Trainer: a plain loop on CPU/GPU is shorter and faster here. Two levers make it so:
batches group examples of similar length (little padding computed), and the LM head runs only at
positions that carry a label (the 49k-wide vocabulary projection is skipped for prompt tokens).
Out of memory halves the micro-batch and accumulates gradients (below a floor the run gives up), and
the micro-batch doubles back after a few steps without one; evaluation halves its batch the same way.
On a GPU it computes in bf16 (fp16 with a gradient scaler), and under torchrun each rank takes its
share of every step (appliance/trainer/distributed.py). A run checkpoints and stops for its deadline
(appliance/trainer/checkpoint.py); under differential privacy each example's gradient is clipped and
each step noised (appliance/trainer/privacy.py).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import ApplianceError
from appliance.trainer.checkpoint import Checkpointer, Deadline, LoopState, load_weights, lora_state, resume, tuple_state
from appliance.trainer.distributed import FP32, Precision, World
from appliance.trainer.encoding import IGNORE as IGNORE
from appliance.trainer.encoding import Encoded as Encoded
from appliance.trainer.encoding import collate as collate
from appliance.trainer.encoding import encode as encode
from appliance.trainer.encoding import length_grouped, uniform_batches
from appliance.trainer.privacy import attach, spent
from appliance.trainer.settings import TrainerSettings


class TrainingError(ApplianceError):
    """A training run that cannot start or did not finish."""


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_losses(model: Any, batch: dict[str, Any], precision: Precision = FP32) -> tuple[Any, Any]:
    """Next-token cross-entropy at each labelled position, and the batch row each one belongs to."""
    import torch.nn.functional as F

    lm = causal_lm(model)
    dev = lm.device
    targets = batch["labels"][:, 1:].to(dev)
    sel = targets != IGNORE
    with precision.compute(str(dev)):
        hidden = lm.model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).last_hidden_state
        logits = lm.lm_head(hidden[:, :-1][sel]).float()
    return F.cross_entropy(logits, targets[sel], reduction="none"), sel.nonzero()[:, 0]


def loss_sum(model: Any, batch: dict[str, Any], precision: Precision = FP32) -> tuple[Any, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were."""
    losses, _ = token_losses(model, batch, precision)
    return losses.sum(), int(losses.numel())


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
    planned_steps: int = 0
    stopped_at_deadline: bool = False
    resumed_at_step: int | None = None  # the checkpoint's step this run went on from
    privacy: dict[str, Any] | None = None  # ε, δ and the noise of a differentially private run


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
    dp: Any = None  # privacy.DPSGD of a differentially private run


def _micro_loss(loop: _Loop, chunk: list[Encoded], n_labels: int) -> float:
    """One micro-batch's forward and backward; its summed loss. Under DP each example's loss is its mean per
    token, so clipping bounds one example's influence however long its answer is."""
    if loop.dp is None:
        s, _ = loss_sum(loop.model, collate(chunk, loop.pad_id), loop.precision)
        scaled = s / n_labels  # the whole step's labels: summed over ranks, the one-process gradient
        (loop.scaler.scale(scaled) if loop.scaler else scaled).backward()
        return float(s.detach())
    return float(loop.dp.backward(token_losses(loop.model, collate(chunk, loop.pad_id), loop.precision), len(chunk)))


def _backward(loop: _Loop, items: list[Encoded], n_labels: int, micro: int) -> tuple[float, int, int, int]:
    """The gradients of one optimizer step (this rank's share of `items`) in micro-batches of `micro`, halved at
    each out-of-memory. Returns the loss sum, the tokens seen, the micro-batch that fitted, and how many OOMs it took."""
    ooms, mine = 0, loop.world.shard(items)
    while True:
        try:
            loop.opt.zero_grad(set_to_none=True)
            if loop.dp:
                loop.dp.start_step()
            step_loss, step_tokens = 0.0, 0
            for j in range(0, len(mine), micro):
                chunk = mine[j : j + micro]
                if loop.before_micro:
                    loop.before_micro(len(chunk))
                step_loss += _micro_loss(loop, chunk, n_labels)
                step_tokens += sum(len(e.input_ids) for e in chunk)
            if loop.dp:
                loop.dp.load_clipped()
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


def _apply(loop: _Loop, n_examples: int) -> None:
    """Sum the gradients over the ranks, clip (per example and noised under DP), step (through the scaler in fp16)."""
    import torch

    loop.world.sum_grads(loop.params)
    if loop.dp is not None:
        loop.dp.add_noise(n_examples)
        loop.opt.step()
        return
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
    ooms: int = 0
    calm: int = 0  # steps since the last out-of-memory
    regrown: int = 0
    step_s: list[float] = field(default_factory=list)  # this process's step times
    eval_s: float = 0.0  # the last validation pass
    last_loss: float = math.nan  # the last step's train loss per label

    def after_step(self, oom: int, batch_size: int, log: Callable[[str], None]) -> None:
        """A halved micro-batch doubles back after GROW_AFTER steps without an out-of-memory."""
        self.ooms += oom
        self.calm = 0 if oom else self.calm + 1
        if self.micro < batch_size and self.calm >= GROW_AFTER:
            self.micro, self.calm, self.regrown = min(batch_size, self.micro * 2), 0, self.regrown + 1
            log(f"no out-of-memory for {GROW_AFTER} steps: micro-batch back up to {self.micro}")

    def next_step_s(self) -> float:
        """A cautious estimate of the next step: the slower of the last one and the mean."""
        return max(self.step_s[-1], sum(self.step_s) / len(self.step_s)) if self.step_s else 0.0


@dataclass
class _Run:
    """One call of train_lora: the loop, its schedule and where it is."""

    loop: _Loop
    sched: Any
    s: LoopState
    p: _Progress
    train: list[Encoded]
    val: list[Encoded]
    total: int
    eval_every: int
    before_eval: MicroHook | None
    checkpoint: Checkpointer | None


def _evaluate(r: _Run, train_loss: float) -> bool:
    """Validation pass; the best weights kept. True when patience has run out (early stop)."""
    t = time.perf_counter()
    v = evaluate_loss(r.loop.model, r.val, r.loop.pad_id, precision=r.loop.precision, before_batch=r.before_eval)
    r.p.eval_s = time.perf_counter() - t
    s = r.s
    s.history.append({"step": s.steps, "train_loss": train_loss, "val_loss": v})
    r.loop.log(f"step {s.steps}/{r.total} epoch {s.epoch + 1} train_loss {train_loss:.4f} val_loss {v:.4f}")
    if v < s.best:
        s.best, s.bad_evals, s.best_state = v, 0, lora_state(r.loop.model)
        return False
    s.bad_evals += 1
    if s.bad_evals >= r.loop.settings.patience:
        r.loop.log(f"early stop: validation loss has not improved for {s.bad_evals} evaluations")
        return True
    return False


def _step(r: _Run, items: list[Encoded]) -> float:
    """One optimizer step; its mean train loss per label."""
    t = time.perf_counter()
    n_labels = sum(e.n_labels for e in items)
    step_loss, step_tokens, r.p.micro, oom = _backward(r.loop, items, n_labels, r.p.micro)
    _apply(r.loop, len(items))
    r.sched.step()
    step_loss, step_tokens_f = r.loop.world.sum_floats(step_loss, step_tokens)
    r.s.steps, r.s.tokens = r.s.steps + 1, r.s.tokens + int(step_tokens_f)
    r.p.after_step(oom, r.loop.settings.batch_size, r.loop.log)
    r.p.step_s.append(time.perf_counter() - t)
    r.p.last_loss = float(step_loss / n_labels)
    return r.p.last_loss


def _out_of_time(r: _Run, deadline: Deadline | None) -> bool:
    stop = deadline is not None and not deadline.leaves_time(r.p.next_step_s(), r.p.eval_s)
    return bool(r.loop.world.sum_floats(float(stop))[0])  # every rank stops together


def _loop(r: _Run, lengths: list[int], rng: random.Random, deadline: Deadline | None) -> tuple[bool, bool]:
    """Steps until the planned total, the end of the epochs, an early stop or the deadline: (early stop, deadline)."""
    s, st = r.s, r.loop.settings
    while s.steps < r.total and not s.stopped_early:
        if s.pos >= len(s.order):
            if s.order:
                s.epoch, s.order, s.pos = s.epoch + 1, [], 0
            if s.epoch >= st.epochs:
                break
            s.order = (uniform_batches if r.loop.dp else length_grouped)(lengths, st.batch_size, rng)
            s.rng = list(rng.getstate())
        if _out_of_time(r, deadline):
            assert deadline is not None
            r.loop.log(f"deadline {deadline.describe()}: training stops at step {s.steps}/{r.total} to evaluate and export in time")
            return False, True
        items = [r.train[i] for i in s.order[s.pos]]
        s.pos += 1
        loss = _step(r, items)
        if (s.steps % r.eval_every == 0 or s.steps == r.total) and _evaluate(r, loss):
            s.stopped_early = True
        if r.checkpoint and r.checkpoint.due():
            r.checkpoint.save(s, lora_state(r.loop.model), r.loop.opt, r.sched)
    return s.stopped_early, False


def train_lora(model: Any, train: list[Encoded], val: list[Encoded], settings: TrainerSettings, pad_id: int,
               log: Callable[[str], None] = print, before_micro: MicroHook | None = None,
               max_steps: int | None = None, world: World | None = None, precision: Precision | None = None,
               before_eval: MicroHook | None = None, checkpoint: Checkpointer | None = None,
               deadline: Deadline | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters of `model`; on return it holds the best weights seen on validation.
    Under torchrun every rank calls it with the same data (`world`: this rank's share of each step).
    With `checkpoint` it resumes from a saved state of the same run and saves one periodically; with
    `deadline` it stops in time to evaluate and export before it."""
    import torch

    if not train:
        raise TrainingError("There are no training examples left after filtering.")
    loop = _new_loop(model, settings, pad_id, log, before_micro, world, precision)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs if max_steps is None else min(max_steps, steps_per_epoch * settings.epochs)
    dp = attach(loop, len(train), total_steps)
    warmup = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        loop.opt, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    r = _Run(loop, sched, LoopState(), _Progress(settings.batch_size), train, val, total_steps, max(1, steps_per_epoch // 2),
             before_eval, checkpoint)
    saved = resume(checkpoint, model, loop.opt, sched, loop.world, total_steps) if checkpoint else None
    r.s = saved or r.s
    resumed_at = saved.steps if saved else None
    rng = random.Random(settings.seed)
    if r.s.rng:
        rng.setstate(tuple_state(r.s.rng))
    t0 = time.perf_counter()
    model.train()
    try:
        stopped, at_deadline = _loop(r, [len(e.input_ids) for e in train], rng, deadline)
    finally:
        if loop.dp:
            loop.dp.close()
    evaluated = bool(r.s.history) and r.s.history[-1]["step"] == r.s.steps
    if at_deadline and r.p.step_s and not evaluated:
        _evaluate(r, r.p.last_loss)  # the weights it stopped with are a candidate too
    if checkpoint and r.s.steps:
        checkpoint.save(r.s, lora_state(model), loop.opt, sched)  # a run killed while it evaluates or exports resumes here
    load_weights(model, r.s.best_state)
    model.eval()
    return TrainResult(r.s.best, r.s.steps, round(r.s.steps / steps_per_epoch, 3), stopped, r.p.micro,
                       math.ceil(settings.batch_size / r.p.micro), r.p.ooms, r.s.tokens, time.perf_counter() - t0, r.s.history,
                       r.p.regrown, total_steps, at_deadline, resumed_at, spent(dp, r.s.steps) if dp else None)
