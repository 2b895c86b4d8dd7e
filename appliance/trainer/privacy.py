"""Differential privacy of a run: DP-SGD on the LoRA weights, per-example clipping and Gaussian noise (Opacus).

Opacus's GradSampleModule hooks the nn.Linear layers inside peft's LoRA wrappers (lora_A, lora_B; the
frozen base layers need no per-example gradients), so each micro-batch's backward leaves every
example's gradient beside the summed one. Each example's gradient is clipped to dp_max_grad_norm
over all LoRA weights, the clipped ones are summed (over micro-batches and, under torchrun, ranks),
Gaussian noise of std noise_multiplier × dp_max_grad_norm is added once, and the sum is divided by
the step's number of examples. Opacus's RDP accountant turns (noise, sample rate, steps) into ε at δ.

What the (ε, δ) covers: this run's training examples. The accountant assumes each step samples its
batch at rate batch_size / n; the loop draws uniformly shuffled fixed-size batches (not length-grouped
under DP, so a batch does not depend on what its examples say), the usual approximation. Validation
and held-out data (early stopping, the gate) and an earlier adapter the run continues from are not
covered by this run's ε.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from typing import Any

from appliance.trainer.settings import TrainerConfigError, TrainerSettings


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    sample_rate: float
    target_epsilon: float | None  # None: the noise was set, ε follows from it


def plan(settings: TrainerSettings, n_train: int, planned_steps: int) -> PrivacyPlan | None:
    """The noise for the run (None: differential privacy is off)."""
    if not settings.dp_epsilon and not settings.dp_noise_multiplier:
        return None
    if settings.dp_epsilon and settings.dp_noise_multiplier:
        raise TrainerConfigError("[trainer] sets both dp_epsilon and dp_noise_multiplier; they are two ways to choose the same noise.",
                                 "Keep one of them (dp_epsilon for a privacy target, dp_noise_multiplier for fixed noise).")
    if settings.gradient_checkpointing:
        raise TrainerConfigError("[trainer] differential privacy cannot run with gradient_checkpointing: the recomputed forward "
                                 "pass would record every example's activations twice.",
                                 "Set gradient_checkpointing = false, or turn dp_epsilon / dp_noise_multiplier off.")
    delta = settings.dp_delta or 1.0 / max(n_train, 1)
    rate = min(1.0, settings.batch_size / max(n_train, 1))
    if settings.dp_noise_multiplier:
        return PrivacyPlan(settings.dp_noise_multiplier, settings.dp_max_grad_norm, delta, rate, None)
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = get_noise_multiplier(target_epsilon=settings.dp_epsilon, target_delta=delta, sample_rate=rate,
                                     steps=max(planned_steps, 1), accountant="rdp")
    except ValueError as e:
        raise TrainerConfigError(f"[trainer] dp_epsilon = {settings.dp_epsilon} cannot be reached in {planned_steps} steps at "
                                 f"δ = {delta:.3g}: {e}.", "Raise dp_epsilon, or train fewer epochs.") from None
    return PrivacyPlan(float(sigma), settings.dp_max_grad_norm, delta, rate, settings.dp_epsilon)


def spent(p: PrivacyPlan, steps: int) -> dict[str, Any]:
    """ε at δ for `steps` noisy steps (the report's and the adapter's privacy record)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(p.noise_multiplier, p.sample_rate, steps)] if steps else []
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only not the tightest
        warnings.simplefilter("ignore", UserWarning)
        eps = float(acc.get_epsilon(p.delta)) if steps else 0.0
    return {"mechanism": "DP-SGD on the LoRA weights (Opacus, RDP accountant)", "epsilon": round(eps, 4), "delta": p.delta,
            "noise_multiplier": round(p.noise_multiplier, 6), "max_grad_norm": p.max_grad_norm,
            "sample_rate": round(p.sample_rate, 6), "steps": steps, "target_epsilon": p.target_epsilon}


