"""Before promotion: does the exported GGUF adapter do in llama.cpp what the PEFT adapter does in torch?

The two engines do not run the same base weights bit for bit (llama.cpp quantizes activations for
a quantized GGUF, and a GPU tier's trainer runs bf16), so the logits themselves are compared only as
a diagnostic. What must agree is the adapter's *effect*: adapter logits minus base logits, at the
same positions of the same tokens, in each engine. Each probe prompt (a short chat, rendered with
the model's chat template) is continued greedily by the PEFT model; prompt and continuation are then
teacher-forced through both engines with and without the adapter. A correct export gives effects
that correlate almost perfectly with about the same size; a wrong Q/K permutation, transposed,
zeroed or misscaled matrices do not (tests/test_export_check.py, figures in bench/RESULTS.md).

A weakly trained adapter changes the logits by less than llama.cpp's own rounding noise (the 8-bit
activations of a Q4 matmul round differently once the adapter moves them), so its effect would not
correlate even when exported right. Both engines therefore apply the adapter with the same gain,
chosen so that PEFT's effect reaches EFFECT_TARGET: an export is right or wrong at any gain, and at
that size the noise no longer matters.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.trainer.export import ExportError

PROBES = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How do I restart a service on Linux?",
    "Name three colours.",
)
CONTINUATION = 12  # greedy tokens of the PEFT model after each prompt
MIN_CORRELATION = 0.95  # Pearson correlation of the two effects, over positions x vocabulary, each probe
NORM_RATIO = (0.7, 1.4)  # size of llama.cpp's effect over the size of PEFT's
NO_EFFECT = 1e-4  # largest logit change below which an adapter changes nothing
EFFECT_TARGET = 8.0  # RMS logit change the adapter is amplified to (both engines alike)
MAX_GAIN = 256.0


@dataclass(frozen=True)
class ProbeResult:
    prompt: str
    correlation: float  # of the two effects (adapter minus base logits)
    norm_ratio: float  # RMS of llama.cpp's effect / RMS of PEFT's
    peft_effect: float  # RMS of PEFT's effect, in logits
    top1_agreement: float  # share of positions where both engines' adapter picks the same next token


@dataclass(frozen=True)
class ExportCheck:
    agree: bool
    reason: str
    probes: list[ProbeResult]
    gain: float = 1.0  # the adapter's scale in both engines

    def to_json(self) -> dict[str, Any]:
        return {"agree": self.agree, "reason": self.reason, "gain": round(self.gain, 3),
                "probes": [{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(p).items()} for p in self.probes]}


@dataclass(frozen=True)
class Logits:
    """One probe's next-token logits at the compared positions, with and without the adapter."""

    adapter: np.ndarray  # positions x vocabulary
    base: np.ndarray


def compare(prompts: list[str], peft: list[Logits], gguf: list[Logits]) -> ExportCheck:
    """The verdict from both engines' logits; the reason names the first probe that disagrees."""
    results, failures = [], []
    for prompt, t, c in zip(prompts, peft, gguf, strict=True):
        n = min(t.adapter.shape[1], c.adapter.shape[1])  # a vocabulary padded in one engine only
        dt = (t.adapter[:, :n] - t.base[:, :n]).astype(np.float64)
        dc = (c.adapter[:, :n] - c.base[:, :n]).astype(np.float64)
        rms_t, rms_c = float(np.sqrt(np.mean(dt**2))), float(np.sqrt(np.mean(dc**2)))
        none_t, none_c = np.abs(dt).max() < NO_EFFECT, np.abs(dc).max() < NO_EFFECT
        if none_t or none_c:
            corr, ratio = (1.0, 1.0) if none_t and none_c else (0.0, 0.0 if none_c else float("inf"))
        else:
            corr = float(np.corrcoef(dt.ravel(), dc.ravel())[0, 1])
            ratio = rms_c / rms_t
        top1 = float(np.mean(t.adapter[:, :n].argmax(-1) == c.adapter[:, :n].argmax(-1)))
        results.append(ProbeResult(prompt, corr, ratio, rms_t, top1))
        if corr < MIN_CORRELATION:
            failures.append(f"on the probe {prompt!r} the GGUF adapter's effect correlates {corr:.2f} with the PEFT adapter's "
                            f"(at least {MIN_CORRELATION} needed)")
        elif not NORM_RATIO[0] <= ratio <= NORM_RATIO[1]:
            failures.append(f"on the probe {prompt!r} the GGUF adapter's effect is {ratio:.2f} times the size of the PEFT "
                            f"adapter's (between {NORM_RATIO[0]} and {NORM_RATIO[1]} needed)")
    if failures:
        return ExportCheck(False, f"The exported GGUF adapter disagrees with the PEFT adapter: {failures[0]}.", results)
    worst = min(r.correlation for r in results)
    return ExportCheck(True, f"The GGUF adapter agrees with the PEFT adapter on {len(results)} probes "
                             f"(effect correlation at least {worst:.3f}).", results)


