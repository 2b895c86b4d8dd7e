"""`appliance train [--now]` and `appliance adapters list [--json] | promote ID | rollback`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from appliance.paths import Layout
from appliance.privileges import become_owner_of


def cmd_train(args: argparse.Namespace) -> int:
    from appliance.trainer.report import summary_line
    from appliance.trainer.run import RunOptions, run_training

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        # The unit already runs at low priority; a run by hand should not starve the server either.
        if os.nice(0) < 10:
            os.nice(10 - os.nice(0))
    except OSError:
        pass
    layout = Layout.at(args.root)
    become_owner_of(layout.var)  # by hand as root: the run's files still belong to the service user
    opts = RunOptions(now=args.now, max_steps=args.max_steps, log=lambda s: print(s, flush=True))
    report = run_training(layout, opts)
    if report.get("status") == "rank":  # another rank of a torchrun run: rank 0 reports
        return 0
    print(summary_line(report))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from appliance import adapters as reg

    layout = Layout.at(args.root)
    if args.action in ("promote", "rollback"):
        become_owner_of(layout.var)  # root changes the service's adapters/ as the service user
    if args.action == "promote":
        a = reg.promote(layout, args.id)
        print(f"active adapter: {a.id}")
    elif args.action == "rollback":
        back = reg.rollback(layout)
        print(f"active adapter: {back.id if back else 'none (base model)'}")
    else:
        active = reg.active_id(layout)
        rows = reg.list_adapters(layout)
        if args.json:
            json.dump([{"id": a.id, "active": a.id == active, "dir": str(a.dir), "gguf": a.gguf_path is not None,
                        "metadata": a.metadata} for a in rows], sys.stdout, indent=2)
            print()
            return 0
        if not rows:
            print("no adapters yet (the server uses the base model)")
        for a in rows:
            m = a.metadata.get("metrics", {})
            gate = a.metadata.get("gate", {})
            print(f"{'*' if a.id == active else ' '} {a.id}  val_loss {m.get('candidate')}  "
                  f"{'gguf+peft' if a.gguf_path else 'peft'}  {'promotable' if gate.get('promote') else 'kept'}")
    return 0


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", help="run one training pass (what the trainer unit runs)", parents=[root_parent])
    p.add_argument("--now", action="store_true", help="train even below min_new_examples, and to the end whatever the [trainer] deadline says")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke runs)")
    p.add_argument("--json", action="store_true", help="print the whole run report")
    p.set_defaults(func=cmd_train)

    a = sub.add_parser("adapters", help="list, promote and roll back LoRA adapters", parents=[root_parent])
    asub = a.add_subparsers(dest="action", metavar="ACTION")
    ls = asub.add_parser("list", help="registered adapters; * marks the active one", parents=[root_parent])
    ls.add_argument("--json", action="store_true")
    pr = asub.add_parser("promote", help="make an adapter active", parents=[root_parent])
    pr.add_argument("id")
    asub.add_parser("rollback", help="return to the previously active adapter", parents=[root_parent])
    a.set_defaults(func=cmd_adapters, action="list", json=False)
