"""The control socket served from the daemon's trio loop: one task per connection reads
one request line, answers it (ControlChannel.answer, no await in between) and closes.

Requests are rare (a command, a test's check), so a connection costs the FUSE requests
nothing but a task switch; a peer that sends nothing is dropped after a while.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections.abc import Awaitable, Callable

import trio

from quotafs.controlsocket import MAX_LINE, peer_uid
from quotafs.daemon.control import ControlChannel

log = logging.getLogger("quotafs")

# accept(2)'s errnos that pass when descriptors or memory come free (trio retries them too)
_SHORT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
IDLE_TIMEOUT = 30.0  # a connection that sends no full request line by then is dropped


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    data = bytearray()
    while b"\n" not in data:
        chunk = await stream.receive_some(1 << 16)
        if not chunk:
            return None
        data += chunk
        if len(data) > MAX_LINE:
            return None
    return bytes(data[:data.index(b"\n")])


def _hung_up(fd: int) -> bool:
    """Whether the client closed its end: one that gave up waiting (a daemon stopped with
    SIGSTOP, then resumed) must not find its request applied after it reported failure."""
    poll = select.poll()
    poll.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poll.poll(0))


def _handler(channel: ControlChannel) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                uid = peer_uid(stream.socket)  # type: ignore[arg-type]  # trio's socket
                with trio.move_on_after(IDLE_TIMEOUT):
                    line = await _read_line(stream)
                    if line is not None and not _hung_up(stream.socket.fileno()):
                        reply = channel.answer(line, uid)
                        await channel.settle()  # a cut's reply once the kernel forgot
                        await stream.send_all(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("control connection ended: %s", exc)  # the client went away
    return answer


async def serve(sock: socket.socket, channel: ControlChannel) -> None:
    """Serve `sock` (bound and listening: quotafs.controlsocket.bind) until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    handler = _handler(channel)
    short = False  # out of descriptors: said once per spell, not a traceback per retry
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _SHORT_OF_RESOURCES:
                    raise
                if not short:
                    log.warning("control socket: cannot accept (%s); retrying",
                                os.strerror(exc.errno))
                short = True
                await trio.sleep(0.1)
                continue
            short = False
            nursery.start_soon(handler, stream)
