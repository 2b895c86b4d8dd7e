"""The adapter registry: register, promote, rollback, prune, and what a crash leaves behind."""

from __future__ import annotations

import os

import pytest

from appliance import adapters as reg
from appliance.paths import Layout


def _make(layout: Layout, adapter_id: str, created: str) -> reg.Adapter:
    staged = reg.staging_dir(layout, adapter_id)
    (staged / "peft").mkdir()
    (staged / "peft/adapter_config.json").write_text("{}")
    (staged / "peft/adapter_model.safetensors").write_bytes(b"x")
    return reg.register(layout, adapter_id, staged, {"created_at": created})


def test_promote_and_rollback(tmp_path):
    layout = Layout.at(tmp_path)
    assert reg.active_adapter(layout) is None and reg.list_adapters(layout) == []
    _make(layout, "a1", "2026-01-01")
    _make(layout, "a2", "2026-01-02")
    assert [a.id for a in reg.list_adapters(layout)] == ["a1", "a2"]
    reg.promote(layout, "a1")
    reg.promote(layout, "a2")
    active = reg.active_adapter(layout)
    assert active.id == "a2" and active.peft_dir == layout.adapters / "a2/peft" and active.gguf_path is None
    assert os.readlink(layout.adapters / "active") == "a2"  # relative link
    assert reg.rollback(layout).id == "a1"
    assert reg.active_adapter(layout).id == "a1"
    assert reg.rollback(layout) is None
    assert reg.active_adapter(layout) is None
    with pytest.raises(reg.AdapterError):
        reg.rollback(layout)


def test_promote_unknown_or_incomplete(tmp_path):
    layout = Layout.at(tmp_path)
    with pytest.raises(reg.AdapterError):
        reg.promote(layout, "nope")
    staged = reg.staging_dir(layout, "half")
    (staged / "metadata.json").write_text("{}")
    os.rename(staged, layout.adapters / "half")  # no weights: not an adapter
    with pytest.raises(reg.AdapterError):
        reg.promote(layout, "half")
    with pytest.raises(reg.AdapterError):
        reg.promote(layout, "../etc")


def test_partials_invisible_and_cleaned(tmp_path):
    layout = Layout.at(tmp_path)
    _make(layout, "a1", "1")
    reg.promote(layout, "a1")
    staged = reg.staging_dir(layout, "a2")  # a run killed while exporting
    (staged / "peft").mkdir()
    (layout.adapters / ".active.123.partial").symlink_to("a2")
    assert [a.id for a in reg.list_adapters(layout)] == ["a1"]
    assert len(reg.clean_partials(layout)) == 2
    assert reg.active_adapter(layout).id == "a1"


def test_prune_keeps_active_and_rollback_target(tmp_path):
    layout = Layout.at(tmp_path)
    for i in range(6):
        _make(layout, f"a{i}", str(i))
    reg.promote(layout, "a0")
    reg.promote(layout, "a1")
    removed = reg.prune(layout, keep=2)
    assert removed == ["a2", "a3", "a4", "a5"][: len(removed)] and len(removed) == 4
    assert {a.id for a in reg.list_adapters(layout)} == {"a0", "a1"}
    assert reg.rollback(layout).id == "a0"
