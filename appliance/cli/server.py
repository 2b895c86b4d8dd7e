"""The `serve`, `keys` and `audit` verbs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.paths import Layout


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from appliance import adapters, tls
    from appliance.config import load_config, use_devices

    layout = Layout.at(args.root)
    config = load_config(layout, Path(args.config) if args.config else None)
    tls_files = tls.server_files(config.server, layout)  # before the model loads: a bad key fails in a second
    use_devices(config.model)  # before the self-test and the engine touch CUDA
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log = logging.getLogger("appliance.server")

    from dataclasses import asdict

    import uvicorn

    from appliance.engines import load_engine, selftest
    from appliance.server import sd_notify
    from appliance.server.app import Settings, create_app

    if config.model.backend == "llama.cpp":
        # A child decodes a real prompt first: a llama.cpp build that dies by a signal on this CPU is
        # reported in one sentence here, not by a crash at the first user's request. (torch picks its
        # CPU kernels at run time; the in-process warm-up covers the transformers backend.)
        log.info("engine self-test: %s", selftest.run(sys.executable, layout.root, asdict(config.model)).summary())
    active = adapters.active_adapter(layout)
    log.info("loading %s (%s) from %s, adapter %s", config.model.id, config.model.backend,
             config.model.resolve_path(layout), active.id if active else "none")
    engine = load_engine(config.model, layout, max_batch=config.server.max_batch, max_queue=config.server.max_queue, adapter=active,
                         max_queue_wait_s=config.server.max_queue_wait_s, prefill_chunk=config.server.prefill_chunk,
                         prefill_share=config.server.prefill_share, prefix_cache_mib=config.server.prefix_cache_mib)
    if engine.adapter_error:
        log.warning("serving the base model: the active adapter could not be loaded: %s", engine.adapter_error)
    app = create_app(Settings(layout, config.server, config.model.id, embeddings=config.embeddings, gpus=config.model.gpus), engine)
    cert, key = tls_files or (None, None)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                                           timeout_graceful_shutdown=10, lifespan="on", ssl_certfile=cert, ssl_keyfile=key))

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        # READY=1 only when the lifespan (model, warm-up) finished and the socket is listening.
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            sd_notify.notify("READY=1")
            sd_notify.notify(f"STATUS=serving {config.model.id} on {host}:{port}")
            log.info("ready on %s://%s:%d", "https" if tls_files else "http", host, port)
        await task
        sd_notify.notify("STOPPING=1")

    asyncio.run(main())
    if not server.started:
        raise ApplianceError(f"The server did not start on {host}:{port}.", "See the messages above (port in use? model failed to warm up?).")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from appliance import apikeys

    key_id, key = apikeys.create(Layout.at(args.root), args.role, rpm=args.rpm, tpm=args.tpm, max_live=args.max_live)
    if args.json:
        print(json.dumps({"id": key_id, "key": key, "role": args.role, "rpm": args.rpm, "tpm": args.tpm, "max_live": args.max_live}))
    else:
        print(f"key id {key_id} ({args.role}); the key, shown only now:\n{key}")
    return 0


def _limit(value: int | None) -> str:
    return "default" if value is None else "none" if value == 0 else str(value)


def cmd_keys_list(args: argparse.Namespace) -> int:
    from appliance import apikeys

    records = apikeys.list_keys(Layout.at(args.root))
    if args.json:
        print(json.dumps([{"id": r.id, "role": r.role, "created_at": r.created_at, "revoked_at": r.revoked_at,
                            "rpm": r.rpm, "tpm": r.tpm, "max_live": r.max_live} for r in records]))
        return 0
    if not records:
        print("no keys; make one with `appliance keys create --role admin`")
    for r in records:
        limits = f"rpm {_limit(r.rpm)}, tpm {_limit(r.tpm)}, live {_limit(r.max_live)}"
        print(f"{r.id}  {r.role:<5}  created {r.created_at}  {limits}" + (f"  revoked {r.revoked_at}" if r.revoked_at else ""))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from appliance import apikeys

    r = apikeys.revoke(Layout.at(args.root), args.id)  # which writes the audit line
    print(f"revoked {r.id} ({r.role})")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from appliance import audit

    layout = Layout.at(args.root)
    path = Path(args.file) if args.file else layout.audit_log
    result = audit.verify_log(layout, path)  # run as root, it also anchors the head it checked
    if not result.ok:
        raise AuditBroken(str(result.problem))
    anchor = audit.read_anchor(layout)
    where = f"the chain passes through the anchor: {anchor.describe()}" if anchor else "not anchored yet (root's commands anchor it)"
    print(f"{path}: {result.lines} lines, chain intact ({len(result.files)} file(s)); {where}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


class AuditBroken(ApplianceError):
    default_hint = "Keep this file as evidence and compare it with your log backups or the journal."


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    # --root may be given before or after each verb word. A subparser's default would overwrite a
    # value given earlier (argparse copies sub-namespaces over), so here it has no default at all and
    # the top-level parser's default stands.
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument("--root", default=argparse.SUPPRESS, help="install root (default: $APPLIANCE_ROOT or /)")
    root_parent = root
    p = sub.add_parser("serve", help="run the API server", parents=[root_parent])
    p.add_argument("--config", help="config file (default <root>/etc/appliance/appliance.toml)")
    p.add_argument("--host", help="bind address (default [server] host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default [server] port)")
    p.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="create, list and revoke API keys", parents=[root_parent])
    ks = k.add_subparsers(dest="keys_verb", required=True, metavar="ACTION")
    c = ks.add_parser("create", help="make a key; it is printed once and only its hash is stored", parents=[root_parent])
    c.add_argument("--role", required=True, choices=("admin", "user"))
    c.add_argument("--json", action="store_true", help='print {"id", "key", "role", "rpm", "tpm", "max_live"}')
    for flag, what in (("--rpm", "generation requests per minute"), ("--tpm", "prompt + answer tokens per minute"),
                       ("--max-live", "requests queued or decoding at once")):
        c.add_argument(flag, type=int, metavar="N", help=f"{what} this key may use (0: no limit; default: [server] key_{flag[2:].replace('-', '_')})")
    c.set_defaults(func=cmd_keys_create)
    ls = ks.add_parser("list", help="key ids, roles, creation and revocation times", parents=[root_parent])
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_keys_list)
    rv = ks.add_parser("revoke", help="revoke a key by id (takes effect at the server's next request)", parents=[root_parent])
    rv.add_argument("id")
    rv.set_defaults(func=cmd_keys_revoke)

    a = sub.add_parser("audit", help="check the hash-chained audit log", parents=[root_parent])
    asub = a.add_subparsers(dest="audit_verb", required=True, metavar="ACTION")
    v = asub.add_parser("verify", help="find an edited, inserted or deleted line", parents=[root_parent])
    v.add_argument("--file", help="audit log to check (default <root>/var/log/appliance/audit.jsonl)")
    v.set_defaults(func=cmd_audit_verify)