def probe_tokens(tokenizer: Any, model: Any, prompts: tuple[str, ...] = PROBES, continuation: int = CONTINUATION) -> list[tuple[list[int], int]]:
    """(token ids, first compared position) per probe: the rendered chat and the PEFT model's greedy continuation."""
    import torch

    out = []
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=continuation,
                                 min_new_tokens=continuation, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append((gen[0].tolist(), ids.shape[1] - 1))
    return out


def peft_logits(model: Any, probes: list[tuple[list[int], int]], gain: float = 1.0) -> list[Logits]:
    """The PEFT model's logits at each probe's compared positions, with the adapter (scaled by `gain`) and without."""
    import torch
    from peft.tuners.lora import LoraLayer

    device = next(model.parameters()).device
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    out = []
    try:
        for m in layers:
            m.scaling.update({k: v * gain for k, v in m.scaling.items()})
        with torch.no_grad():
            for ids, start in probes:
                x = torch.tensor([ids], device=device)
                on = model(input_ids=x).logits[0, start:-1].float().cpu().numpy()
                with model.disable_adapter():
                    off = model(input_ids=x).logits[0, start:-1].float().cpu().numpy()
                out.append(Logits(on, off))
    finally:
        for m, scaling in zip(layers, saved, strict=True):
            m.scaling.clear()
            m.scaling.update(scaling)
    return out


def gguf_logits(base_gguf: Path, adapter_gguf: Path, probes: list[tuple[list[int], int]], threads: int,
                gain: float = 1.0) -> list[Logits]:
    """llama.cpp's logits for the same tokens and positions, with the GGUF adapter (scaled by `gain`) and without.
    ExportError when llama.cpp cannot load the base or the adapter."""
    from appliance.engines import cpu_backend

    cpu_backend.load()  # before llama.cpp initialises its backends, as the engine does
    import llama_cpp as L
    from llama_cpp import _logger

    _logger.set_verbose(False)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(base_gguf).encode(), mp)
    if not model:
        raise ExportError(f"llama.cpp could not load the base model {base_gguf} to check the exported adapter.")
    n_tokens = max(len(ids) for ids, _ in probes)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(64, n_tokens)
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(cp.n_batch, 0, 1)
    try:
        lora = L.llama_adapter_lora_init(model, str(adapter_gguf).encode())
        if not ctx or not lora:
            raise ExportError(f"llama.cpp could not load the exported adapter {adapter_gguf} onto {base_gguf.name}.")
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        out = []
        for ids, start in probes:
            both = []
            for on in (True, False):
                if on:
                    L.llama_set_adapters_lora(ctx, (L.llama_adapter_lora_p_ctypes * 1)(lora), 1, (ctypes.c_float * 1)(gain))
                else:
                    L.llama_set_adapters_lora(ctx, None, 0, None)
                both.append(_decode(L, ctx, batch, ids, start, n_vocab))
            out.append(Logits(*both))
        return out
    finally:
        L.llama_batch_free(batch)
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)  # frees the adapter with it


def _decode(L: Any, ctx: Any, batch: Any, ids: list[int], start: int, n_vocab: int) -> np.ndarray:
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    for i, t in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, start <= i < len(ids) - 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = len(ids)
    if L.llama_decode(ctx, batch) != 0:
        raise ExportError("llama.cpp failed to decode a probe while checking the exported adapter.")
    rows = [np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy() for i in range(start, len(ids) - 1)]
    return np.stack(rows)


def check_export(model: Any, tokenizer: Any, base_gguf: Path, adapter_gguf: Path, threads: int = 1) -> ExportCheck:
    """Compare the PEFT adapter (`model`, a PeftModel) with its GGUF export on the fixed probes."""
    model.eval()
    probes = probe_tokens(tokenizer, model)
    unit = peft_logits(model, probes)
    rms = float(np.sqrt(np.mean(np.concatenate([(x.adapter - x.base).ravel() for x in unit]) ** 2)))
    gain = min(MAX_GAIN, max(1.0, EFFECT_TARGET / rms)) if rms > 0 else 1.0
    peft = unit if gain == 1.0 else peft_logits(model, probes, gain)
    try:
        gguf = gguf_logits(base_gguf, adapter_gguf, probes, threads, gain)
    except ExportError as e:
        return ExportCheck(False, e.message, [], gain)
    check = compare(list(PROBES), peft, gguf)
    return ExportCheck(check.agree, check.reason, check.probes, gain)
