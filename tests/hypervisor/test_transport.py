"""The PKI and the TLS transport, over real TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nvme_lm.hypervisor.certs import Pki, client_context, ensure_pki, server_context
from nvme_lm.hypervisor.stream import LbaData, MsgType, ProtocolError, State, control
from nvme_lm.hypervisor.transport import Channel, StreamClosed, connect, serve

GUEST_BASE = 0x1000_0000
TIMEOUT = 10


@pytest.fixture
def pki(tmp_path) -> Pki:
    return ensure_pki(tmp_path / "pki")


# --- certificates ------------------------------------------------------------------------------------


def test_pki_files_and_certificate_contents(pki: Pki, tmp_path):
    d = tmp_path / "pki"
    assert stat.S_IMODE(os.stat(d / "ca.key").st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    cert_path, key_path = pki.issue("host-a", extra_ips=["10.0.0.7"])
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host-a"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host-a", "localhost"]
    assert sorted(map(str, san.get_values_for_type(x509.IPAddress))) == ["10.0.0.7", "127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_certificates_are_reused_and_reissued_when_they_no_longer_fit(pki: Pki, tmp_path):
    cert_path, _ = pki.issue("a")
    first = cert_path.read_bytes()
    assert ensure_pki(tmp_path / "pki").ca_cert == pki.ca_cert  # same CA on the next start
    pki.issue("a")
    assert cert_path.read_bytes() == first  # reused
    pki.issue("a", extra_ips=["192.0.2.1"])
    assert cert_path.read_bytes() != first  # different IPs: reissued
    other = ensure_pki(tmp_path / "other")
    (tmp_path / "other" / "a.pem").write_bytes(cert_path.read_bytes())  # a cert from another CA
    (tmp_path / "other" / "a.key").write_bytes((tmp_path / "pki" / "a.key").read_bytes())
    new_path, _ = other.issue("a", extra_ips=["192.0.2.1"])
    x509.load_pem_x509_certificate(new_path.read_bytes()).verify_directly_issued_by(other.ca_cert)
    for bad in ("ca", "../x", "a b", ""):
        with pytest.raises(ValueError, match="must be a DNS name"):
            pki.issue(bad)


def _make_pki(directory: str, name: str, queue) -> None:
    pki = ensure_pki(directory)
    cert_path, _ = pki.issue(name)
    queue.put((pki.ca_path.read_bytes(), cert_path.read_bytes()))


def test_concurrent_creation_by_two_processes_gives_one_ca(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # fork would copy the locks of whatever threads other tests left
    queue = ctx.Queue()
    procs = [ctx.Process(target=_make_pki, args=(str(tmp_path / "shared"), n, queue)) for n in ("a", "a")]
    for p in procs:
        p.start()
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len({ca for ca, _ in results}) == 1
    ca = x509.load_pem_x509_certificate(results[0][0])
    for _, cert in results:
        x509.load_pem_x509_certificate(cert).verify_directly_issued_by(ca)
    assert not [f for f in os.listdir(tmp_path / "shared") if f.endswith(".tmp")]


def test_contexts_are_mutual_tls_1_2_plus(pki: Pki):
    for ctx in (server_context(pki, "b"), client_context(pki, "a")):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert len(ctx.get_ca_certs()) == 1  # our CA, no system roots
    assert client_context(pki, "a").check_hostname


# --- transport ---------------------------------------------------------------------------------------


async def _server(ctx: ssl.SSLContext, on_channel) -> tuple[asyncio.Server, int]:
    srv = await serve("127.0.0.1", 0, ctx, on_channel)
    return srv, srv.sockets[0].getsockname()[1]


def test_a_full_little_conversation_over_mutual_tls(pki: Pki):
    lba = os.urandom(1 << 20)
    pages = [(GUEST_BASE + i * 4096, os.urandom(4096)) for i in range(64)]

    async def destination(ch: Channel, seen: dict) -> None:
        seen["peer"] = ch.peer_name
        hello = await ch.recv(TIMEOUT)
        seen["hello"] = hello.body
        await ch.send(control(MsgType.ACCEPT))
        while (m := await ch.recv(TIMEOUT)).type is not MsgType.SWITCHOVER:
            seen.setdefault("types", []).append(m.type)
            if m.type is MsgType.LBA_DATA:
                seen["lba"] = bytes(m.body.data)
            elif m.type is MsgType.RAM_DATA:
                seen["pages"] = [(a, bytes(v)) for a, v in m.body.chunks()]
            elif m.type is MsgType.PASS_END:
                await ch.send(control(MsgType.PASS_ACK, **{"pass": m.body["pass"]}))
        seen["switchover"] = m.body
        await ch.send(control(MsgType.PREPARED))
        assert (await ch.recv(TIMEOUT)).type is MsgType.COMMIT
        await ch.send(control(MsgType.COMMITTED))
        seen["done"] = (await ch.recv(TIMEOUT)).type
        seen["state"] = ch.session.state

    async def main() -> dict:
        seen: dict = {}
        srv, port = await _server(server_context(pki, "b"), lambda ch: destination(ch, seen))
        async with srv, await connect("127.0.0.1", port, client_context(pki, "a")) as ch:
            assert ch.peer_name == "b"
            await ch.send(control(MsgType.HELLO, vm={"memory_mib": 1}))
            assert (await ch.recv(TIMEOUT)).type is MsgType.ACCEPT
            await ch.send_lba(1, 0, 256, memoryview(lba))
            await ch.send_deallocate(1, [(256, 768)])
            await ch.send_ram(pages)
            await ch.send(control(MsgType.PASS_END, **{"pass": 0, "kind": "full"}))
            assert (await ch.recv(TIMEOUT)).body == {"pass": 0}
            await ch.send(control(MsgType.SWITCHOVER, controller_state=b"ctrl", vm_state=b"vm"))
            assert (await ch.recv(TIMEOUT)).type is MsgType.PREPARED
            await ch.send(control(MsgType.COMMIT))
            assert (await ch.recv(TIMEOUT)).type is MsgType.COMMITTED
            await ch.send(control(MsgType.DONE))
            assert ch.session.state is State.DONE
            while "state" not in seen:
                await asyncio.sleep(0.01)
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert seen["peer"] == "a"
    assert seen["hello"]["vm"] == {"memory_mib": 1}
    assert seen["types"] == [MsgType.LBA_DATA, MsgType.LBA_DEALLOCATE, MsgType.RAM_DATA, MsgType.PASS_END]
    assert seen["lba"] == lba and seen["pages"] == pages
    assert seen["switchover"]["controller_state"] == b"ctrl"
    assert (seen["done"], seen["state"]) == (MsgType.DONE, State.DONE)


def _refused(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None = None):
    """Try a conversation; return (the client's exception, whether the server ever got a channel)."""
    reached = []

    async def on_channel(ch: Channel) -> None:
        reached.append(ch.peer_name)
        await ch.recv(TIMEOUT)

    async def main() -> BaseException | None:
        srv, port = await _server(server_ctx, on_channel)
        async with srv:
            try:
                ch = await connect("127.0.0.1", port, client_ctx, server_hostname=server_hostname)
                async with ch:
                    await ch.send(control(MsgType.HELLO, vm={}))
                    await ch.recv(TIMEOUT)  # TLS 1.3: the server's verdict on our certificate arrives here
            except OSError as exc:
                return exc
        return None

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT)), reached


