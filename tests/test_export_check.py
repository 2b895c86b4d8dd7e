"""The GGUF LoRA export against llama.cpp itself: the Q/K row order follows llama.cpp's converter per
architecture (tiny random Qwen2 and Llama models, converted by the converter of the pinned llama.cpp),
and the export check tells a right export from a wrong one, also on SmolLM2's Q4_1 GGUF."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from filelock import FileLock

from appliance.trainer import export
from appliance.trainer.export_check import NORM_RATIO, PROBES, ExportCheck, Logits, check_export, compare

REPO = Path(__file__).resolve().parent.parent

# The tiny models borrow SmolLM2's tokenizer as transformers rebuilds it from the GGUF. The converter
# recognises tokenizers by a hash of their output and does not know this rebuild, so it is told the
# pre-tokenizer by name; only the vocabulary's metadata depends on it, never a tensor.
CONVERT = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import convert_hf_to_gguf
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
convert_hf_to_gguf.main()
"""


@pytest.fixture(scope="session")
def hf_to_gguf() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/, from the pinned sdist the project's
    llama-cpp-python wheel is built from (kept in the wheel cache, fetched there hash-checked if missing)."""
    from installer.toolchain import llama_wheel as lw

    out = REPO / "build" / "test-models" / f"llama.cpp-convert-{lw.VERSION}"
    if (out / "convert_hf_to_gguf.py").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # once, whoever asks first (a test run beside another)
        if (out / "convert_hf_to_gguf.py").is_file():
            return out
        sdist = lw.default_cache() / "sdist" / lw.SDIST
        if not sdist.is_file() or lw.sha256_file(sdist) != lw.SDIST_SHA256:
            sdist.parent.mkdir(parents=True, exist_ok=True)
            try:
                lw.fetch_sdist(sdist.parent)
            except (subprocess.CalledProcessError, lw.BuildError) as e:
                pytest.fail(f"The llama-cpp-python sdist ({lw.SDIST}) is needed for its model converter and could not be fetched: {e}; "
                            f"put it at {sdist}.")
        top = f"{lw.SDIST.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdist) as tf:
            keep = [m for m in tf.getmembers() if m.name.startswith(top) and m.isfile()
                    and (m.name == top + "convert_hf_to_gguf.py" or m.name.startswith((top + "conversion/", top + "gguf-py/")))]
            for m in keep:
                m.name = m.name.removeprefix(top)
            tf.extractall(tmp, members=keep, filter="data")
        tmp.rename(out)
    return out


def _tiny(arch: str, tokenizer_dir: Path, converter: Path, work: Path) -> dict[str, Any]:
    """A random 2-layer model of `arch` (grouped KV heads), saved as safetensors, converted to an F32 GGUF by
    llama.cpp's converter, and dequantized back by the trainer's own loader (as a llama.cpp tier's trainer does)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from appliance.trainer.base_model import dequantize_gguf

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              tie_word_embeddings=True)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    model = model_cls(config_cls(**kw))
    model.save_pretrained(work / "hf", safe_serialization=True)
    tok.save_pretrained(work / "hf")
    gguf_file = work / "model.gguf"
    subprocess.run([sys.executable, "-c", CONVERT, str(converter), str(work / "hf"), "--outtype", "f32", "--outfile", str(gguf_file)],
                   check=True, capture_output=True)
    dequantize_gguf(gguf_file, work / "base")
    return {"gguf": gguf_file, "hf": work / "hf", "base": work / "base", "n_head": 4, "n_kv": 2}


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, hf_to_gguf: Path,
         smollm2_safetensors: Path) -> dict[str, Any]:
    return {"arch": request.param} | _tiny(request.param, smollm2_safetensors, hf_to_gguf, tmp_path_factory.mktemp(request.param))


