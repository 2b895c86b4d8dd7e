"""The `feedback` verbs: list ratings, accept or reject the corrections held for an admin."""

from __future__ import annotations

import argparse
import json
from typing import Any

from appliance.errors import ApplianceError
from appliance.paths import Layout
from appliance.privileges import become_owner_of


def _store(layout: Layout) -> Any:
    """The feedback store, opened as the user who owns the data directory (the service user):
    a root caller becomes that user first (appliance/privileges.py)."""
    from appliance.feedback_store import FeedbackStore

    path = layout.data / "feedback.sqlite3"
    become_owner_of(layout.data)
    if not path.is_file():
        raise ApplianceError(f"There is no feedback store at {path}.", "The server makes it when it first answers; is the appliance installed here?")
    return FeedbackStore(path)


def _line(item: dict[str, Any]) -> str:
    def short(text: Any) -> str:
        text = " ".join(str(text or "").split())
        return text if len(text) <= 60 else text[:57] + "..."

    rating = "+1" if item["rating"] > 0 else "-1"
    return (f"{item['id']:>6}  {item['status']:<8}  key {item['key_id'] or '-':<8}  {rating}  "
            f"Q: {short(item['question'])!r}  correction: {short(item['corrected'])!r}")


def cmd_list(args: argparse.Namespace) -> int:
    with _store(Layout.at(args.root)) as store:
        items = [ex.item() for ex in store.feedback("held" if args.held else None)]
    if args.json:
        print(json.dumps(items, ensure_ascii=False))
        return 0
    if not items:
        print("no corrections wait for an admin" if args.held else "no feedback yet")
    for item in items:
        print(_line(item))
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from appliance import audit

    layout = Layout.at(args.root)
    accept = args.feedback_verb == "accept"
    if not args.id.isdecimal():
        raise ApplianceError(f"{args.id!r} is not a feedback id; ids are numbers.", "Run `appliance feedback list --held` to see them.")
    feedback_id = int(args.id)
    with _store(layout) as store:
        try:
            ex = store.decide(feedback_id, accept)
        except KeyError:
            raise ApplianceError(f"There is no held correction {args.id}.",
                                 "Run `appliance feedback list --held` to see their ids.") from None
    audit.append(layout, {"event": f"correction_{args.feedback_verb}ed", "feedback": feedback_id, "request_id": ex.request_id, "by": "cli"})
    print(f"{args.feedback_verb}ed correction {args.id}" + (f" (now feedback {ex.row}; the next training run uses it)" if accept else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    f = sub.add_parser("feedback", help="review ratings; accept or reject corrections held for an admin", parents=[root_parent])
    fs = f.add_subparsers(dest="feedback_verb", required=True, metavar="ACTION")
    ls = fs.add_parser("list", help="ratings and corrections, newest last", parents=[root_parent])
    ls.add_argument("--held", action="store_true", help="only corrections waiting for an admin")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    for verb, what in (("accept", "the trainer uses it from its next run"), ("reject", "the trainer never uses it")):
        d = fs.add_parser(verb, help=f"{verb} a held correction: {what}", parents=[root_parent])
        d.add_argument("id", help="its id (a number), from `appliance feedback list --held`")
        d.set_defaults(func=cmd_decide)
