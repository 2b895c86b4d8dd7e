"""Before promotion: does the exported GGUF adapter do in llama.cpp what the PEFT adapter does in torch?

The two engines do not run the same base weights bit for bit (llama.cpp quantizes activations for
a quantized GGUF, and a GPU tier's trainer runs bf16), so the logits themselves are compared only as
a diagnostic. What must agree is the adapter's *effect*: adapter logits minus base logits, at the
same positions of the same tokens, in each engine. Each probe prompt (a short chat, rendered with
the model's chat template) is continued greedily by the PEFT model; prompt and continuation are then
teacher-forced through both engines with and without the adapter. A correct export gives effects
that correlate almost perfectly with about the same size; a wrong Q/K permutation, transposed,
zeroed or misscaled matrices do not. Measured (tests/test_export_check.py) on SmolLM2 Q4_1, per probe:
a right export 0.992-0.998, Q/K rows in the wrong order 0.68-0.82 (whole adapter of random q/v matrices)
and -0.30-0.47 (Q/K alone, trained adapter); zeroed 0; B twice as large: size ratio 1.3-2.6.

A weakly trained adapter changes the logits by less than llama.cpp's own rounding noise (the 8-bit
activations of a Q4 matmul round differently once the adapter moves them), so its effect would not
correlate even when exported right. Both engines therefore apply the adapter with the same gain,
chosen so that PEFT's effect reaches EFFECT_TARGET: an export is right or wrong at any gain, and at
that size the noise no longer matters.

The Q/K matrices are also checked alone (the other matrices' scale set to 0 in PEFT; the exported
file's attn_q/attn_k tensors copied into a file of their own for llama.cpp): their row order is
what an architecture-specific permutation gets wrong, and where the MLP and V/O matrices carry most
of the effect, a wrong order hardly moves the whole adapter's correlation (0.977 measured).
"""

from __future__ import annotations

import ctypes
import tempfile
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
QK_MODULES = ("q_proj", "k_proj")
QK_TENSORS = (".attn_q.", ".attn_k.")
PARTS = {"all": "the GGUF adapter's effect", "q_k": "the effect of the GGUF adapter's Q/K matrices alone"}


@dataclass(frozen=True)
class ProbeResult:
    prompt: str
    part: str  # "all": the whole adapter; "q_k": its q_proj/k_proj matrices alone
    gain: float  # the scale both engines applied the adapter (part) with
    correlation: float  # of the two effects (adapter minus base logits)
    norm_ratio: float  # RMS of llama.cpp's effect / RMS of PEFT's
    peft_effect: float  # RMS of PEFT's effect, in logits
    top1_agreement: float  # share of positions where both engines' adapter picks the same next token


@dataclass(frozen=True)
class ExportCheck:
    agree: bool
    reason: str
    probes: list[ProbeResult]

    def to_json(self) -> dict[str, Any]:
        return {"agree": self.agree, "reason": self.reason,
                "probes": [{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(p).items()} for p in self.probes]}


@dataclass(frozen=True)
class Logits:
    """One probe's next-token logits at the compared positions, with and without the adapter."""

    adapter: np.ndarray  # positions x vocabulary
    base: np.ndarray


def compare(prompts: list[str], peft: list[Logits], gguf: list[Logits], part: str = "all", gain: float = 1.0) -> ExportCheck:
    """The verdict from both engines' logits; the reason names the first probe that disagrees."""
    results, failures, what = [], [], PARTS[part]
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
        results.append(ProbeResult(prompt, part, gain, corr, ratio, rms_t, top1))
        if corr < MIN_CORRELATION:
            failures.append(f"on the probe {prompt!r} {what} correlates {corr:.2f} with PEFT's (at least {MIN_CORRELATION} needed)")
        elif not NORM_RATIO[0] <= ratio <= NORM_RATIO[1]:
            failures.append(f"on the probe {prompt!r} {what} is {ratio:.2f} times the size of PEFT's "
                            f"(between {NORM_RATIO[0]} and {NORM_RATIO[1]} needed)")
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


def peft_logits(model: Any, probes: list[tuple[list[int], int]], gain: float = 1.0, base: list[np.ndarray] | None = None,
                only: tuple[str, ...] | None = None) -> list[Logits]:
    """The PEFT model's logits at each probe's compared positions, with the adapter (scaled by `gain`; only the
    modules named `only`, when given) and without (`base`, when already known: it depends on neither)."""
    import torch
    from peft.tuners.lora import LoraLayer

    device = next(model.parameters()).device
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    layers = [m for _, m in named]
    saved = [dict(m.scaling) for m in layers]
    gains = [gain if only is None or n.rsplit(".", 1)[-1] in only else 0.0 for n, _ in named]

    def run(ids: list[int], start: int) -> np.ndarray:
        return model(input_ids=torch.tensor([ids], device=device)).logits[0, start:-1].float().cpu().numpy()  # type: ignore[no-any-return]

    try:
        for m, g in zip(layers, gains, strict=True):
            m.scaling.update({k: v * g for k, v in m.scaling.items()})
        with torch.no_grad():
            on = [run(ids, start) for ids, start in probes]
            if base is None:
                with model.disable_adapter():
                    base = [run(ids, start) for ids, start in probes]
    finally:
        for m, scaling in zip(layers, saved, strict=True):
            m.scaling.clear()
            m.scaling.update(scaling)
    return [Logits(a, b) for a, b in zip(on, base, strict=True)]


