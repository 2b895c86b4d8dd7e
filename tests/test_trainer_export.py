"""The exported adapter through both engines: GGUF agrees with PEFT, and it knows the demo domain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance import adapters as reg
from tests.trainer_fixtures import DEMO_DATA, THREADS, DemoRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

SYSTEM = "You are the operations assistant of the appliance, a private LLM for air-gapped sites."
# A fixed continuation, teacher-forced, so the 50 positions compare the same contexts in both engines.
TEXT = ("The configuration is /etc/appliance/appliance.toml and the trainer runs at 03:00 every night; adapters "
        "live in /var/lib/appliance/adapters, the API listens on port 8088 of 127.0.0.1, and keys are made with appliance keys create.")


@pytest.fixture(scope="module")
def engines(demo_run: DemoRun, trainer_base_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    active = reg.active_adapter(demo_run.root.layout)
    assert active is not None and active.gguf_path is not None
    tok = AutoTokenizer.from_pretrained(trainer_base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trainer_base_dir), str(active.peft_dir)).eval()
    return tok, model, active


def _llama(gguf: Path, lora: Path | None, n_ctx: int = 512, threads: int = 1):
    from appliance.engines import cpu_backend

    cpu_backend.load()  # the portable wheel's CPU variants, before llama_cpp initialises its backends
    from llama_cpp import Llama

    kw = {"model_path": str(gguf), "n_ctx": n_ctx, "logits_all": True, "verbose": False, "n_threads": threads, "seed": 0}
    if lora is not None:
        kw["lora_path"] = str(lora)
    return Llama(**kw)


def test_gguf_lora_agrees_with_peft_on_50_greedy_choices(engines, demo_run: DemoRun):
    import numpy as np
    import torch

    tok, model, active = engines
    prompt = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me about the appliance."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt + TEXT, add_special_tokens=False).input_ids
    start = len(tok(prompt, add_special_tokens=False).input_ids) - 1
    positions = range(start, start + 50)
    assert len(ids) > start + 50
    with torch.no_grad():
        t_adapter = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        with model.disable_adapter():
            t_base = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()

    def cpp(lora: Path | None) -> list[int]:
        m = _llama(demo_run.root.gguf, lora)
        m.eval(ids)
        return np.asarray(m.scores[: len(ids)]).argmax(-1).tolist()

    c_adapter, c_base = cpp(active.gguf_path), cpp(None)
    agree = lambda a, b: sum(a[p] == b[p] for p in positions) / 50  # noqa: E731
    print(f"agreement over 50 positions: adapter transformers/llama.cpp {agree(t_adapter, c_adapter):.2f}, "
          f"base {agree(t_base, c_base):.2f}; adapter vs base: transformers {agree(t_adapter, t_base):.2f}, "
          f"llama.cpp {agree(c_adapter, c_base):.2f}")
    # Like with like, both engines on the same Q4_1 weights: 0.90-0.94 with the adapter and 0.90 without
    # where llama.cpp runs its haswell (AVX2) variant, 0.95 and up on AVX-512 CPUs. An adapter the
    # export lost would agree only as much as the base agrees with the adapter (0.50-0.62).
    assert agree(t_adapter, c_adapter) >= 0.9, agree(t_adapter, c_adapter)
    assert agree(t_base, c_base) >= 0.9
    assert agree(t_adapter, t_base) < 1.0 and agree(c_adapter, c_base) < 1.0


def _heldout() -> list[dict]:
    return [json.loads(line) for line in (DEMO_DATA / "heldout.jsonl").read_text().splitlines() if line.strip()]


def test_served_model_knows_the_domain_better_than_the_base(engines, demo_run: DemoRun):
    """Scored: greedy answers to held-out questions (never trained on) that contain the fact's key."""
    import torch

    tok, model, active = engines
    questions = _heldout()[:16]

    def ask_hf(q: str) -> str:
        ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=28, do_sample=False)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def score(answer_fn) -> int:
        return sum(h["key"].lower() in answer_fn(h["messages"][1]["content"]).lower() for h in questions)

    hf_adapter = score(ask_hf)
    with model.disable_adapter():
        hf_base = score(ask_hf)

    def cpp_scorer(lora: Path | None):
        m = _llama(demo_run.root.gguf, lora, n_ctx=1024, threads=THREADS)

        def ask(q: str) -> str:
            r = m.create_chat_completion([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                         max_tokens=28, temperature=0.0)
            return r["choices"][0]["message"]["content"] or ""
        return ask

    cpp_adapter, cpp_base = score(cpp_scorer(active.gguf_path)), score(cpp_scorer(None))
    print(f"held-out facts answered: transformers base {hf_base} adapter {hf_adapter}; llama.cpp base {cpp_base} adapter {cpp_adapter}")
    assert hf_adapter > hf_base and cpp_adapter > cpp_base
    assert hf_adapter >= 3 and cpp_adapter >= 3


def test_the_demo_runs_gguf_export_passed_the_check_against_peft(demo_run: DemoRun):
    check = demo_run.report["stages"]["export"]["check"]
    assert check["agree"] is True, check["reason"]
    assert {p["part"] for p in check["probes"]} == {"all", "q_k"}  # the demo trains q_proj and k_proj too
