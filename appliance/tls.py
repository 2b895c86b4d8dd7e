"""HTTPS for the API: where the server finds its certificate and key, and how local clients verify it.

`[server] tls_cert` / `tls_key` name PEM files as seen on the target. The key must be root's alone
(owner root, no group or other access). The server never runs as root, so it cannot read such a
file itself: the server unit passes both through systemd credentials (`LoadCredential=`, rendered
by installer/system/units.py when TLS is configured), which systemd reads as root and exposes to
this service only, under $CREDENTIALS_DIRECTORY, for as long as it runs. Without systemd (`appliance
serve` from a shell) the configured files are read directly, by whoever runs it.

Local clients (the console, the demo, the installer's readiness check) trust exactly the configured
certificate, as its own anchor; verification is never turned off.
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path

from appliance.config import ConfigError, ServerConfig
from appliance.paths import Layout

CERT_CREDENTIAL, KEY_CREDENTIAL = "tls.crt", "tls.key"


def on_target(layout: Layout, path: str) -> Path:
    return layout.root / path.lstrip("/")


def enabled(server: ServerConfig) -> bool:
    if bool(server.tls_cert) != bool(server.tls_key):
        raise ConfigError("[server] tls_cert and tls_key go together: set both for HTTPS, or neither for plain HTTP.")
    return bool(server.tls_cert)


def check_key(path: Path) -> None:
    """Refuse a key file that anyone but root owns or may read: it would be the site's to lose."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"The TLS key {path} cannot be checked: {e.strerror}.") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"The TLS key {path} must be a file owned by root with mode 0600 "
                          f"(it is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}).",
                          f"Run `chown root:root {path} && chmod 0600 {path}`, then start the server again.")


def server_files(server: ServerConfig, layout: Layout, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(certificate file, key file) for uvicorn, or None for plain HTTP; the credentials systemd passed
    when there are any, else the configured files. The configured key is checked either way."""
    if not enabled(server):
        return None
    cert, key = on_target(layout, server.tls_cert), on_target(layout, server.tls_key)
    check_key(key)
    creds = (environ if environ is not None else os.environ).get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / KEY_CREDENTIAL).is_file():
        cert, key = Path(creds) / CERT_CREDENTIAL, Path(creds) / KEY_CREDENTIAL
    for what, path in (("certificate", cert), ("key", key)):
        if not path.is_file():
            raise ConfigError(f"The TLS {what} {path} does not exist.", "Fix [server] tls_cert / tls_key in appliance.toml.")
    return str(cert), str(key)


def local_url(server: ServerConfig) -> str:
    """The URL a client on this host reaches the server at (a wildcard bind answers on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if enabled(server) else 'http'}://{host}:{server.port}"


def client_context(server: ServerConfig, layout: Layout) -> ssl.SSLContext | None:
    """An SSL context that trusts the configured certificate (a self-signed one, or the chain in the
    file: any certificate in it is an anchor); None for plain HTTP."""
    if not enabled(server):
        return None
    ctx = ssl.create_default_context(cafile=str(on_target(layout, server.tls_cert)))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx
