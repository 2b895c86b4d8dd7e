"""[server] and [model] from appliance.toml: defaults, types, ranges, clear errors."""

from __future__ import annotations

import pytest

from appliance.config import ConfigError, load_config, parse_config
from appliance.paths import Layout

BASE = '[model]\npath = "/var/lib/appliance/models/x/model.gguf"\n'


def test_defaults_and_unknown_keys_ignored():
    cfg = parse_config(BASE + "extra = 1\n[trainer]\nepochs = 3\n[server]\nport = 9000\nnew_thing = true\n")
    assert cfg.server.port == 9000 and cfg.server.host == "127.0.0.1" and cfg.server.max_batch == 8
    assert cfg.model.backend == "llama.cpp" and cfg.model.context_length == 2048


def test_model_path_resolves_under_root(tmp_path):
    cfg = parse_config(BASE)
    assert cfg.model.resolve_path(Layout.at(tmp_path)) == tmp_path.resolve() / "var/lib/appliance/models/x/model.gguf"


@pytest.mark.parametrize("extra, needle", [
    ('[server]\nport = "80"\n', "port must be a int"),
    ("[server]\nport = 70000\n", "between 1 and 65535"),
    ("[server]\nmax_batch = 0\n", "max_batch must be between 1"),
    ("[server]\naudit_prompts = 1\n", "audit_prompts must be a bool"),
    ("[server]\nport = true\n", "port must be a int"),
    ('backend = "vllm"\n', "backend must be one of llama.cpp, transformers"),
])
def test_bad_values_name_the_key(extra, needle):
    text = BASE + extra if extra.startswith("[") else BASE + extra
    with pytest.raises(ConfigError, match=needle):
        parse_config(text)


def test_missing_model_section_and_path():
    with pytest.raises(ConfigError, match="no \\[model\\] section"):
        parse_config("[server]\n")
    with pytest.raises(ConfigError, match="missing path"):
        parse_config("[model]\nid = 'x'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[model\n")


def test_missing_file_has_a_hint(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Layout.at(tmp_path))
    assert "does not exist" in e.value.message and "appliance install" in e.value.hint
