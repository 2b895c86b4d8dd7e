"""[server] and [model] from appliance.toml: defaults, types, ranges, clear errors."""

from __future__ import annotations

import pytest

from appliance.config import ConfigError, load_config, parse_config
from appliance.paths import Layout

BASE = '[model]\npath = "/var/lib/appliance/models/x/model.gguf"\n'


def test_defaults():
    cfg = parse_config(BASE + "[trainer]\nepochs = 3\n[server]\nport = 9000\n")
    assert cfg.server.port == 9000 and cfg.server.host == "127.0.0.1" and cfg.server.max_batch == 8
    assert cfg.model.backend == "llama.cpp" and cfg.model.context_length == 2048 and cfg.model.gpus == ()
    assert cfg.model.cuda_visible_devices is None  # absent: the server leaves CUDA_VISIBLE_DEVICES as it is


@pytest.mark.parametrize("text, needle", [
    (BASE + "contxt_length = 4096\n", "\\[model\\] has no setting 'contxt_length'; the settings of \\[model\\] are path, id"),
    (BASE + "[server]\nprot = 9000\n", "\\[server\\] has no setting 'prot'"),
    (BASE + "[sever]\nport = 9000\n", "a section \\[sever\\] the appliance does not read"),
])
def test_an_unknown_key_or_section_is_an_error_that_names_it(text, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        parse_config(text)
    assert "misspelt" in e.value.hint or "remove it" in e.value.hint


def test_the_trainer_refuses_an_unknown_key_too():
    from appliance.trainer.settings import TrainerConfigError, parse_trainer_settings

    with pytest.raises(TrainerConfigError, match="has no setting 'epoch'"):
        parse_trainer_settings({"epoch": 3})


@pytest.mark.parametrize("machine", ["8x-h100-80g", "a100-40g-mig", "2x-rtx3090-24g", "cpu-8c-16g"])
def test_the_planned_gpus_reach_the_server(machine, monkeypatch):
    """What the planner chose is in the server's config and in CUDA_VISIBLE_DEVICES of its process
    (the keys were once dropped on the way)."""
    from pathlib import Path

    from appliance.config import use_devices
    from installer.hardware.machine import load_machine
    from installer.planning.planner import plan
    from installer.planning.tiers import models_of, parse_tiers
    from installer.system.config_file import desired_values, render
    from installer.toolchain.spec import load_spec

    repo = Path(__file__).resolve().parent.parent
    spec = load_spec(repo / "bundles" / "demo.toml")
    p = plan(load_machine(repo / "tests" / "fixtures" / "machines" / f"{machine}.json"), parse_tiers(spec.tiers, models_of(spec.models)))
    settings = dict(p.model_settings(), path="/var/lib/appliance/models/k/model")
    cfg = parse_config(render(desired_values(settings, {}, {})))
    assert cfg.model.gpus == tuple(settings["gpus"]) and cfg.model.cuda_visible_devices == settings["cuda_visible_devices"]
    assert (cfg.model.replicas, cfg.model.tier, cfg.model.backend) == (settings["replicas"], settings["tier"], settings["backend"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "whatever was there")
    use_devices(cfg.model)
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == settings["cuda_visible_devices"]  # a CPU tier: "", CUDA sees no GPU
    assert settings["cuda_visible_devices"].startswith(("GPU-", "MIG-")) or machine == "cpu-8c-16g"


def test_model_path_resolves_under_root(tmp_path):
    cfg = parse_config(BASE)
    assert cfg.model.resolve_path(Layout.at(tmp_path)) == tmp_path.resolve() / "var/lib/appliance/models/x/model.gguf"


@pytest.mark.parametrize("extra, needle", [
    ('[server]\nport = "80"\n', "port must be a whole number"),
    ("[server]\nport = 70000\n", "between 1 and 65535"),
    ("[server]\nmax_batch = 0\n", "max_batch is 0; it must be between 1"),
    ("[server]\naudit_prompts = 1\n", "audit_prompts must be true or false"),
    ("[server]\nport = true\n", "port must be a whole number"),
    ('gpus = [0, -1]\n', "gpus must be a list of GPU indices"),
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
