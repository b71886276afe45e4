"""Requests to a mount's root (stat, statvfs) that give up in time.

A stopped or stuck daemon never answers, and a FUSE request cannot be interrupted from
inside the thread that made it. So a probe runs elsewhere and is waited for with a
timeout:

- in a worker thread (the default: the Python API, microseconds of overhead). A request
  the daemon has not read yet is dropped when the process exits; one it has read and never
  answers keeps its thread, like any other I/O of the caller on that mount;
- in a child process (the command line, `isolated=True`): the child is killed on timeout
  (or, if the daemon read its request, left to init), so the command always exits.

Standard library only: the child imports nothing else (`python -I -S`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from quotafs import PACKAGE_PARENT

Op = tuple[str | bytes, ...]  # ("stat",) | ("statvfs",)
Result = bytes | OSError


def run_ops(path: str, ops: list[Op]) -> list[Result]:
    """Do the ops in order in this thread."""
    results: list[Result] = []
    for op in ops:
        kind = op[0]
        try:
            if kind in ("stat", "statvfs"):
                getattr(os, str(kind))(path)
                results.append(b"")
            else:
                raise ValueError(f"unknown probe op {kind!r}")
        except OSError as exc:
            results.append(exc)
    return results


def in_thread(path: str, ops: list[Op], timeout: float) -> list[Result] | None:
    """The results, or None if the daemon did not answer within `timeout`."""
    box: list[list[Result]] = []
    done = threading.Event()

    def work() -> None:
        box.append(run_ops(path, ops))
        done.set()

    threading.Thread(target=work, name="quotafs-probe", daemon=True).start()
    return box[0] if done.wait(timeout) else None


_ABANDONED: list[subprocess.Popen[bytes]] = []


def in_child(path: str, ops: list[Op], timeout: float) -> list[Result] | None:
    """As in_thread, in a child process that is killed when the time is up."""
    code = (f"import sys; sys.path.insert(0, {PACKAGE_PARENT!r}); "
            "import quotafs.client.probe as p; p.main()")
    wire = json.dumps([[str(op[0]), *(a.hex() for a in op[1:] if isinstance(a, bytes))]
                       for op in ops])
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", code, path],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(wire.encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        try:
            proc.wait(1)
        except subprocess.TimeoutExpired:
            # It waits in the kernel for the daemon; init reaps it once we exit. Kept
            # referenced, so that no "still running" warning fires when it is collected.
            _ABANDONED.append(proc)
        return None
    results: list[Result] = []
    for line in out.decode().splitlines():
        answer = json.loads(line)
        if "errno" in answer:
            results.append(OSError(answer["errno"], os.strerror(answer["errno"]), path))
        else:
            results.append(bytes.fromhex(answer["value"]))
    if len(results) != len(ops):
        raise OSError(f"the probe of {path} failed (exit status {proc.returncode})")
    return results


def main() -> None:
    """The child's side of in_child: ops as JSON on stdin, one JSON line each on stdout."""
    path = sys.argv[1]
    ops: list[Op] = [(op[0], *(bytes.fromhex(a) for a in op[1:]))
                     for op in json.loads(sys.stdin.read())]
    for result in run_ops(path, ops):
        answer = ({"errno": result.errno} if isinstance(result, OSError)
                  else {"value": result.hex()})
        print(json.dumps(answer), flush=True)
