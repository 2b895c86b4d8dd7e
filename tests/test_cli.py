"""The command line: keygen, spec errors, error rendering. (What it imports at start-up: tests/test_layers.py.)"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main
from tests.bundle_fixtures import REPO


def test_keygen_writes_private_files_0600_and_refuses_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert main(["bundle", "keygen", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fingerprint"].startswith("SHA256:") and len(info["fingerprint"]) == 7 + 64
    assert stat.S_IMODE((out / "signing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "model.key").stat().st_mode) == 0o600
    assert len((out / "model.key").read_bytes()) == 32
    before = (out / "signing.key").read_bytes()
    assert main(["bundle", "keygen", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "refusing to overwrite keys" in err
    assert (out / "signing.key").read_bytes() == before


def test_keygen_only_signing_or_only_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rotating the signing key keeps the sites' model keys; a new site's model key keeps the signing key."""
    out = tmp_path / "keys"
    assert main(["bundle", "keygen", "--out", str(out)]) == 0
    model, signing = (out / "model.key").read_bytes(), (out / "signing.key").read_bytes()
    capsys.readouterr()
    assert main(["bundle", "keygen", "--out", str(out), "--only", "signing"]) != 0  # still refuses to overwrite
    assert "signing.key, signing.pub" in capsys.readouterr().err
    rotated = tmp_path / "keys-2027"
    assert main(["bundle", "keygen", "--out", str(rotated), "--only", "signing", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in rotated.iterdir()) == ["signing.key", "signing.pub"] and "model_key" not in info
    assert info["fingerprint"].startswith("SHA256:")
    site = tmp_path / "site-2"
    assert main(["bundle", "keygen", "--out", str(site), "--only", "model"]) == 0
    printed = capsys.readouterr().out
    assert "model key" in printed and "signing key" not in printed
    assert [p.name for p in site.iterdir()] == ["model.key"] and stat.S_IMODE((site / "model.key").stat().st_mode) == 0o600
    assert (site / "model.key").read_bytes() != model and (out / "signing.key").read_bytes() == signing


def test_build_with_missing_spec_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bundle", "build", str(tmp_path / "nope.toml"), "--signing-key", "x", "--model-key", "y", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: Cannot read the bundle spec") and "nope.toml" in err
    assert not (tmp_path / "o").exists()


def test_build_with_bad_backend_format_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(f'name = "x"\nversion = "1"\n[wheelhouse]\nproject = "{REPO}"\n'
                    '[[models]]\nid = "m"\nbackend = "llama.cpp"\nformat = "safetensors"\ncontext_length = 1\nfiles = []\n')
    assert main(["bundle", "build", str(spec), "--signing-key", "x", "--model-key", "y", "--out", str(tmp_path / "o")]) != 0
    assert "pairs backend 'llama.cpp' with format 'safetensors'" in capsys.readouterr().err


def test_build_refuses_nonempty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["bundle", "keygen", "--out", str(tmp_path / "k")])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("precious")
    spec = tmp_path / "s.toml"
    spec.write_text(f'name = "x"\nversion = "1"\nmodels = []\n[wheelhouse]\nproject = "{REPO}"\n')
    code = main(["bundle", "build", str(spec), "--signing-key", str(tmp_path / "k/signing.key"),
                 "--model-key", str(tmp_path / "k/model.key"), "--out", str(tmp_path / "o")])
    assert code != 0 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "precious"


def test_verify_of_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["bundle", "keygen", "--out", str(tmp_path / "k")])
    capsys.readouterr()
    assert main(["bundle", "verify", str(tmp_path / "absent"), "--trust", str(tmp_path / "k/signing.pub")]) != 0
    assert "is not a bundle directory" in capsys.readouterr().err


def test_verify_without_any_trusted_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "verify", str(tmp_path), "--root", str(tmp_path)]) != 0
    assert "No trusted vendor key" in capsys.readouterr().err


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as with `| head` that already quit
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "bundle", "keygen", "--out", str(tmp_path / "k")],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=REPO)
    os.close(write_end)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_root_is_honoured_before_or_after_the_verb(tmp_path: Path, where: str) -> None:
    from appliance.cli import build_parser

    argv = ["--root", str(tmp_path), "status"] if where == "before" else ["status", "--root", str(tmp_path)]
    assert build_parser().parse_args(argv).root == str(tmp_path)


def test_root_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from appliance.cli import build_parser

    monkeypatch.setenv("APPLIANCE_ROOT", str(tmp_path))
    assert build_parser().parse_args(["status"]).root == str(tmp_path)
    monkeypatch.delenv("APPLIANCE_ROOT")
    assert build_parser().parse_args(["status"]).root == "/"
