"""Namespace on a sparse file: data placement, allocation map (SEEK_DATA/SEEK_HOLE), NUSE, persistence."""

from __future__ import annotations

import json
import os

import pytest

from nvme_lm.device.namespace import IOV_MAX, Namespace, NamespaceInfo

MiB = 1 << 20


def make(tmp_path, nsze: int, lba_size: int, nsid: int = 1) -> Namespace:
    return Namespace.create(tmp_path, NamespaceInfo.new(nsid, nsze, lba_size))


def fs_block(ns: Namespace) -> int:
    """Allocation granularity of the file system holding the namespace."""
    return os.statvfs(ns.path).f_bsize


def write(ns: Namespace, slba: int, data: bytes) -> None:
    ns.write_from(slba, [memoryview(data)])


def read(ns: Namespace, slba: int, nlb: int) -> bytes:
    buf = bytearray(nlb * ns.lba_size)
    ns.read_into(slba, [memoryview(buf)])
    return bytes(buf)


@pytest.fixture
def ns512(tmp_path):
    ns = make(tmp_path, (8 * MiB) // 512, 512)
    yield ns
    ns.close()


@pytest.fixture
def ns4k(tmp_path):
    ns = make(tmp_path, (8 * MiB) // 4096, 4096, nsid=2)
    yield ns
    ns.close()


# ----------------------------------------------------------------------------- identity and persistence
def test_new_namespace_is_a_sparse_file_of_the_right_size(ns512):
    st = os.fstat(ns512.fd)
    assert st.st_size == ns512.nsze * 512 == 8 * MiB
    assert st.st_blocks == 0
    assert list(ns512.allocated_extents()) == []
    assert ns512.nuse == 0
    assert ns512.lba_shift == 9 and not ns512.dirty


def test_info_identifiers_are_well_formed_and_unique():
    a, b = NamespaceInfo.new(1, 10, 512), NamespaceInfo.new(1, 10, 512)
    assert len(a.nguid) == 32 and len(a.eui64) == 16 and int(a.nguid, 16) >= 0 and int(a.eui64, 16) >= 0
    assert a.nguid != b.nguid and a.uuid != b.uuid


def test_info_is_persisted_and_reopened_with_data(tmp_path):
    ns = make(tmp_path, 2048, 4096, nsid=7)
    data = os.urandom(3 * 4096)
    write(ns, 10, data)
    ns.flush()
    ns.close()
    saved = json.loads((tmp_path / "ns7.json").read_text())
    assert saved == {"nsid": 7, "nsze": 2048, "lba_size": 4096, "nguid": ns.info.nguid,
                     "eui64": ns.info.eui64, "uuid": ns.info.uuid}
    again = Namespace.open(tmp_path, 7)
    try:
        assert again.info == ns.info
        assert read(again, 10, 3) == data  # reopening never truncates or clears
        assert again.nuse == 3
    finally:
        again.close()


def test_save_info_replaces_atomically(tmp_path):
    ns = make(tmp_path, 64, 512)
    ns.info.nsze = 128
    ns.save_info()
    assert json.loads((tmp_path / "ns1.json").read_text())["nsze"] == 128
    assert not list(tmp_path.glob("*.tmp"))
    ns.close()


def test_create_replaces_a_stale_image(tmp_path):
    old = make(tmp_path, 64, 512)
    write(old, 0, b"\xaa" * 512)
    old.close()
    new = make(tmp_path, 64, 512)
    try:
        assert read(new, 0, 1) == bytes(512)
        assert new.info.nguid != old.info.nguid
    finally:
        new.close()


def test_destroy_removes_files(tmp_path):
    ns = make(tmp_path, 64, 512, nsid=3)
    ns.destroy()
    assert not (tmp_path / "ns3.img").exists() and not (tmp_path / "ns3.json").exists()
    ns.close()  # closing twice is harmless


@pytest.mark.parametrize("size", [0, 1, 256, 520, 1000, 4095])
def test_unsupported_lba_sizes_are_refused(tmp_path, size):
    with pytest.raises(ValueError):
        Namespace(NamespaceInfo.new(1, 16, size), tmp_path / "x.img")


@pytest.mark.parametrize("size", [512, 1024, 4096, 8192])
def test_power_of_two_lba_sizes_are_accepted(tmp_path, size):
    ns = Namespace(NamespaceInfo.new(1, 16, size), tmp_path / "x.img")
    assert 1 << ns.lba_shift == size and os.fstat(ns.fd).st_size == 16 * size
    ns.close()


# ----------------------------------------------------------------------------- data
def test_read_and_write_with_many_iovecs(ns512):
    """More views than IOV_MAX are split over several preadv/pwritev calls."""
    n = IOV_MAX + 300
    data = os.urandom(n * 512)
    src = [memoryview(data)[i * 512 : (i + 1) * 512] for i in range(n)]
    ns512.write_from(5, src)
    assert ns512.dirty
    out = bytearray(n * 512)
    dst = [memoryview(out)[i * 512 : (i + 1) * 512] for i in range(n)]
    ns512.read_into(5, dst)
    assert out == data
    assert read(ns512, 5, n) == data


def test_views_of_different_sizes(ns4k):
    parts = [os.urandom(n) for n in (100, 4096, 3996, 8192)]
    ns4k.write_from(1, [memoryview(p) for p in parts])
    assert read(ns4k, 1, 4) == b"".join(parts)


def test_flush_clears_dirty(ns512):
    write(ns512, 0, os.urandom(512))
    assert ns512.dirty
    ns512.flush()
    assert not ns512.dirty
    ns512.deallocate(0, 1)
    assert ns512.dirty
    ns512.flush()
    ns512.write_zeroes(0, 1)
    assert ns512.dirty


def test_short_read_beyond_the_end_is_an_error(ns512):
    buf = bytearray(1024)
    with pytest.raises(OSError):
        ns512.read_into(ns512.nsze - 1, [memoryview(buf)])


# ----------------------------------------------------------------------------- allocation
def test_allocated_extents_follow_writes_and_deallocation(ns4k):
    write(ns4k, 10, os.urandom(3 * 4096))
    write(ns4k, 100, os.urandom(4096))
    assert list(ns4k.allocated_extents()) == [(10 * 4096, 3 * 4096), (100 * 4096, 4096)]
    # windows clip the extents
    assert list(ns4k.allocated_extents(11 * 4096, 50 * 4096)) == [(11 * 4096, 2 * 4096)]
    assert list(ns4k.allocated_extents(13 * 4096, 100 * 4096)) == []
    assert list(ns4k.allocated_extents(0, 11 * 4096)) == [(10 * 4096, 4096)]
    assert ns4k.allocated_bytes() == 4 * 4096
    ns4k.deallocate(11, 1)
    assert list(ns4k.allocated_extents()) == [(10 * 4096, 4096), (12 * 4096, 4096), (100 * 4096, 4096)]
    assert read(ns4k, 10, 3)[4096:8192] == bytes(4096)
    ns4k.deallocate(0, ns4k.nsze)
    assert list(ns4k.allocated_extents()) == []
    assert os.fstat(ns4k.fd).st_blocks == 0
    assert os.fstat(ns4k.fd).st_size == ns4k.nsze * 4096  # punching keeps the size


def test_nuse_counts_whole_blocks_on_4096_format(ns4k):
    write(ns4k, 0, os.urandom(5 * 4096))
    write(ns4k, 1000, os.urandom(4096))
    assert ns4k.nuse == 6
    ns4k.deallocate(2, 2)
    assert ns4k.nuse == 4


def test_nuse_on_512_format_rounds_to_file_system_blocks(ns512):
    per = fs_block(ns512) // 512  # 512-byte LBAs sharing one file block
    write(ns512, 3, os.urandom(512))  # one LBA allocates its whole file block
    assert ns512.nuse == per
    assert list(ns512.allocated_extents()) == [(0, fs_block(ns512))]
    write(ns512, per * 10 + 1, os.urandom(2 * 512))
    assert ns512.nuse == 2 * per
    ns512.deallocate(3, 1)  # part of a file block: zeroed, the block stays
    assert read(ns512, 3, 1) == bytes(512) and ns512.nuse == 2 * per
    ns512.deallocate(0, per)  # the whole file block: gone
    assert ns512.nuse == per


def test_nuse_with_unaligned_extent_rounds_outward(tmp_path):
    """An extent that starts or ends inside a logical block counts that block (8 KiB LBAs)."""
    ns = make(tmp_path, 64, 8192)
    try:
        write(ns, 2, os.urandom(8192))
        assert ns.nuse == 1
        ns.deallocate(2, 1)
        fd = ns.fd
        os.pwrite(fd, b"x", 3 * 8192 + 8191)  # one byte in the last file block of LBA 3
        assert ns.nuse == 1
    finally:
        ns.close()


def test_write_zeroes_keeps_space_deallocate_returns_it(ns4k):
    write(ns4k, 0, os.urandom(8 * 4096))
    ns4k.flush()
    blocks = os.fstat(ns4k.fd).st_blocks
    ns4k.write_zeroes(0, 4)
    assert read(ns4k, 0, 4) == bytes(4 * 4096)
    assert os.fstat(ns4k.fd).st_blocks == blocks
    ns4k.deallocate(4, 4)
    assert read(ns4k, 4, 4) == bytes(4 * 4096)
    assert os.fstat(ns4k.fd).st_blocks == blocks - 4 * 4096 // 512
