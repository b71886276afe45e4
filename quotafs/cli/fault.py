"""`quotafs fault add|list|clear` and `quotafs events`: fault rules on a live mount.

Rules are validated here first (one clear line for a mistake), then sent over the
control channel; the daemon validates again and answers with the rule id.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from quotafs.cli.crashopts import add_crash_model_options
from quotafs.client.control import add_rule, clear_rules, event_line, list_rules, read_events
from quotafs.model.faults import Rule, spec_from_args

# -- commands -----------------------------------------------------------------------------

def cmd_fault_add(args: argparse.Namespace) -> int:
    spec = spec_from_args(args.op, path=args.path, allocating=args.allocating,
                          errno=args.errno, delay=args.delay,
                          short_write=args.short_write, corrupt_read=args.corrupt_read,
                          crash=args.crash, crash_model=args.crash_model,
                          crash_torn=args.crash_torn,
                          crash_keep_fraction=args.crash_keep_fraction,
                          drop_unsynced=args.drop_unsynced,
                          probability=args.probability, seed=args.seed,
                          after_bytes=args.after_bytes, nth=args.nth,
                          from_nth=args.from_nth, times=args.times)
    for warning in spec.warnings():
        print(f"quotafs: warning: {warning}", file=sys.stderr)
    result = add_rule(args.mountpoint, spec)
    for warning in result.warnings:  # what only the daemon knows (its mount's options)
        if warning not in spec.warnings():
            print(f"quotafs: warning: {warning}", file=sys.stderr)
    if args.json:
        print(result.to_json())
    else:
        print(result.id)
    return 0


def cmd_fault_list(args: argparse.Namespace) -> int:
    listing = list_rules(args.mountpoint)
    if args.json:
        print(json.dumps(listing.to_dict(), indent=2, sort_keys=True))
        return 0
    print(f"seed {listing.seed}")
    for status in listing.rules:
        rule = Rule(status.id, status.spec, status.effective_seed)
        rule.matched, rule.fired = status.matched, status.fired
        rule.shadowed, rule.retired = status.shadowed, status.retired
        rule.written = status.written or 0
        print(rule.describe())
    if not listing.rules:
        print("no fault rules")
    return 0


def cmd_fault_clear(args: argparse.Namespace) -> int:
    count = clear_rules(args.mountpoint, args.rule_id)
    print(f"removed {count} rule{'s' if count != 1 else ''}", file=sys.stderr)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    after = 0
    while True:
        for event in read_events(args.mountpoint, after):
            print(event.to_json() if args.json else event_line(event), flush=True)
            after = event.seq
        if not args.follow:
            return 0
        time.sleep(0.2)


def register(sub: Any) -> None:
    p = sub.add_parser("fault", help="add, list and clear fault rules on a live mount")
    fault = p.add_subparsers(dest="fault_command", required=True, parser_class=type(p))

    a = fault.add_parser("add", help="add a rule; prints its id",
                         description="Add a fault rule; it applies from the next request. "
                                     "See docs/faults.md.")
    a.add_argument("mountpoint")
    a.add_argument("--op", required=True,
                   help="operations, comma-separated (open, read, write, fsync, ...) or all")
    a.add_argument("--path", help="glob relative to the mount root, e.g. '/logs/*.log', "
                                  "'*.wal', '/db/**'")
    a.add_argument("--allocating", action="store_true",
                   help="match only write requests that newly allocate blocks (op write)")
    effect = a.add_mutually_exclusive_group(required=True)
    effect.add_argument("--errno", help="answer this errno, e.g. EIO, ENOSPC, EDQUOT")
    effect.add_argument("--delay", help="make the request wait, e.g. 200ms, 2s")
    effect.add_argument("--short-write", help="write at most this many bytes (op write)")
    effect.add_argument("--corrupt-read", action="store_true",
                        help="flip one bit in the data returned (op read)")
    effect.add_argument("--crash", action="store_true",
                        help="cut the power at the matched request, before it is carried "
                             "out; it and every later request answer EIO until `quotafs "
                             "crash MOUNT --revive` (a mount with --crash-sim; see "
                             "docs/faults.md)")
    add_crash_model_options(a, prefix="crash-", needs="--crash")
    a.add_argument("--drop-unsynced", action="store_true",
                   help="with --errno on op fsync: the file's unsynced writes are dropped "
                        "too, and the next fsync succeeds (ext4 after a writeback error; a "
                        "mount with --crash-sim)")
    a.add_argument("--probability", help="fire with probability P in [0, 1]")
    a.add_argument("--seed", help="this rule's random seed (default: from the mount seed)")
    a.add_argument("--after-bytes", help="fire only once this much was written (to the "
                                         "matching files, with --path)")
    nth = a.add_mutually_exclusive_group()
    nth.add_argument("--nth", help="fire on the Nth matching request only")
    nth.add_argument("--from-nth", metavar="N",
                     help="fire on the Nth matching request and every one after it")
    a.add_argument("--times", help="fire at most N times, then retire")
    a.add_argument("--json", action="store_true", help="print id, seed and warnings as JSON")
    a.set_defaults(func=cmd_fault_add)

    ls = fault.add_parser("list", help="rules with their counters")
    ls.add_argument("mountpoint")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_fault_list)

    c = fault.add_parser("clear", help="remove one rule, or all")
    c.add_argument("mountpoint")
    c.add_argument("rule_id", nargs="?")
    c.set_defaults(func=cmd_fault_clear)

    e = sub.add_parser("events", help="quota ENOSPCs and fired faults, as they happened")
    e.add_argument("mountpoint")
    e.add_argument("--json", action="store_true", help="JSON lines")
    e.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    e.set_defaults(func=cmd_events)
