"""Bundle verification: every bad-input case of the foundation issue fails with one sentence naming the file."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.cli import main
from appliance.paths import Layout
from installer.bundle.manifest import MANIFEST, MAX_MANIFEST_BYTES, SIGNATURE
from tests.bundle_fixtures import SlimBundle


def verify(slim: SlimBundle, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["bundle", "verify", str(slim.dir), "--trust", str(slim.pub), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_refused(slim: SlimBundle, capsys: pytest.CaptureFixture[str], *needles: str, extra: tuple[str, ...] = ()) -> str:
    code, text = verify(slim, capsys, *extra)
    assert code != 0, text
    first = text.splitlines()[0]
    assert first.startswith("error: ")
    for n in needles:
        assert n in first, first
    assert "Traceback" not in text
    return first


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def wheel_path(slim: SlimBundle) -> Path:
    return next((slim.dir / "wheels").glob("*/*.whl"))


def test_intact_bundle_verifies(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = verify(slim, capsys, "--json")
    assert code == 0, text
    result = json.loads(text)
    assert result["ok"] and result["name"] == "slim" and result["sequence"] == 1
    assert result["files"] == len(slim.manifest()["files"])


def test_byte_flipped_in_manifest(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    flip(slim.dir / MANIFEST, 40)
    assert_refused(slim, capsys, "manifest.sig is not a valid signature")


def test_byte_flipped_in_signature(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    flip(slim.dir / SIGNATURE, 10)
    assert_refused(slim, capsys, "manifest.sig is not a valid signature")


def test_byte_flipped_in_wheel(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    w = wheel_path(slim)
    flip(w, w.stat().st_size // 2)
    assert_refused(slim, capsys, w.name, "SHA-256")


def test_byte_flipped_in_model(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    path = slim.model_entry()["path"]
    flip(slim.dir / path, 5000)
    assert_refused(slim, capsys, path, "SHA-256")


def test_byte_flipped_in_bootstrap(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    flip(slim.dir / "bootstrap.sh", 3)
    assert_refused(slim, capsys, "bootstrap.sh", "SHA-256")


def test_truncated_file(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    w = wheel_path(slim)
    os.truncate(w, w.stat().st_size - 100)
    assert_refused(slim, capsys, w.name, "shorter than its declared")


def test_file_longer_than_declared(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    path = slim.dir / slim.model_entry()["path"]
    with path.open("ab") as f:
        f.write(b"more")
    assert_refused(slim, capsys, slim.model_entry()["path"], "longer than its declared")


def test_extra_unlisted_file(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    (slim.dir / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    assert_refused(slim, capsys, "wheels/evil-1.0-py3-none-any.whl", "does not list")


def test_extra_unlisted_directory(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    (slim.dir / "hooks").mkdir()
    assert_refused(slim, capsys, "'hooks'", "does not list")


def test_missing_file(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    wheel_path(slim).unlink()
    assert_refused(slim, capsys, "missing", "wheels/")


@pytest.mark.parametrize("bad", ["../outside.whl", "/etc/passwd", "wheels/../../x", "wheels//x", "./x", ".hidden"])
def test_unsafe_path_in_manifest(slim: SlimBundle, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    def mutate(m: dict) -> None:
        m["files"][0]["path"] = bad

    slim.resign(mutate)
    assert_refused(slim, capsys, "unsafe path", repr(bad))


@pytest.mark.parametrize("bad", ["wheels/x.whl\n", "wheels/x\n.whl"])
def test_a_newline_is_not_a_plain_name(slim: SlimBundle, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    """`$` in a Python pattern also matches before a final newline; every name check ends at \\Z."""
    def mutate(m: dict) -> None:
        m["files"][0]["path"] = bad

    slim.resign(mutate)
    assert_refused(slim, capsys, "unsafe path")


@pytest.mark.parametrize("field, bad", [("version", "../../../etc/cron.d/x"), ("version", "1.0\n"), ("name", "a/b")])
def test_name_and_version_cannot_leave_the_release_directory(slim: SlimBundle, capsys: pytest.CaptureFixture[str],
                                                             field: str, bad: str) -> None:
    """The release directory is `<version>+<sequence>` under /opt/appliance/releases."""
    def mutate(m: dict) -> None:
        m[field] = bad

    slim.resign(mutate)
    assert_refused(slim, capsys, f"manifest's {field}", "not a plain name")


def test_symlink_on_disk(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    w = wheel_path(slim)
    real = slim.dir.parent / "real.whl"
    w.rename(real)
    w.symlink_to(real)
    assert_refused(slim, capsys, w.name, "symbolic link")


def test_fifo_on_disk(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    w = wheel_path(slim)
    w.unlink()
    os.mkfifo(w)
    assert_refused(slim, capsys, w.name, "special file")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_device_on_disk(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    w = wheel_path(slim)
    w.unlink()
    os.mknod(w, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
    assert_refused(slim, capsys, w.name, "special file")


def test_manifest_reserialized(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads((slim.dir / MANIFEST).read_bytes())
    (slim.dir / MANIFEST).write_text(json.dumps(data, indent=2))
    assert_refused(slim, capsys, "manifest.sig is not a valid signature")


def test_manifest_edited(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    raw = (slim.dir / MANIFEST).read_bytes().replace(b'"sequence":1', b'"sequence":9')
    (slim.dir / MANIFEST).write_bytes(raw)
    assert_refused(slim, capsys, "manifest.sig is not a valid signature")


def test_noncanonical_manifest_signed_by_vendor(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    raw = json.dumps(slim.manifest(), indent=1).encode()
    (slim.dir / MANIFEST).write_bytes(raw)
    (slim.dir / SIGNATURE).write_bytes(slim.signing_key.sign(raw))
    assert_refused(slim, capsys, "canonical form")


def test_signature_from_another_key(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    slim.resign(lambda m: None, key=Ed25519PrivateKey.generate())
    assert_refused(slim, capsys, "not a valid signature", "trusted vendor key")


def test_no_signature(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    (slim.dir / SIGNATURE).unlink()
    assert_refused(slim, capsys, "manifest.sig is missing")


def test_expired_bundle(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    past = datetime.now(timezone.utc) - timedelta(days=1)

    def mutate(m: dict) -> None:
        m["expires_at"] = past.replace(microsecond=0).isoformat().replace("+00:00", "Z")

    slim.resign(mutate)
    assert_refused(slim, capsys, "expired")


def _root_with_state(tmp_path: Path, state: dict) -> Path:
    root = tmp_path / "root"
    state_file = Layout.at(root).state_file
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps(state))
    return root


def test_sequence_lower_than_installed(slim: SlimBundle, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = _root_with_state(tmp_path, {"highest_sequence": 2})
    assert_refused(slim, capsys, "sequence 1 is lower than the installed sequence 2", extra=("--root", str(root)))


def test_equal_sequence_is_accepted(slim: SlimBundle, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = _root_with_state(tmp_path, {"highest_sequence": 1})
    code, text = verify(slim, capsys, "--root", str(root))
    assert code == 0, text
    same = _root_with_state(tmp_path / "same", {"highest_sequence": 1, "releases": {"1.0.0+1": {"sequence": 1, "version": "1.0.0"}}})
    code, text = verify(slim, capsys, "--root", str(same))
    assert code == 0, text  # the same release again: a no-op at install


def test_equal_sequence_with_another_version_is_refused(slim: SlimBundle, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = _root_with_state(tmp_path, {"highest_sequence": 1, "releases": {"0.9.0+1": {"sequence": 1, "version": "0.9.0"}}})
    assert_refused(slim, capsys, "sequence 1 was installed here as version 0.9.0", "1.0.0", extra=("--root", str(root)))


def test_clock_earlier_than_installed_issue_time(slim: SlimBundle, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    future = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()
    root = _root_with_state(tmp_path, {"highest_sequence": 1, "time_floor": future})
    assert_refused(slim, capsys, "clock", "earlier than the installed bundle's issue time", extra=("--root", str(root)))


def test_wrong_compatible_string(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    def mutate(m: dict) -> None:
        m["compatible"] = "linux-aarch64-cp312"

    slim.resign(mutate)
    assert_refused(slim, capsys, "'linux-aarch64-cp312'", "this host is")


def test_manifest_over_the_cap(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    with (slim.dir / MANIFEST).open("ab") as f:
        f.write(b" " * MAX_MANIFEST_BYTES)
    assert_refused(slim, capsys, "manifest.json is larger than the")


def test_duplicate_keys_refused(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    raw = (slim.dir / MANIFEST).read_bytes()
    raw = raw[:-1] + b',"name":"other"}'
    (slim.dir / MANIFEST).write_bytes(raw)
    (slim.dir / SIGNATURE).write_bytes(slim.signing_key.sign(raw))
    assert_refused(slim, capsys, "repeats a key")


def test_verify_reads_pinned_keys_under_root(slim: SlimBundle, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trust = tmp_path / "root/etc/appliance/trust"
    trust.mkdir(parents=True)
    (trust / "vendor.pub").write_bytes(slim.pub.read_bytes())
    assert main(["bundle", "verify", str(slim.dir), "--root", str(tmp_path / "root")]) == 0
    capsys.readouterr()


def test_inspect_shows_contents(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "inspect", str(slim.dir), "--trust", str(slim.pub)]) == 0
    out = capsys.readouterr().out
    assert "slim 1.0.0" in out and "verified, SHA256:" in out and "tiny  llama.cpp/gguf" in out


def test_inspect_sbom_prints_a_cyclonedx_document_of_every_wheel(slim: SlimBundle, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib
    import json

    assert main(["bundle", "inspect", str(slim.dir), "--trust", str(slim.pub), "--sbom"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    wheels = sorted(p.relative_to(slim.dir).as_posix() for p in (slim.dir / "wheels").glob("*/*.whl"))
    assert wheels and sorted(c["bom-ref"] for c in doc["components"]) == wheels
    for c in doc["components"]:
        data = (slim.dir / c["bom-ref"]).read_bytes()
        assert c["hashes"] == [{"alg": "SHA-256", "content": hashlib.sha256(data).hexdigest()}]
        assert c["purl"].startswith(f"pkg:pypi/{c['name']}@{c['version']}")
    appliance = next(c for c in doc["components"] if c["name"] == "appliance")
    assert appliance["licenses"], "the licence the wheel's metadata declares"
