"""HTTPS served by the appliance itself ([server] tls_cert / tls_key), and what the server shows without a key.

A self-signed certificate is made here with `cryptography`; the real `appliance serve` process on
SmolLM2 answers the official openai client that trusts exactly that certificate, the console's
client and the demo's readiness check; plain HTTP on the same port gets no answer.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from appliance import adapters, tls
from appliance.cli import main
from appliance.config import ConfigError, ServerConfig, load_config
from appliance.paths import Layout
from appliance.server.app import Settings, create_app
from installer.system.units import SERVER, UnitSettings, load_templates, render_units
from tests.scripted_engine import scripted_engine
from tests.server_fixtures import REPO, free_port, make_root, scripted_root
from tests.waiting import wait_until

CERT, KEY = "/etc/appliance/tls/server.crt", "/etc/appliance/tls/server.key"


def self_signed(cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "appliance test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def with_tls(layout: Layout, port: int | None = None) -> tuple[Path, Path]:
    """Turn HTTPS on in the root's appliance.toml; return (certificate, key) on the host."""
    cert, key = tls.on_target(layout, CERT), tls.on_target(layout, KEY)
    self_signed(cert, key)
    text = layout.config_file.read_text()
    extra = f'tls_cert = "{CERT}"\ntls_key = "{KEY}"\n' + (f"port = {port}\n" if port else "")
    text = text.replace("[server]\n", "[server]\n" + extra).replace("port = 8088\n", "" if port else "port = 8088\n")
    layout.config_file.write_text(text)
    return cert, key


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the key must be owned by root: the test makes it so only as root")