def test_client_from_another_ca_is_refused(pki: Pki, tmp_path):
    stranger = ensure_pki(tmp_path / "stranger")
    ctx = client_context(stranger, "a")
    ctx.load_verify_locations(cafile=str(pki.ca_path))  # it trusts our server, so only the server can refuse
    exc, reached = _refused(server_context(pki, "b"), ctx)
    assert isinstance(exc, OSError) and not isinstance(exc, ssl.SSLCertVerificationError) and reached == []


def test_server_from_another_ca_is_refused(pki: Pki, tmp_path):
    stranger = ensure_pki(tmp_path / "stranger")
    ctx = client_context(pki, "a")
    exc, reached = _refused(server_context(stranger, "b"), ctx)
    assert isinstance(exc, ssl.SSLCertVerificationError) and reached == []


def test_client_without_certificate_is_refused(pki: Pki):
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=str(pki.ca_path))  # trusts the server but has no certificate
    exc, reached = _refused(server_context(pki, "b"), bare)
    assert isinstance(exc, OSError) and not isinstance(exc, ssl.SSLCertVerificationError) and reached == []


def test_server_name_is_checked(pki: Pki):
    exc, reached = _refused(server_context(pki, "b"), client_context(pki, "a"), server_hostname="c")
    assert isinstance(exc, ssl.SSLCertVerificationError) and "c" in str(exc) and reached == []


def _server_side_outcome(pki: Pki, client_actions) -> BaseException:
    """Run `client_actions(channel)` against a server that just receives; return what the server's recv raised."""
    outcome: asyncio.Future

    async def on_channel(ch: Channel) -> None:
        try:
            while True:
                await ch.recv(TIMEOUT)
        except BaseException as exc:  # the test inspects it
            outcome.set_result(exc)

    async def main() -> BaseException:
        nonlocal outcome
        outcome = asyncio.get_running_loop().create_future()
        srv, port = await _server(server_context(pki, "b"), on_channel)
        async with srv:
            ch = await connect("127.0.0.1", port, client_context(pki, "a"))
            await client_actions(ch)
            return await outcome

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_peer_closing_mid_frame_is_stream_closed(pki: Pki):
    async def half_a_frame(ch: Channel) -> None:
        await ch.send(control(MsgType.HELLO, vm={}))
        ch.session.state = State.COPYING  # white box: skip waiting for ACCEPT
        frames = ch.session.send(LbaData(1, 0, 8, bytes(4096)))
        await ch.send([frames[0], memoryview(frames[1])[:10]])
        await ch.close()

    exc = _server_side_outcome(pki, half_a_frame)
    assert isinstance(exc, StreamClosed) and "mid-frame" in str(exc)


def test_clean_close_and_bad_bytes(pki: Pki):
    async def close_at_once(ch: Channel) -> None:
        await ch.close()

    exc = _server_side_outcome(pki, close_at_once)
    assert isinstance(exc, StreamClosed) and "mid-frame" not in str(exc)

    async def garbage(ch: Channel) -> None:
        await ch.send([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])

    exc = _server_side_outcome(pki, garbage)
    assert isinstance(exc, ProtocolError) and "bad magic" in str(exc)


def test_recv_timeout_and_closed_channel(pki: Pki):
    async def on_channel(ch: Channel) -> None:
        await ch.recv(TIMEOUT)

    async def main() -> None:
        srv, port = await _server(server_context(pki, "b"), on_channel)
        async with srv:
            ch = await connect("127.0.0.1", port, client_context(pki, "a"))
            with pytest.raises(TimeoutError):
                await ch.recv(timeout=0.05)
            await ch.send(control(MsgType.HELLO, vm={}))
            with pytest.raises(StreamClosed):  # the server's handler returned without answering: closed
                await ch.recv(TIMEOUT)
            with pytest.raises(StreamClosed):  # and it stays closed
                await ch.recv(TIMEOUT)
            await ch.close()
            with pytest.raises(StreamClosed):
                await ch.send(control(MsgType.ABORT, reason="x"))

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))