def clip_and_sum(params: list[Any], max_norm: float) -> tuple[list[Any], Any]:
    """Each example's gradient (params' `grad_sample`, one row per example) clipped to `max_norm` over all
    params, summed over the examples; and each example's norm before clipping."""
    import torch

    samples = [p.grad_sample for p in params]
    norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor, g) for g in samples], norms


def attach(loop: Any, n_train: int, planned_steps: int) -> PrivacyPlan | None:
    """The run's privacy plan, with DP-SGD hooked into the training loop (None: not a private run)."""
    p = plan(loop.settings, n_train, planned_steps)
    if p is None:
        return None
    if loop.scaler is not None:
        raise TrainerConfigError("Differential privacy does not run in fp16 with a gradient scaler (a GPU without bf16).",
                                 "Turn dp_epsilon / dp_noise_multiplier off for this tier, or train on a GPU with bf16.")
    world = loop.world
    seed = int(world.sum_floats(float(secrets.randbits(52)) if world.main else 0.0)[0]) if world.size > 1 else None
    loop.dp = DPSGD(loop.model, loop.params, p, seed)
    loop.log(f"differential privacy: noise multiplier {p.noise_multiplier:.3f}, per-example clip {p.max_grad_norm}, "
             f"δ {p.delta:.3g}, sample rate {p.sample_rate:.3g}")
    return p


class DPSGD:
    """Per-example clipping during a step's micro-batches, noise once per step."""

    def __init__(self, model: Any, params: list[Any], p: PrivacyPlan, noise_seed: int | None = None) -> None:
        import torch
        from opacus import GradSampleModule

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.params, self.plan = params, p
        # A secret seed: noise an observer could regenerate would protect nothing. Under torchrun rank 0's
        # seed is passed to every rank (World.sum_floats), so every rank adds the same noise to the same sum.
        self.gen = torch.Generator(device=params[0].device)
        self.gen.manual_seed(noise_seed if noise_seed is not None else secrets.randbits(52))
        self.acc: list[Any] | None = None

    def start_step(self) -> None:
        self.acc = None
        self._drop_samples()

    def backward(self, token_losses: tuple[Any, Any], n_rows: int) -> float:
        """Backward of one micro-batch from its per-token losses and their rows; each example's loss is its mean per
        token, so clipping bounds one example's influence however long its answer is. Returns the summed loss."""
        import torch

        losses, rows = token_losses
        counts = torch.bincount(rows, minlength=n_rows).clamp(min=1)
        with warnings.catch_warnings():  # the frozen base's inputs need no grad; Opacus's hooks still see every output
            warnings.simplefilter("ignore", UserWarning)
            (losses / counts[rows]).sum().backward()
        self.after_backward()
        return float(losses.detach().sum())

    def after_backward(self) -> None:
        """Fold one micro-batch's examples in (clipped), then drop the unclipped gradients autograd summed."""
        clipped, _ = clip_and_sum(self.params, self.plan.max_grad_norm)
        self.acc = clipped if self.acc is None else [a + c for a, c in zip(self.acc, clipped, strict=True)]
        self._drop_samples()
        for p in self.params:
            p.grad = None

    def load_clipped(self) -> None:
        """This rank's clipped sum as the params' gradients (to be summed over ranks)."""
        import torch

        for p, a in zip(self.params, self.acc or [torch.zeros_like(q) for q in self.params], strict=True):
            p.grad = a.to(p.dtype)

    def add_noise(self, n_examples: int) -> None:
        """Noise on the summed clipped gradients, then the mean over the step's examples."""
        import torch

        std = self.plan.noise_multiplier * self.plan.max_grad_norm
        for p in self.params:
            noise = torch.normal(0.0, std, size=p.shape, generator=self.gen, device=p.device, dtype=torch.float32)
            p.grad = ((p.grad.float() + noise) / n_examples).to(p.dtype)

    def close(self) -> None:
        self._drop_samples()
        self.gsm.remove_hooks()

    def _drop_samples(self) -> None:
        for p in self.params:
            p.grad_sample = None
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
