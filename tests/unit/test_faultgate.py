"""The fault gate's table (daemon/faultgate.py) against the handlers and the fault model.

Adding a QuotaFS handler without saying whether rules can fault it, or an op to the
fault model without its handler, fails here.
"""

from __future__ import annotations

import inspect
import re

import pyfuse3

from quotafs.daemon.faultgate import FAULT_OPS, NOT_FAULT_OPS, Op
from quotafs.daemon.operations import QuotaFS
from quotafs.model.faults import OPS, PLAUSIBLE_ERRNOS


def _handlers() -> set[str]:
    """The pyfuse3.Operations methods QuotaFS overrides."""
    return {name for name, value in vars(QuotaFS).items()
            if callable(value) and not name.startswith("__")
            and callable(getattr(pyfuse3.Operations, name, None))}


def test_every_handler_is_in_the_table_or_listed_as_not_faulted() -> None:
    in_table = {op.handler for op in FAULT_OPS}
    assert not in_table & set(NOT_FAULT_OPS)
    assert _handlers() == in_table | set(NOT_FAULT_OPS)


def test_the_table_is_the_fault_models_ops() -> None:
    assert tuple(op.name for op in FAULT_OPS) == OPS
    assert set(PLAUSIBLE_ERRNOS) == set(OPS)
    assert len({id(op) for op in FAULT_OPS}) == len(FAULT_OPS)


def test_each_handler_consults_the_gate_with_its_own_ops() -> None:
    """Each row's handler names the row when it calls the gate (and no other's)."""
    rows = {attr: op for attr, op in vars(Op).items() if op in FAULT_OPS}
    for name in _handlers():
        source = inspect.getsource(getattr(QuotaFS, name))
        named = {attr for attr in rows if re.search(rf"\bOp\.{attr}\b", source)}
        assert named == {attr for attr, op in rows.items() if op.handler == name}, name
        if name in NOT_FAULT_OPS:
            assert "self.gate" not in source, name
