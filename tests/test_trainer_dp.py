"""Differential privacy: DP-SGD on the LoRA weights (per-example clipping, noise), ε and δ in the report and the adapter."""

from __future__ import annotations

import pytest

from appliance import adapters as reg
from appliance.trainer import privacy
from appliance.trainer.settings import TrainerConfigError
from appliance.trainer.train import collate, loss_sum, token_losses, train_lora
from tests.test_trainer_loop import pattern, settings, tiny_lora
from tests.trainer_fixtures import TrainerRoot, demo_lines, quick_settings


def _grads(model) -> list:
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def test_each_examples_gradient_is_clipped_on_its_own():
    import torch

    model = tiny_lora()
    params = [p for p in model.parameters() if p.requires_grad]
    examples = pattern(6, 50)
    one_by_one = []  # each example's own gradient of its mean token loss, by a backward of its own
    for e in examples:
        model.zero_grad()
        s, n = loss_sum(model, collate([e], 0))
        (s / n).backward()
        one_by_one.append(_grads(model))
    norms = torch.stack([torch.cat([g.reshape(-1) for g in gs]).norm() for gs in one_by_one])
    clip = float(norms.median())  # some examples above the bound, some below
    expected = [sum(gs[k] * min(1.0, clip / float(nm)) for gs, nm in zip(one_by_one, norms, strict=True))
                for k in range(len(params))]

    dp = privacy.DPSGD(model, params, privacy.PrivacyPlan(1.0, clip, 1e-3, 0.1, None), noise_seed=0)
    model.zero_grad()
    dp.start_step()
    dp.backward(token_losses(model, collate(examples[:4], 0)), 4)  # two micro-batches, one step
    dp.backward(token_losses(model, collate(examples[4:], 0)), 2)
    dp.load_clipped()
    for got, want in zip(_grads(model), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    assert (norms > clip).any() and (norms < clip).any()
    for e, own in zip(examples, norms, strict=True):  # one example alone: its clipped gradient is within the bound
        model.zero_grad()
        dp.start_step()
        dp.backward(token_losses(model, collate([e], 0)), 1)
        dp.load_clipped()
        got = float(torch.cat([g.reshape(-1) for g in _grads(model)]).norm())
        assert got <= clip * (1 + 1e-4) and got == pytest.approx(min(float(own), clip), rel=1e-4)
    dp.close()


def test_noise_is_the_multiplier_times_the_clip_over_the_batch():
    import torch

    model = tiny_lora()
    params = [p for p in model.parameters() if p.requires_grad]
    dp = privacy.DPSGD(model, params, privacy.PrivacyPlan(2.0, 0.5, 1e-3, 0.1, None), noise_seed=1)
    for p in params:
        p.grad = torch.zeros_like(p)
    dp.add_noise(n_examples=4)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    assert abs(float(flat.std()) - 2.0 * 0.5 / 4) < 0.02  # std σ·C, then the mean over 4 examples
    dp.close()


def test_a_target_epsilon_chooses_the_noise_and_the_accountant_reports_it():
    p = privacy.plan(settings(dp_epsilon=8.0, batch_size=8), n_train=200, planned_steps=75)
    assert p is not None and p.delta == 1 / 200 and p.sample_rate == 8 / 200 and p.noise_multiplier > 0.3
    spent = privacy.spent(p, 75)
    assert 7.5 < spent["epsilon"] <= 8.05 and spent["delta"] == 1 / 200
    assert privacy.spent(p, 30)["epsilon"] < spent["epsilon"]  # a run stopped early spent less
    assert privacy.plan(settings(), 200, 75) is None
    fixed = privacy.plan(settings(dp_noise_multiplier=1.1, dp_delta=1e-5), 200, 75)
    assert fixed is not None and fixed.noise_multiplier == 1.1 and fixed.delta == 1e-5
    with pytest.raises(TrainerConfigError, match="both dp_epsilon and dp_noise_multiplier"):
        privacy.plan(settings(dp_epsilon=8.0, dp_noise_multiplier=1.0), 200, 75)
    with pytest.raises(TrainerConfigError, match="gradient_checkpointing"):
        privacy.plan(settings(dp_epsilon=8.0, gradient_checkpointing=True), 200, 75)


def test_a_private_loop_reports_its_epsilon_and_moves_only_lora_weights():
    model = tiny_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = train_lora(model, pattern(32, 50), pattern(8, 50, 1), settings(epochs=1, dp_noise_multiplier=1.0), 0, log=lambda _m: None)
    assert r.privacy is not None and r.privacy["steps"] == r.steps == 4 and r.privacy["epsilon"] > 0
    changed = {n for n, p in model.named_parameters() if not (p.detach() == before[n]).all()}
    assert changed and all("lora_" in n for n in changed)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_a_private_run_puts_epsilon_and_delta_in_the_report_and_the_adapter(trainer_root: TrainerRoot):
    from appliance.trainer.run import RunOptions, run_training

    trainer_root.add_inbox("manual.jsonl", demo_lines("train.jsonl")[:24])
    report = run_training(trainer_root.layout, RunOptions(now=True, settings=quick_settings(dp_epsilon=8.0, deadline=""), max_steps=2,
                                                          log=lambda _m: None))
    p = report["privacy"]
    n_train = report["stages"]["train"]["privacy"]["delta"] ** -1
    assert p["steps"] == 2 and 0 < p["epsilon"] and p["target_epsilon"] == 8.0 and round(n_train) == report["stages"]["split"]["train"]
    assert "differentially private (ε = " in report["reason"] and "gate" in report["stages"]
    meta = reg.list_adapters(trainer_root.layout)[0].metadata
    assert meta["privacy"]["epsilon"] == p["epsilon"] and meta["privacy"]["delta"] == p["delta"]
