"""quotafs.protocol: the control channel's documents, read and written without a mount."""

from __future__ import annotations

import json

import pytest

from quotafs.daemon.control import ControlChannel
from quotafs.daemon.inodes import TableStats
from quotafs.errors import errno_name
from quotafs.model.faults import FaultEngine, spec_from_args
from quotafs.model.ledger import Ledger
from quotafs.protocol import (
    EVENTS,
    STATUS,
    Event,
    FaultListing,
    Limits,
    ProtocolError,
    RuleStatus,
    Status,
    reply_line,
    request_line,
)

INFO = {"version": "0.1.0", "mountpoint": "/m", "backing": "/b", "private_backing": True,
        "pid": 1, "accounting": "blocks", "block_size": 4096, "mmap_sigbus": False,
        "mount_options": ["default_permissions", "fsname=quotafs"], "owner_uid": 0,
        "existing_bytes_at_mount": 0}


def _channel() -> ControlChannel:
    engine = FaultEngine(seed=7)
    engine.add(spec_from_args("write", errno="EIO", path="/f*", times=1))
    engine.add(spec_from_args("write", delay="1ms", after_bytes="4K", probability="0.5"))
    return ControlChannel(Ledger(1 << 20, 100), dict(INFO), 0, engine,
                          statistics=lambda: TableStats(known_inodes=1, open_handles=0,
                                                        reserved_blocks=0),
                          forget_cached=lambda: 0)


def _status_json(channel: ControlChannel) -> str:
    """The status document exactly as the daemon's reply carries it (from any uid)."""
    reply = json.loads(channel.answer(request_line(STATUS), 65534))
    return json.dumps(reply["result"], sort_keys=True)


def test_the_status_document_round_trips_byte_for_byte() -> None:
    raw = _status_json(_channel())
    status = Status.from_json(raw)
    assert status.to_json() == raw
    assert status.mount_options == ("default_permissions", "fsname=quotafs")
    assert status.limit == 1 << 20 and status.inode_limit == 100 and status.seed == 7
    assert status.usage().limit == status.limit


def test_a_rule_listing_round_trips_as_the_engine_writes_it() -> None:
    listing = _channel().faults.to_dict()
    parsed = FaultListing.from_dict(json.loads(json.dumps(listing)))
    assert parsed.to_dict() == listing
    first, second = parsed.rules
    assert (first.id, first.spec.errno, first.written) == ("r1", "EIO", None)
    assert (second.spec.after_bytes, second.written) == (4096, 0)


def test_an_event_round_trips() -> None:
    control = _channel()
    control.record_quota_hit("write", "/big", pid=3)
    [document] = json.loads(control.answer(request_line(EVENTS), 0))["result"]["events"]
    event = Event.from_dict(document)
    assert (event.kind, event.errno, event.path, event.pid) == ("quota", "ENOSPC", "/big", 3)
    assert event.to_dict() == document


def test_documents_read_as_the_mappings_of_0_1_0() -> None:
    limits = Limits(limit=10, inodes=None, reserve=0)
    assert limits["limit"] == limits.limit == 10
    assert dict(limits) == limits.to_dict() == {"limit": 10, "inodes": None, "reserve": 0}
    assert limits == {"limit": 10, "inodes": None, "reserve": 0}
    assert limits != {"limit": 11, "inodes": None, "reserve": 0}
    assert "inodes" in limits and limits.get("nope") is None
    with pytest.raises(KeyError):
        limits["nope"]
    status = Status.from_json(_status_json(_channel()))
    assert status["mount_options"] == ["default_permissions", "fsname=quotafs"]  # JSON's list


def test_missing_keys_are_one_clear_error_and_unknown_keys_are_ignored() -> None:
    with pytest.raises(ProtocolError, match=r"cannot read .*no inodes, reserve"):
        Limits.from_dict({"limit": 1})
    assert Limits.from_dict({"limit": 1, "inodes": 2, "reserve": 3, "new": 4}).to_dict() == {
        "limit": 1, "inodes": 2, "reserve": 3}
    with pytest.raises(ValueError, match="Limits has no field for new"):  # the daemon's
        Limits.exactly({"limit": 1, "inodes": 2, "reserve": 3, "new": 4})
    with pytest.raises(ProtocolError, match="not JSON"):
        Status.from_json(b"{")
    with pytest.raises(ProtocolError, match="no fired"):
        RuleStatus.from_dict({"id": "r1", "op": ["write"], "errno": "EIO",
                              "effective_seed": 1, "matched": 0, "shadowed": 0,
                              "retired": False, "warnings": []})


def test_the_wire_is_one_json_line_each_way() -> None:
    assert request_line("set", {"limit": 1}) == b'{"request": "set", "args": {"limit": 1}}\n'
    assert json.loads(reply_line({"cleared": 1})) == {"result": {"cleared": 1}}
    assert json.loads(reply_line(error="no", errno_name="EPERM")) == {"error": "no",
                                                                      "errno": "EPERM"}
    channel = _channel()
    refused = json.loads(channel.answer(request_line(EVENTS), 65534))
    assert refused["errno"] == "EPERM"
    assert json.loads(channel.answer(request_line("set", {"limit": 5}), 0))["result"] == {
        "limit": 5, "inodes": 100, "reserve": 0}
    assert channel.answer(b"{", 0).endswith(b"\n")


def test_errno_name() -> None:
    assert (errno_name(28), errno_name(None), errno_name(99999)) == ("ENOSPC", "EUNKNOWN",
                                                                     "99999")
