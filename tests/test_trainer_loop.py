"""The training loop on a tiny random Llama (seconds, not minutes): OOM halving, early stopping, frozen base."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.trainer.data import Example
from appliance.trainer.settings import TrainerSettings
from appliance.trainer.train import IGNORE, Encoded, TrainingError, encode, evaluate_loss, train_lora


def tiny_lora(targets: list[str] | None = None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets or ["q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0))


def pattern(n: int, answer: int, seed: int = 0) -> list[Encoded]:
    """Prompts of random tokens; the 'assistant' answers with a fixed token (the thing to learn)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randint(3, 40) for _ in range(rng.randint(4, 12))]
        ids = prompt + [answer, answer]
        out.append(Encoded(ids, [IGNORE] * len(prompt) + [answer, answer]))
    return out


def settings(**kw) -> TrainerSettings:
    return TrainerSettings(**{"learning_rate": 3e-2, "epochs": 3, "batch_size": 8, "patience": 3, **kw})


def test_learns_and_leaves_the_base_frozen():
    model = tiny_lora()
    train, val = pattern(48, 50), pattern(8, 50, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    v0 = evaluate_loss(model, val, 0)
    r = train_lora(model, train, val, settings(), 0, log=lambda s: None)
    assert r.best_val_loss < 0.9 * v0 and r.steps == 18
    assert r.trained_tokens == 3 * sum(len(e.input_ids) for e in train)  # real tokens only, no padding counted
    changed = {n for n, p in model.named_parameters() if not (p.detach() == before[n]).all()}
    assert changed and all("lora_" in n for n in changed)  # the base did not move
    assert any("lora_B" in n for n in changed)


def test_out_of_memory_halves_the_micro_batch_and_accumulates():
    model = tiny_lora()
    seen = []

    def fail_above_two(n: int) -> None:
        seen.append(n)
        if n > 2:
            raise MemoryError("simulated host allocation failure")

    r = train_lora(model, pattern(16, 50), pattern(4, 50, 1), settings(epochs=1), 0, log=lambda s: None, before_micro=fail_above_two)
    assert r.micro_batch == 2 and r.accumulation == 4 and r.oom_retries == 2 and r.steps == 2
    assert seen[:3] == [8, 4, 2] and set(seen[3:]) == {2}


def test_out_of_memory_below_the_floor_gives_up_cleanly():
    def always(n: int) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrainingError, match="even with a micro-batch of 1"):
        train_lora(tiny_lora(), pattern(8, 50), pattern(2, 50, 1), settings(), 0, log=lambda s: None, before_micro=always)
    with pytest.raises(TrainingError, match="micro-batch of 4"):
        train_lora(tiny_lora(), pattern(8, 50), pattern(2, 50, 1), settings(min_batch_size=4), 0, log=lambda s: None,
                   before_micro=always)


def test_other_errors_are_not_mistaken_for_out_of_memory():
    def broken(n: int) -> None:
        raise ValueError("bug")

    with pytest.raises(ValueError):
        train_lora(tiny_lora(), pattern(8, 50), pattern(2, 50, 1), settings(), 0, log=lambda s: None, before_micro=broken)


def test_early_stopping_keeps_the_best_weights():
    model = tiny_lora()
    # Validation wants the opposite answer: the better training gets, the worse validation becomes.
    train, val = pattern(64, 50), pattern(8, 51, seed=1)
    r = train_lora(model, train, val, settings(epochs=20, patience=3), 0, log=lambda s: None)
    assert r.stopped_early and r.steps < 20 * 8
    assert r.best_val_loss == min(h["val_loss"] for h in r.history)
    assert evaluate_loss(model, val, 0) == pytest.approx(r.best_val_loss, rel=1e-4)
    # So the run's evaluation takes the candidate's validation loss from training instead of a second pass.
    from appliance.trainer.modeling import evaluate_all

    given, measured = evaluate_all(model, None, val, [], 0, candidate_val=r.best_val_loss), evaluate_all(model, None, val, [], 0)
    assert given.candidate == r.best_val_loss and measured.candidate == pytest.approx(given.candidate, rel=1e-4)
    assert given.base == measured.base != pytest.approx(given.candidate, rel=1e-2)


def test_labels_cover_only_assistant_turns(trainer_base_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trainer_base_dir)
    ex = Example((("system", "Be brief."), ("user", "Which port?"), ("assistant", "Port 8088."),
                  ("user", "And the host?"), ("assistant", "127.0.0.1 only.")), "t")
    e = encode(tok, ex, 512)
    learned = tok.decode([t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE])
    assert learned.replace("\n", "") == "Port 8088.<|im_end|>127.0.0.1 only.<|im_end|>"
    assert encode(tok, ex, 8) is None  # cut before any answer: nothing to learn