def gguf_logits(base_gguf: Path, adapters: list[tuple[Path, float]], probes: list[tuple[list[int], int]],
                threads: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """llama.cpp's logits for the same tokens and positions: the base model's, and with each (GGUF adapter, gain).
    ExportError when llama.cpp cannot load the base or an adapter."""
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
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(64, max(len(ids) for ids, _ in probes))
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(cp.n_batch, 0, 1)
    try:
        if not ctx:
            raise ExportError(f"llama.cpp could not make a context for {base_gguf.name} to check the exported adapter.")
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        base = [_decode(L, ctx, batch, ids, start, n_vocab) for ids, start in probes]
        with_adapter = []
        for path, gain in adapters:
            lora = L.llama_adapter_lora_init(model, str(path).encode())
            if not lora:
                raise ExportError(f"llama.cpp could not load the exported adapter {path} onto {base_gguf.name}.")
            L.llama_set_adapters_lora(ctx, (L.llama_adapter_lora_p_ctypes * 1)(lora), 1, (ctypes.c_float * 1)(gain))
            with_adapter.append([_decode(L, ctx, batch, ids, start, n_vocab) for ids, start in probes])
            L.llama_set_adapters_lora(ctx, None, 0, None)
        return base, with_adapter
    finally:
        L.llama_batch_free(batch)
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)  # frees the adapters with it


def subset_gguf(adapter_gguf: Path, out: Path, tensors: tuple[str, ...] = QK_TENSORS) -> Path | None:
    """A copy of the exported adapter with only the tensors whose names contain one of `tensors` (None: it has none)."""
    import gguf

    reader = gguf.GGUFReader(adapter_gguf)
    keep = [t for t in reader.tensors if any(x in t.name for x in tensors)]
    if not keep:
        return None
    alpha = reader.fields[gguf.Keys.Adapter.LORA_ALPHA]
    arch = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(out, arch=bytes(arch.parts[arch.data[0]]).decode())
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha.parts[alpha.data[0]][0]))
    for t in keep:
        writer.add_tensor(t.name, np.ascontiguousarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


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


def _gain(unit: list[Logits]) -> float:
    rms = float(np.sqrt(np.mean(np.concatenate([(x.adapter - x.base).ravel() for x in unit]) ** 2)))
    return min(MAX_GAIN, max(1.0, EFFECT_TARGET / rms)) if rms > 0 else 1.0


def check_export(model: Any, tokenizer: Any, base_gguf: Path, adapter_gguf: Path, threads: int = 1) -> ExportCheck:
    """Compare the PEFT adapter (`model`, a PeftModel) with its GGUF export on the fixed probes: the whole adapter,
    then its Q/K matrices alone."""
    model.eval()
    probes = probe_tokens(tokenizer, model)
    with tempfile.TemporaryDirectory(dir=adapter_gguf.parent, prefix=".check-") as tmp:
        qk = subset_gguf(adapter_gguf, Path(tmp) / "q_k.gguf")
        parts: list[tuple[str, Path, tuple[str, ...] | None]] = [("all", adapter_gguf, None)]
        if qk is not None:
            parts.append(("q_k", qk, QK_MODULES))
        base: list[np.ndarray] | None = None
        peft, gains = [], []
        for _, _, only in parts:
            unit = peft_logits(model, probes, 1.0, base, only)
            base = [x.base for x in unit]
            gains.append(_gain(unit))
            peft.append(unit if gains[-1] == 1.0 else peft_logits(model, probes, gains[-1], base, only))
        try:
            gbase, gon = gguf_logits(base_gguf, [(path, g) for (_, path, _), g in zip(parts, gains, strict=True)], probes, threads)
        except ExportError as e:
            return ExportCheck(False, e.message, [])
    checks = [compare(list(PROBES), t, [Logits(a, b) for a, b in zip(on, gbase, strict=True)], part, g)
              for (part, _, _), t, on, g in zip(parts, peft, gon, gains, strict=True)]
    results = [r for c in checks for r in c.probes]
    failed = [c for c in checks if not c.agree]
    if failed:
        return ExportCheck(False, failed[0].reason, results)
    return ExportCheck(True, f"The GGUF adapter agrees with the PEFT adapter on {len(PROBES)} probes, whole"
                             f"{' and its Q/K matrices alone' if qk else ''} (effect correlation at least "
                             f"{min(r.correlation for r in results):.3f}).", results)