@needs_root
def test_the_real_server_speaks_https_to_the_openai_client_and_refuses_plain_http(tmp_path, smollm2_gguf):
    port = free_port()
    root = make_root(tmp_path / "root", smollm2_gguf)
    cert, _ = with_tls(root.layout, port)
    server = load_config(root.layout).server
    url = tls.local_url(server)
    assert url == f"https://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--root", str(root.layout.root)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    trusting = httpx.Client(verify=ssl.create_default_context(cafile=str(cert)))  # that certificate, nothing else
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return trusting.get(f"{url}/health/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "the server answered over HTTPS", 240, every=0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=root.user_key, max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert))))
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
                                               temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 4
        with pytest.raises(httpx.TransportError):  # plain HTTP on the same port: no HTTP answer at all
            httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # nor a client that trusts another CA
            httpx.get(f"{url}/health/ready", timeout=10, verify=ssl.create_default_context())
        # The console's client and the demo's readiness check trust the configured certificate.
        from appliance.cli.demo import _ready
        from appliance.console.sources.server import ServerClient

        console = ServerClient(url, lambda: root.admin_key, ssl_context=tls.client_context(server, root.layout), timeout=30)
        try:
            health = console.health()
            assert (health.status, health.model) == ("ready", "smollm2-135m-instruct")
        finally:
            console.close()
        assert _ready(url, root.layout)
        assert "ready on https://" in (tmp_path / "serve.log").read_text()
    finally:
        trusting.close()
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@needs_root
@pytest.mark.parametrize("change, why", [(lambda p: p.chmod(0o640), "mode 0640"), (lambda p: os.chown(p, 1000, 0), "uid 1000")])
def test_a_key_anyone_but_root_may_read_is_refused_before_the_model_loads(tmp_path, capsys, change, why):
    layout = Layout.at(tmp_path)
    layout.etc.mkdir(parents=True)
    layout.config_file.write_text('[server]\n[model]\npath = "/var/lib/appliance/models/none.gguf"\n')
    _, key = with_tls(layout)
    change(key)
    assert main(["--root", str(tmp_path), "serve"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert f"The TLS key {key} must be a file owned by root with mode 0600" in err and why in err
    assert "chmod 0600" in err and "does not exist" not in err  # refused before the (missing) model is looked at


def test_credentials_from_systemd_replace_the_configured_files(tmp_path):
    layout = Layout.at(tmp_path)
    cert, key = tls.on_target(layout, CERT), tls.on_target(layout, KEY)
    self_signed(cert, key)
    server = ServerConfig(tls_cert=CERT, tls_key=KEY)
    creds = tmp_path / "credentials"
    creds.mkdir()
    for name in (tls.CERT_CREDENTIAL, tls.KEY_CREDENTIAL):
        (creds / name).write_bytes(b"pem")
    if os.geteuid() == 0:
        assert tls.server_files(server, layout, {}) == (str(cert), str(key))
        assert tls.server_files(server, layout, {"CREDENTIALS_DIRECTORY": str(creds)}) == (
            str(creds / "tls.crt"), str(creds / "tls.key"))
    with pytest.raises(ConfigError, match="go together"):
        tls.server_files(ServerConfig(tls_cert=CERT), layout, {})
    assert tls.server_files(ServerConfig(), layout, {}) is None and tls.local_url(ServerConfig()) == "http://127.0.0.1:8088"


def test_the_server_unit_loads_the_tls_files_as_credentials_only_when_configured():
    plain = render_units(UnitSettings(), load_templates())[SERVER]
    assert "LoadCredential" not in plain
    unit = render_units(UnitSettings(tls=(CERT, KEY)), load_templates())[SERVER]
    assert f"\nLoadCredential=tls.crt:{CERT}\nLoadCredential=tls.key:{KEY}\n" in unit
    from appliance.errors import StateError

    with pytest.raises(StateError, match="not a plain absolute path"):
        render_units(UnitSettings(tls=(CERT, "/etc/appliance/key\nExecStartPre=/bin/sh")), load_templates())


def test_health_ready_without_an_admin_key_shows_no_paths_or_error_texts(tmp_path):
    root = scripted_root(tmp_path / "scripted")
    bad = root.layout.adapters / "broken1"
    (bad / "peft").mkdir(parents=True)
    (bad / "metadata.json").write_text("{}")
    (bad / "peft" / "adapter_model.safetensors").write_bytes(b"junk")
    (bad / "adapter.gguf").write_bytes(b"junk")
    adapters.promote(root.layout, "broken1")
    engine = scripted_engine(root.config)
    app = create_app(Settings(root.layout, root.config.server, root.config.model.id, watch_adapters=False), engine)
    with TestClient(app) as client:
        r = client.post("/admin/adapters/reload", headers={"Authorization": f"Bearer {root.admin_key}"})
        assert r.status_code == 409
        error = engine.adapter_error
        assert error and str(root.layout.root) in error  # the engine's failure names a path on this host
        for headers in ({}, {"Authorization": f"Bearer {root.user_key}"}, {"Authorization": "Bearer apl-0-wrong"}):
            seen = client.get("/health/ready", headers=headers)
            assert seen.status_code == 200 and seen.json() == {"status": "ready"}
            assert str(root.layout.root) not in seen.text and "GGUF" not in seen.text
        admin = client.get("/health/ready", headers={"Authorization": f"Bearer {root.admin_key}"}).json()
        assert admin["adapter_error"] == error and admin["model"] == "smollm2-135m-instruct"


def test_the_installer_renders_the_credentials_and_checks_readiness_over_https():
    from types import SimpleNamespace

    from installer.steps.activate import ready_url, unit_settings

    plan = SimpleNamespace(backend="llama.cpp", uses_gpu=False)
    tls_on = {"server": {"host": "0.0.0.0", "port": 9000, "tls_cert": CERT, "tls_key": KEY}}
    assert unit_settings(SimpleNamespace(config=tls_on), plan).tls == (CERT, KEY)  # type: ignore[arg-type]
    assert unit_settings(SimpleNamespace(config={"server": {"tls_cert": "", "tls_key": ""}}), plan).tls is None  # type: ignore[arg-type]
    assert ready_url(tls_on) == "https://127.0.0.1:9000/health/ready"
    assert ready_url({"server": {"host": "::", "port": 9000}}) == "http://[::1]:9000/health/ready"
