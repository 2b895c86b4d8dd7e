"""GGUF -> safetensors at bundle build time: a real build converts SmolLM2, encrypts every file of the
variant, leaves no plaintext behind, and what a site decrypts loads in transformers and answers."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from appliance.errors import SpecError
from installer.bundle import keywrap
from installer.toolchain.convert import convert_gguf
from tests.spec_files import one_model_spec, write_spec

REPO = Path(__file__).resolve().parent.parent

def conversion_spec(gguf: Path, **bf16: object) -> dict:
    """The GGUF for llama.cpp and the same model converted for transformers, with a GPU tier for it."""
    return one_model_spec(gguf, name="conv", model_id="q4", version="1", context_length=8192,
                          models=[{"id": "bf16", "backend": "transformers", "format": "safetensors", "context_length": 8192,
                                   **bf16, "convert_from": gguf}],
                          tiers=[{"name": "gpu", "model": "bf16", "dtype": "bfloat16",
                                  "needs": {"gpu_count": 1, "gpu_memory_mib": 8192, "compute_capability": "8.0"}},
                                 {"name": "cpu", "model": "q4"}])


@pytest.mark.slow
def test_build_converts_encrypts_and_the_site_can_load_it(smollm2_gguf: Path, tmp_path: Path) -> None:
    from installer.bundle.keys import load_trusted_keys
    from installer.bundle.reader import decrypt_model_file, verify_bundle
    from installer.bundle.trust import Policy
    from installer.toolchain.build import build_bundle
    from installer.toolchain.keygen import keygen
    from installer.toolchain.spec import load_spec

    keygen(tmp_path / "keys")
    spec = tmp_path / "conv.toml"
    write_spec(spec, conversion_spec(smollm2_gguf))
    build_bundle(load_spec(spec), tmp_path / "b", tmp_path / "keys/signing.key", model_key_path=tmp_path / "keys/model.key")

    # verify_bundle fails on any unlisted file, so no plaintext scratch is left in the bundle.
    m, _ = verify_bundle(tmp_path / "b", load_trusted_keys([tmp_path / "keys/signing.pub"]), Policy(now=datetime.now(timezone.utc)))
    bf16 = next(x for x in m.models if x.id == "bf16")
    names = sorted(f.name for f in bf16.files)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(names)
    assert all(f.path == f"models/bf16/{f.name}.enc" for f in bf16.files)
    assert not list((tmp_path / "b").rglob("*.safetensors")) and not (tmp_path / "b" / "convert").exists()
    assert [t["name"] for t in m.tiers] == ["gpu", "cpu"]

    kek = keywrap.read_key_file(tmp_path / "keys/model.key")
    site = tmp_path / "site"
    for mf in bf16.files:
        decrypt_model_file(tmp_path / "b", m, mf, keywrap.unwrap_key(kek, mf.wrapped_key, f"{m.name}:{mf.path}"), site / mf.name)

    from safetensors import safe_open

    with safe_open(str(site / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert "model.embed_tokens.weight" in keys and len(keys) > 200
        assert str(f.get_tensor("model.embed_tokens.weight").dtype) == "torch.bfloat16"
    assert json.loads((site / "config.json").read_text())["num_hidden_layers"] == 30

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(site))
    model = AutoModelForCausalLM.from_pretrained(str(site), dtype=torch.float32)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_conversion_errors_are_spec_errors(tmp_path: Path, smollm2_gguf: Path) -> None:
    with pytest.raises(SpecError, match="dtype 'int4'"):
        convert_gguf(smollm2_gguf, tmp_path / "o", dtype="int4")
    with pytest.raises(SpecError, match="does not exist"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "o")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SpecError, match="could not convert junk.gguf"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "o")


def test_spec_refuses_a_bad_conversion_entry(tmp_path: Path, smollm2_gguf: Path) -> None:
    from installer.toolchain.spec import load_spec

    spec = tmp_path / "s.toml"
    write_spec(spec, conversion_spec(smollm2_gguf, convert_dtype="int8"))
    with pytest.raises(SpecError, match="convert_dtype of bfloat16, float16 or float32"):
        load_spec(spec)