def _random_lora(base_dir: Path, targets: list[str], b_scale: float = 1.0) -> tuple[Any, Any]:
    """A PEFT LoRA with random A and B (B scaled by `b_scale`), and the base's tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    return model, AutoTokenizer.from_pretrained(base_dir)


def _export(model: Any, base_dir: Path, gguf_file: Path, out: Path) -> Path:
    export.save_peft(model, out / "peft", "test")
    config = json.loads((base_dir / "config.json").read_text())
    return export.write_gguf_lora(out / "peft", out / "adapter.gguf", config, export.gguf_architecture(gguf_file))


def _line(name: str, check: ExportCheck) -> str:
    return f"{name}: agree={check.agree} " + " ".join(
        f"{p.part}:gain={p.gain:.0f}/corr={p.correlation:.3f}/size={p.norm_ratio:.2f}/top1={p.top1_agreement:.2f}" for p in check.probes)


def test_the_converter_permutes_qk_rows_exactly_for_the_architectures_the_exporter_permutes(tiny: dict[str, Any]) -> None:
    import gguf
    from safetensors.numpy import load_file

    assert export.gguf_architecture(tiny["gguf"]) == tiny["arch"]
    hf = load_file(tiny["hf"] / "model.safetensors")
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tiny["gguf"]).tensors}
    q_hf, k_hf = hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"]
    q, k = tensors["blk.0.attn_q.weight"], tensors["blk.0.attn_k.weight"]
    permuted = np.array_equal(q, export.rope_permute(q_hf, tiny["n_head"])) and np.array_equal(k, export.rope_permute(k_hf, tiny["n_kv"]))
    as_is = np.array_equal(q, q_hf) and np.array_equal(k, k_hf)
    assert permuted != as_is  # the random rows tell the two orders apart
    assert permuted == (tiny["arch"] in export.QK_PERMUTED) == (tiny["arch"] == "llama")


def test_the_exporters_rule_is_the_inverse_of_what_transformers_gguf_loader_undoes() -> None:
    """The trainer's base weights come from transformers' GGUF loader: B must get back exactly the permutation it removed."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor

    assert {a for a, p in TENSOR_PROCESSORS.items() if issubclass(p, LlamaTensorProcessor)} == set(export.QK_PERMUTED)


