"""asyncio TCP + mutual TLS carrying the migration stream.

Thin on purpose: all protocol logic is in stream.py's sessions; a Channel only moves their buffers
to the socket (with backpressure) and received bytes back into them. Every transport failure is an
`OSError` (`StreamClosed` once connected), every bad byte a `ProtocolError`.

Receiving goes through asyncio's `BufferedProtocol` rather than a `StreamReader`: TLS decrypts straight
into the buffer the session hands out (`session.get_buffer`), which inside a bulk frame is that frame's
own payload. A StreamReader costs two more copies of every byte and a bytes object per read (its buffer
is extended, then sliced out and the front deleted): measured on loopback, 140-230 MiB/s against
480-770 MiB/s for the same TLS connection read this way (docs/migration-stream.md, "Throughput").
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence

from nvme_lm.hypervisor.stream import (
    Buffer,
    BulkBody,
    DestinationSession,
    LbaData,
    LbaDeallocate,
    LbaRanges,
    Message,
    ProtocolError,
    RamData,
    SourceSession,
    regroup,
)

HANDSHAKE_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 5.0
WRITE_BUFFER_HIGH = 4 << 20
WRITE_PIECE = 64 << 10  # TLS gets writes of this size (see stream.regroup)
RECV_QUEUE_HIGH = 16 << 20  # received bulk bytes waiting for `recv`: stop reading the socket above this
RECV_QUEUE_LOW = 4 << 20  # and read again below this
Session = SourceSession | DestinationSession
_BODIES = Message | LbaData | LbaDeallocate | RamData | LbaRanges


class StreamClosed(ConnectionError):
    """The connection ended (EOF, reset, TLS alert): no more messages will come."""


def _size(msg: Message) -> int:
    """Bytes a received message holds (for the receive queue's flow control)."""
    data = getattr(msg.body, "data", None)
    return len(data) if data is not None else 64


class _StreamProtocol(asyncio.BufferedProtocol):
    """The asyncio side of one connection: received bytes into the session, messages into a queue."""

    def __init__(self, session: Session, on_connected: Callable[[_StreamProtocol], None] | None = None) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.peer_name = "?"
        self.queue: deque[Message] = deque()
        self.queued = 0  # bytes in `queue`
        self.failure: BaseException | None = None  # what `recv` raises once the queue is empty
        self.eof = False
        self.lost = False
        self.reading_paused = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiters: deque[asyncio.Future[None]] = deque()
        self._on_connected = on_connected
        self.task: asyncio.Task | None = None  # a server connection's on_channel task (kept referenced)

    # -- connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer_name = _peer_cn(transport)
        # TLS encrypts on write, so what waits in the buffer is ciphertext, not the caller's memory; a deeper
        # buffer than asyncio's 64 KiB keeps the socket busy while the sender prepares the next frame
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]
        if self._on_connected is not None:
            self._on_connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None and self.failure is None:
            self.failure = StreamClosed(f"connection to {self.peer_name} failed: {exc}")
        self._wake()
        while self._drain_waiters:
            w = self._drain_waiters.popleft()
            if not w.done():
                w.set_exception(ConnectionResetError("Connection lost") if exc is None else exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # the transport closes itself

    # -- receiving
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.session.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.failure is not None:
            return  # a bad frame ended the stream: what follows is not looked at
        try:
            msgs = self.session.buffer_updated(nbytes)
        except ProtocolError as exc:
            msgs = exc.messages  # valid messages before the bad frame come first
            self.failure = exc
            self._pause_reading()
        for m in msgs:
            self.queue.append(m)
            self.queued += _size(m)
        if self.queued > RECV_QUEUE_HIGH:
            self._pause_reading()
        if msgs or self.failure is not None:
            self._wake()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def taken(self, msg: Message) -> None:
        """`recv` took `msg` off the queue: read the socket again once the queue has room."""
        self.queued -= _size(msg)
        if self.reading_paused and self.queued < RECV_QUEUE_LOW and self.failure is None and not self.lost:
            self.reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_data(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- sending (flow control: asyncio pauses us above the write buffer's high-water mark)
    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        while self._drain_waiters:
            w = self._drain_waiters.popleft()
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("Connection lost")
        if not self._write_paused:
            return
        w = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(w)
        await w


class Channel:
    """One migration stream over one TLS connection. One task receives; sends may come from any task."""

    def __init__(self, proto: _StreamProtocol) -> None:
        self._proto = proto
        assert proto.transport is not None
        self._transport: asyncio.Transport = proto.transport
        self.session: Session = proto.session
        self.peer_name = proto.peer_name
        # a peer that takes nothing for this long (a cut link: the socket buffers fill) ends the stream; None: wait
        self.send_timeout: float | None = None

    def __repr__(self) -> str:
        return f"<Channel peer={self.peer_name!r} {self.session!r}>"

    async def send(self, msg: Message | BulkBody | Sequence[Buffer]) -> None:
        """Send a message (framed by the session) or already-framed buffers, then wait for backpressure.

        The buffers are handed to TLS, which encrypts them before `writelines` returns; so the
        caller's memory is free again once this returns (and is not copied before that).
        """
        if self._transport.is_closing():
            raise StreamClosed(f"send to {self.peer_name}: the connection is closed")
        frames = self.session.send(msg) if isinstance(msg, _BODIES) else msg
        try:
            self._transport.writelines(regroup(frames, WRITE_PIECE))
            async with asyncio.timeout(self.send_timeout):
                await self._proto.drain()
        except TimeoutError:  # (an OSError: first) part of a frame may be out: the stream cannot go on
            self._transport.abort()
            raise StreamClosed(f"send to {self.peer_name}: the peer took nothing for {self.send_timeout:g} s") from None
        except OSError as exc:  # reset, broken pipe, TLS error
            raise StreamClosed(f"send to {self.peer_name}: {exc}") from exc

    async def send_lba(self, nsid: int, slba: int, nlb: int, data: Buffer) -> None:
        await self.send(LbaData(nsid, slba, nlb, data))  # type: ignore[arg-type]

    async def send_deallocate(self, nsid: int, ranges: Sequence[tuple[int, int]]) -> None:
        await self.send(LbaDeallocate(nsid, ranges))

    async def send_ram(self, pages: Iterable[tuple[int, Buffer]], snapshot: bool = True) -> None:
        """Send guest pages. Keep `snapshot=True` while vCPUs run (see RamData.from_pages)."""
        await self.send(RamData.from_pages(pages, snapshot=snapshot))

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message; `StreamClosed` at the end, `ProtocolError` on bad data, `TimeoutError` on timeout."""
        p = self._proto
        async with asyncio.timeout(timeout):
            while not p.queue:
                if p.failure is not None:
                    raise p.failure
                if p.eof or p.lost:
                    pending = self.session.pending
                    where = f" mid-frame ({pending} bytes of a frame received)" if pending else ""
                    p.failure = StreamClosed(f"{self.peer_name} closed the connection{where}")
                    continue
                await p.wait_data()
        msg = p.queue.popleft()
        p.taken(msg)
        return msg

    async def close(self) -> None:
        """Close (TLS close_notify, bounded wait); the connection is aborted if the peer does not answer."""
        self._transport.close()
        try:
            async with asyncio.timeout(min(SHUTDOWN_TIMEOUT, self.send_timeout or SHUTDOWN_TIMEOUT)):
                await asyncio.shield(self._proto.closed)
        except (OSError, TimeoutError):
            self._transport.abort()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _peer_cn(transport: asyncio.BaseTransport) -> str:
    cert = transport.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return "?"


async def connect(
    host: str, port: int, ssl_ctx: ssl.SSLContext, session: SourceSession | None = None,
    server_hostname: str | None = None,
) -> Channel:
    """Open a stream to a destination agent. The server certificate must match `server_hostname` (default: host)."""
    sess = session if session is not None else SourceSession()
    _, proto = await asyncio.get_running_loop().create_connection(
        lambda: _StreamProtocol(sess), host, port, ssl=ssl_ctx, server_hostname=server_hostname or host,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT, ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    return Channel(proto)


async def serve(
    host: str, port: int, ssl_ctx: ssl.SSLContext, on_channel: Callable[[Channel], Awaitable[None]],
) -> asyncio.Server:
    """Accept streams; each verified connection runs `on_channel(channel)` with a fresh DestinationSession.

    Clients whose certificate does not verify never reach `on_channel` (the TLS handshake fails).
    The channel is closed when `on_channel` returns or raises.
    """

    async def handle(channel: Channel) -> None:
        try:
            try:
                await on_channel(channel)
            finally:
                await channel.close()
        except asyncio.CancelledError:
            # the server's loop is shutting down: the connection goes with it (not logged as an error)
            channel._transport.abort()

    def connected(proto: _StreamProtocol) -> None:  # after the TLS handshake (the client's certificate verified)
        proto.task = asyncio.get_running_loop().create_task(handle(Channel(proto)))

    return await asyncio.get_running_loop().create_server(
        lambda: _StreamProtocol(DestinationSession(), connected), host, port, ssl=ssl_ctx,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT, ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
