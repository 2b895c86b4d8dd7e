"""API keys: only hashes on disk, roles, revocation, the `keys` verb."""

from __future__ import annotations

import json
import stat

import pytest

from appliance import apikeys
from appliance.cli import main
from appliance.paths import Layout


@pytest.fixture
def layout(tmp_path):
    return Layout.at(tmp_path)


def test_create_stores_only_the_hash(layout):
    key_id, key = apikeys.create(layout, "admin")
    text = apikeys.keys_file(layout).read_text()
    assert key not in text and key.split("-", 2)[2] not in text
    assert key_id in text
    assert stat.S_IMODE(apikeys.keys_file(layout).stat().st_mode) == 0o640  # group: the service user (installer)
    rec = apikeys.verify(layout, key)
    assert rec is not None and rec.id == key_id and rec.role == "admin"


def test_wrong_unknown_and_malformed_keys_fail(layout):
    key_id, key = apikeys.create(layout, "user")
    assert apikeys.verify(layout, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert apikeys.verify(layout, f"apl-{key_id}-") is None
    assert apikeys.verify(layout, "apl-00000000-" + key.split("-", 2)[2]) is None
    assert apikeys.verify(layout, "Bearer nonsense") is None
    assert apikeys.verify(layout, "") is None


def test_revoke_applies_at_once_through_the_cache(layout):
    _, key = apikeys.create(layout, "user")
    cache = apikeys.KeyCache(layout)
    rec = cache.verify(key)
    assert rec is not None
    apikeys.revoke(layout, rec.id)
    assert cache.verify(key) is None
    assert [r.revoked_at is not None for r in apikeys.list_keys(layout)] == [True]


def test_bad_role_and_unknown_id_are_clear_errors(layout):
    with pytest.raises(apikeys.ApiKeyError, match="role 'root'"):
        apikeys.create(layout, "root")
    with pytest.raises(apikeys.ApiKeyError, match="no key with id"):
        apikeys.revoke(layout, "nope")


def test_corrupt_key_file_is_an_error_not_a_crash(layout):
    layout.etc.mkdir(parents=True)
    apikeys.keys_file(layout).write_text("{not json")
    with pytest.raises(apikeys.ApiKeyError, match="cannot be read"):
        apikeys.verify(layout, "apl-1-2")


def test_keys_verb_create_json_list_revoke(tmp_path, capsys):
    root = str(tmp_path)
    # --root before the verb, between the words and after them must all mean the same tree.
    assert main(["--root", root, "keys", "create", "--role", "admin", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert set(made) == {"id", "key", "role", "rpm", "tpm", "max_live"} and made["role"] == "admin"
    assert main(["keys", "--root", root, "create", "--role", "user"]) == 0
    assert "shown only now" in capsys.readouterr().out
    assert main(["keys", "list", "--root", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["role"] for k in listed] == ["admin", "user"]
    assert apikeys.verify(Layout.at(tmp_path), made["key"]) is not None
    assert main(["keys", "revoke", made["id"], "--root", root]) == 0
    assert apikeys.verify(Layout.at(tmp_path), made["key"]) is None
    assert main(["keys", "revoke", "missing", "--root", root]) == apikeys.ApiKeyError.exit_code
    assert "no key with id" in capsys.readouterr().err


def test_rewrites_keep_the_installers_ownership_and_mode(layout):
    apikeys.create(layout, "admin")
    path = apikeys.keys_file(layout)
    path.chmod(0o600)  # differs from the default 0640: a rewrite must keep what the file had
    apikeys.create(layout, "user")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(apikeys.list_keys(layout)) == 2