def test_export_check_passes_the_converters_row_order_and_fails_the_other(tiny: dict[str, Any], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    arch = tiny["arch"]
    model, tok = _random_lora(tiny["base"], ["q_proj", "k_proj", "v_proj"])
    right = check_export(model, tok, tiny["gguf"], _export(model, tiny["base"], tiny["gguf"], tmp_path / "right"))
    monkeypatch.setattr(export, "QK_PERMUTED", export.QK_PERMUTED ^ {arch})  # the row order the converter did not use
    wrong = check_export(model, tok, tiny["gguf"], _export(model, tiny["base"], tiny["gguf"], tmp_path / "wrong"))
    print(f"{arch}\n{_line('converter order', right)}\n{_line('other order', wrong)}")
    assert right.agree, right.reason
    assert not wrong.agree
    assert any(f"on the probe {p!r}" in wrong.reason for p in PROBES), wrong.reason


def _probe_logits(effect: np.ndarray, rng: np.random.Generator) -> Logits:
    base = rng.normal(size=effect.shape)
    return Logits(base + effect, base)


def test_compare_tells_agreement_from_zeroed_misscaled_and_unrelated_effects() -> None:
    rng = np.random.default_rng(0)
    effects = [rng.normal(size=(12, 500)) for _ in PROBES]
    peft = [_probe_logits(e, rng) for e in effects]
    same = compare(list(PROBES), peft, [_probe_logits(e + 0.05 * rng.normal(size=e.shape), rng) for e in effects])
    assert same.agree and "4 probes" in same.reason and same.to_json()["agree"] is True
    zeroed = compare(list(PROBES), peft, [_probe_logits(e * 0, rng) for e in effects])
    assert not zeroed.agree and repr(PROBES[0]) in zeroed.reason
    doubled = compare(list(PROBES), peft, [_probe_logits(e * 2, rng) for e in effects])
    assert not doubled.agree and f"between {NORM_RATIO[0]} and {NORM_RATIO[1]}" in doubled.reason
    unrelated = compare(list(PROBES), peft, [_probe_logits(rng.normal(size=e.shape), rng) for e in effects])
    assert not unrelated.agree and "correlates" in unrelated.reason
    one_bad = compare(list(PROBES), peft, [_probe_logits(e if i != 2 else -e, rng) for i, e in enumerate(effects)])
    assert not one_bad.agree and repr(PROBES[2]) in one_bad.reason
    nothing = [_probe_logits(np.zeros((12, 500)), rng) for _ in PROBES]
    assert compare(list(PROBES), nothing, nothing).agree  # an adapter that changes nothing, exported as such


@pytest.mark.slow
def test_export_check_on_smollm2_q4_1_with_a_weak_adapter(smollm2_gguf: Path, smollm2_safetensors: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The served Q4_1 model and a lightly trained-sized adapter (random B at 5%): llama.cpp's rounding noise is
    then larger than the adapter's effect, which the check's gain lifts above it."""
    model, tok = _random_lora(smollm2_safetensors, ["q_proj", "v_proj"], b_scale=0.05)
    right = check_export(model, tok, smollm2_gguf, _export(model, smollm2_safetensors, smollm2_gguf, tmp_path / "right"))
    monkeypatch.setattr(export, "QK_PERMUTED", frozenset())
    wrong = check_export(model, tok, smollm2_gguf, _export(model, smollm2_safetensors, smollm2_gguf, tmp_path / "wrong"))
    print(f"SmolLM2 Q4_1\n{_line('permuted', right)}\n{_line('not permuted', wrong)}")
    assert right.agree, right.reason
    assert all(p.gain > 1.0 for p in right.probes) and {p.part for p in right.probes} == {"all", "q_k"}
    assert not wrong.agree


@pytest.mark.slow
@pytest.mark.parametrize("row_order", ["right", "wrong"])
def test_a_run_registers_its_adapter_and_promotes_it_only_when_the_gguf_agrees(trainer_root: Any, row_order: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from appliance import adapters as reg
    from appliance.trainer import run
    from tests.trainer_fixtures import demo_lines, quick_settings

    trainer_root.add_inbox("manual.jsonl", demo_lines("train.jsonl")[:60])
    if row_order == "wrong":
        monkeypatch.setattr(export, "QK_PERMUTED", frozenset())  # SmolLM2 is llama: q_proj/k_proj's B rows in the wrong order
    gate = run.decide  # whatever the outcome gate makes of two steps, here it says promote: the export check must decide
    monkeypatch.setattr(run, "decide", lambda *a, **k: replace(gate(*a, **k), promote=True))
    settings = quick_settings(min_new_examples=5, eval_max_items=4, eval_max_tokens=8)  # the gate's answers decide nothing here
    report = run.run_training(trainer_root.layout, run.RunOptions(now=True, settings=settings, max_steps=2, log=lambda s: None))
    check = report["stages"]["export"]["check"]
    print(row_order, check)
    assert report["stages"]["gate"]["promote"] is True
    assert {p["part"] for p in check["probes"]} == {"all", "q_k"} and len(check["probes"]) == 2 * len(PROBES)
    assert [a.id for a in reg.list_adapters(trainer_root.layout)] == [report["adapter"]]
    active = reg.active_adapter(trainer_root.layout)
    if row_order == "right":
        assert check["agree"] is True, check["reason"]
        assert report["status"] == "promoted" and active is not None and active.id == report["adapter"]
    else:
        assert check["agree"] is False
        assert report["status"] == "kept" and report["reason"] == check["reason"] and active is None
        assert any(f"on the probe {p!r}" in report["reason"] for p in PROBES)


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def test_the_architecture_is_read_past_arrays_and_strings_and_a_damaged_header_is_named(tmp_path: Path) -> None:
    """The header walk skips every kind of value before general.architecture; gguf.GGUFReader reads the same file alike."""
    import gguf

    kvs = [_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + b"".join(_s(t) for t in ("<s>", "é", ""))),
           _kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2) + struct.pack("<2f", 0.5, -1.0)),
           _kv("nested", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 2) + struct.pack("<2I", 1, 2)),
           _kv("some.flag", 7, b"\x01"), _kv("some.u64", 10, struct.pack("<Q", 7)), _kv("general.name", 8, _s("x")),
           _kv("general.architecture", 8, _s("qwen2"))]
    whole = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    f = tmp_path / "m.gguf"
    f.write_bytes(whole + b"\0" * 32)  # the alignment padding before the (absent) tensor data
    assert export.gguf_architecture(f) == "qwen2"
    field = gguf.GGUFReader(f).fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "qwen2"
    f.write_bytes(whole[:60])
    with pytest.raises(export.ExportError, match="ends inside its metadata"):
        export.gguf_architecture(f)
    f.write_bytes(b"GGML" + whole[4:])
    with pytest.raises(export.ExportError, match="is not a GGUF file"):
        export.gguf_architecture(f)
