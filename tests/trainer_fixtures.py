"""Trainer fixtures: SmolLM2 dequantized once into build/, appliance roots, and one demo run per session.

tests/conftest.py imports the fixtures; a test module imports only the helpers and types it uses.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from appliance.paths import Layout
from appliance.trainer.base_model import DONE, content_hash
from appliance.trainer.settings import TrainerSettings
from tests.workers import CORES_EACH

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "bundles" / "demo-data"

# The suite runs no server beside its training runs, so they train (and their gates decode) on every
# core the test worker has (tests/workers.py divides them among the workers); the product's default
# (threads = 0) leaves half the cores to the server.
THREADS = CORES_EACH
# Settings of the demo run: LoRA on every projection and a learning rate high enough that a few
# dozen CPU steps teach the facts (on a GPU tier the same data gets full epochs); the gate asks 32 of
# the held-back questions (the product's default: 64) with answers of up to 32 tokens (48), which is
# enough for the demo's short facts and halves the gate's time on 2 cores.
DEMO_SETTINGS = TrainerSettings(learning_rate=5e-3, epochs=2, batch_size=8, max_length=160, gate_margin=0.02,
                                lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                eval_max_items=32, eval_max_tokens=32, threads=THREADS)
DEMO_STEPS = 24
# The other runs of the suite go through the gate to test something else (resume, DP, the export check,
# a kill): 12 questions with 16-token answers (a test of the gate's decision sets its own).
QUICK_EVAL = {"eval_max_items": 12, "eval_max_tokens": 16}

CONFIG = """
[model]
tier = "cpu"
id = "smollm2-135m-instruct-q4_1"
backend = "llama.cpp"
path = "/var/lib/appliance/models/{sha}/model.gguf"
context_length = 2048

[trainer]
min_new_examples = 5
learning_rate = 0.003
epochs = 1
batch_size = 8
keep_adapters = 5
max_length = 160
eval_max_items = 12
eval_max_tokens = 16
threads = {threads}
"""


@pytest.fixture(scope="session")
def gguf_sha(smollm2_gguf: Path) -> str:
    return content_hash(smollm2_gguf)


@pytest.fixture(scope="session")
def trainer_base_dir(smollm2_safetensors: Path) -> Path:
    """The engine tests' SmolLM2 safetensors (dequantized by the trainer's own code), marked complete the
    way the trainer marks its base cache: one conversion per test session, not two."""
    if not (smollm2_safetensors / DONE).is_file():
        (smollm2_safetensors / DONE).write_text("test\n")
    return smollm2_safetensors


@dataclass
class TrainerRoot:
    layout: Layout
    gguf: Path

    @property
    def inbox(self) -> Path:
        return self.layout.data / "inbox"

    def add_inbox(self, name: str, lines: list[Any]) -> Path:
        self.inbox.mkdir(parents=True, exist_ok=True)
        p = self.inbox / name
        p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
        return p


def make_root(root: Path, gguf: Path, sha: str, base_dir: Path, base_answers: Path | None = None) -> TrainerRoot:
    """An installed-looking tree: appliance.toml, the GGUF under models/, the dequantized cache filled;
    with `base_answers`, the trainer's cache of the base model's answers is that directory (shared by the
    session's roots: the same base model answers the same held-out questions the same way in each)."""
    layout = Layout.at(root)
    model = layout.models / sha / "model.gguf"
    model.parent.mkdir(parents=True)
    model.symlink_to(gguf)
    layout.etc.mkdir(parents=True)
    layout.config_file.write_text(CONFIG.format(sha=sha, threads=THREADS))
    cache = layout.var / "trainer" / "base-cache"
    cache.mkdir(parents=True)
    (cache / sha).symlink_to(base_dir)  # what the first run would have dequantized
    if base_answers is not None:
        (layout.var / "trainer" / "base-answers").symlink_to(base_answers, target_is_directory=True)
    return TrainerRoot(layout, model)


@pytest.fixture(scope="session")
def base_answers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("base-answers")


@pytest.fixture
def trainer_root(tmp_path: Path, smollm2_gguf: Path, gguf_sha: str, trainer_base_dir: Path, base_answers_dir: Path) -> TrainerRoot:
    return make_root(tmp_path / "root", smollm2_gguf, gguf_sha, trainer_base_dir, base_answers_dir)


def demo_lines(name: str) -> list[str]:
    return [line for line in (DEMO_DATA / name).read_text().splitlines() if line.strip()]


@dataclass
class DemoRun:
    root: TrainerRoot
    report: dict[str, Any]
    log: list[str]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, gguf_sha: str, trainer_base_dir: Path,
             base_answers_dir: Path) -> DemoRun:
    """One real training run on the demo data (CPU, a few dozen steps), shared by the tests that inspect it."""
    from appliance.trainer.run import RunOptions, run_training

    root = make_root(tmp_path_factory.mktemp("demo") / "root", smollm2_gguf, gguf_sha, trainer_base_dir, base_answers_dir)
    root.add_inbox("manual.jsonl", demo_lines("train.jsonl"))
    log: list[str] = []

    def note(line: str) -> None:
        log.append(line)
        print(line, file=sys.stderr, flush=True)  # visible with -s: the run takes minutes on a busy CPU

    report = run_training(root.layout, RunOptions(now=True, settings=DEMO_SETTINGS, max_steps=DEMO_STEPS, log=note))
    return DemoRun(root, report, log)


def quick_settings(**kw: Any) -> TrainerSettings:
    return replace(DEMO_SETTINGS, **{**QUICK_EVAL, **kw})
