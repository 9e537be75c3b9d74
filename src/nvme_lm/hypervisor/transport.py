"""asyncio TCP + mutual TLS carrying the migration stream.

Thin on purpose: all protocol logic is in stream.py's sessions; a Channel only moves their buffers
to the socket (with `drain()` for backpressure) and received chunks back into them. Every
transport failure is an `OSError` (`StreamClosed` once connected), every bad byte a `ProtocolError`.
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
    Message,
    ProtocolError,
    RamData,
    SourceSession,
    regroup,
)

READ_CHUNK = 1 << 20
STREAM_LIMIT = 4 << 20  # StreamReader buffer: large enough that one read() can return a whole chunk
HANDSHAKE_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 5.0
WRITE_BUFFER_HIGH = 4 << 20
WRITE_PIECE = 64 << 10  # TLS gets writes of this size (see stream.regroup)
Session = SourceSession | DestinationSession


class StreamClosed(ConnectionError):
    """The connection ended (EOF, reset, TLS alert): no more messages will come."""


class Channel:
    """One migration stream over one TLS connection. One task receives; sends may come from any task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session) -> None:
        self.session = session
        self._reader = reader
        self._writer = writer
        self._queue: deque[Message] = deque()
        self._failure: BaseException | None = None
        self.peer_name = _peer_cn(writer)
        # a peer that takes nothing for this long (a cut link: the socket buffers fill) ends the stream; None: wait
        self.send_timeout: float | None = None
        # TLS encrypts on write, so what waits in the buffer is ciphertext, not the caller's memory; a
        # deeper buffer than asyncio's 64 KiB keeps the socket busy while the sender prepares the next frame
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def __repr__(self) -> str:
        return f"<Channel peer={self.peer_name!r} {self.session!r}>"

    async def send(self, msg: Message | BulkBody | Sequence[Buffer]) -> None:
        """Send a message (framed by the session) or already-framed buffers, then wait for backpressure.

        The buffers are handed to TLS, which encrypts them before `writelines` returns; so the
        caller's memory is free again once this returns (and is not copied before that).
        """
        if self._writer.transport.is_closing():
            raise StreamClosed(f"send to {self.peer_name}: the connection is closed")
        frames = self.session.send(msg) if isinstance(msg, Message | LbaData | LbaDeallocate | RamData) else msg
        try:
            self._writer.writelines(regroup(frames, WRITE_PIECE))
            async with asyncio.timeout(self.send_timeout):
                await self._writer.drain()
        except TimeoutError:  # (an OSError: first) part of a frame may be out: the stream cannot go on
            self._writer.transport.abort()
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
        async with asyncio.timeout(timeout):
            while not self._queue:
                if self._failure is not None:
                    raise self._failure
                try:
                    data = await self._reader.read(READ_CHUNK)
                except OSError as exc:  # reset, TLS alert (ssl.SSLError is an OSError)
                    self._failure = StreamClosed(f"connection to {self.peer_name} failed: {exc}")
                    raise self._failure from exc
                if not data:
                    pending = self.session.pending
                    where = f" mid-frame ({pending} bytes of a frame received)" if pending else ""
                    self._failure = StreamClosed(f"{self.peer_name} closed the connection{where}")
                    continue
                try:
                    self._queue.extend(self.session.receive_data(data))
                except ProtocolError as exc:
                    self._queue.extend(exc.messages)  # valid messages before the bad frame come first
                    self._failure = exc
        return self._queue.popleft()

    async def close(self) -> None:
        """Close (TLS close_notify, bounded wait); the connection is aborted if the peer does not answer."""
        self._writer.close()
        try:
            async with asyncio.timeout(min(SHUTDOWN_TIMEOUT, self.send_timeout or SHUTDOWN_TIMEOUT)):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            self._writer.transport.abort()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _peer_cn(writer: asyncio.StreamWriter) -> str:
    cert = writer.get_extra_info("peercert") or {}
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
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_ctx, server_hostname=server_hostname or host, limit=STREAM_LIMIT,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT, ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    return Channel(reader, writer, session if session is not None else SourceSession())


async def serve(
    host: str, port: int, ssl_ctx: ssl.SSLContext, on_channel: Callable[[Channel], Awaitable[None]],
) -> asyncio.Server:
    """Accept streams; each verified connection runs `on_channel(channel)` with a fresh DestinationSession.

    Clients whose certificate does not verify never reach `on_channel` (the TLS handshake fails).
    The channel is closed when `on_channel` returns or raises.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = Channel(reader, writer, DestinationSession())
        try:
            try:
                await on_channel(channel)
            finally:
                await channel.close()
        except asyncio.CancelledError:
            # the server's loop is shutting down; swallowed because 3.11's start_server logs a
            # cancelled handler as an error
            writer.transport.abort()

    return await asyncio.start_server(
        handle, host, port, ssl=ssl_ctx, limit=STREAM_LIMIT,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT, ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
