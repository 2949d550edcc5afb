import errno
import json
import mmap
import os
import pickle
import shutil
import stat
import struct
import threading
import zlib
from pathlib import Path

import pytest

from hpc_serverless.core import store as store_module
from hpc_serverless.core.errors import (
    CorruptObjectError,
    HPCServerlessError,
    ObjectNotFoundError,
    SerializationError,
    StoreError,
    UnsafeStoreError,
)
from hpc_serverless.core.store import FORMAT, ObjectStore

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def store(tmp_path):
    os.chmod(tmp_path, 0o700)
    return ObjectStore(tmp_path / "store")


def test_roundtrip_and_permissions(store):
    store.put({"a": [1, 2, 3]}, "objects/ab/abc")
    assert store.get("objects/ab/abc") == {"a": [1, 2, 3]}
    path = Path(store.path_of("objects/ab/abc"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (Path(store.root), path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_numpy_out_of_band_roundtrip(store):
    np = pytest.importorskip("numpy")
    a = np.arange(3_000_000, dtype=np.float64).reshape(1000, 3000)
    b = a[:, ::2]  # non-contiguous: travels in band
    store.put({"a": a, "b": b}, "x/arrays")
    back = store.get("x/arrays")
    assert np.array_equal(back["a"], a) and np.array_equal(back["b"], b)
    assert back["a"].flags.writeable


def test_objects_are_immutable(store):
    store.put(1, "x/one")
    with pytest.raises(StoreError, match="already exists"):
        store.put(2, "x/one")
    assert store.get("x/one") == 1
    store.put(3, "x/one", overwrite=True)
    assert store.get("x/one") == 3


def test_missing_object(store):
    with pytest.raises(ObjectNotFoundError, match="not in the store"):
        store.get("x/nothing")


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_objects_are_detected(store, damage):
    store.put(list(range(1000)), "x/obj")
    path = Path(store.path_of("x/obj"))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-20]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"not an object at all" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError):
        store.get("x/obj")


def test_crash_mid_write_leaves_no_valid_object(store, monkeypatch):
    class Boom(Exception):
        pass

    import hpc_serverless.core.store as store_mod

    calls = {"n": 0}
    real = store_mod._write_all

    def failing(f, view):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("disk full")
        real(f, view)

    monkeypatch.setattr(store_mod, "_write_all", failing)
    with pytest.raises(Boom):
        store.put(b"x" * 100_000, "x/half")
    assert not store.exists("x/half")
    assert not list(Path(store.path_of("x/half")).parent.iterdir())


def test_refuses_world_writable_store(tmp_path):
    os.chmod(tmp_path, 0o700)
    root = tmp_path / "shared"
    ObjectStore(root).put(1, "x/one")
    os.chmod(root, 0o777)
    with pytest.raises(UnsafeStoreError, match="writable by other users.*chmod go-w"):
        ObjectStore(root).get("x/one")
    os.chmod(root, 0o700)
    os.chmod(root / "x", 0o770)
    with pytest.raises(UnsafeStoreError):
        ObjectStore(root).get("x/one")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "a b", "a;b", ""])
def test_bad_keys_rejected(store, key):
    with pytest.raises(StoreError, match="invalid object key"):
        store.path_of(key)


def test_unpicklable_object_names_it(store):
    with pytest.raises(SerializationError, match="cannot serialize"):
        store.put(threading.Lock(), "x/lock")
    assert not store.exists("x/lock")


def test_concurrent_writers_of_distinct_keys(store):
    errors = []

    def write(i):
        try:
            store.put(i, f"c/{i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [store.get(f"c/{i}") for i in range(32)] == list(range(32))


def test_unloadable_pickle_says_versions(store):
    # a pickle that refers to a module missing on this side, as with version skew
    data = pickle.dumps(pickle.PicklingError)
    data = data.replace(b"_pickle", b"_nosuchmodule_")
    store.write_parts("x/bad", [memoryview(data)])
    with pytest.raises(SerializationError, match="written by Python .* read by Python"):
        store.get("x/bad")


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01  # one bit of one byte
    path.write_bytes(bytes(data))


def _large(store, key):
    """A 40 MiB array: above the size where the checksum runs on its own thread."""
    np = pytest.importorskip("numpy")
    a = np.arange(5 * 1024 * 1024, dtype=np.float64)
    store.put(a, key)
    return a, Path(store.path_of(key))


@pytest.fixture(params=["mapped", "read"])
def read_path(request, monkeypatch, tmp_path):
    """Big objects are mapped where the disk is local, read where it is not (NFS, Lustre):
    both ways must verify the same."""
    if request.param == "read":
        monkeypatch.setattr(store_module, "_maps_safely", lambda fd: False)
    else:
        fd = os.open(str(tmp_path), os.O_RDONLY)
        try:
            if not store_module._maps_safely(fd):
                pytest.skip(f"{tmp_path} is not on a local filesystem that maps safely")
        finally:
            os.close(fd)
    return request.param


@pytest.mark.parametrize("where", ["buffer start", "buffer middle", "buffer end", "header", "checksum"])
def test_a_flipped_byte_in_a_large_object_is_detected(store, where, read_path):
    a, path = _large(store, "x/big")
    assert path.read_bytes()[:8] == FORMAT.magic
    size = path.stat().st_size
    (hlen,) = struct.unpack("<Q", path.read_bytes()[8:16])
    header = path.read_bytes()[16:16 + hlen]
    offset = {
        "buffer start": size - FORMAT.trailer.size - a.nbytes,
        "buffer middle": size - FORMAT.trailer.size - a.nbytes // 2,
        "buffer end": size - FORMAT.trailer.size - 1,
        # a digit of the write time: the header still parses, only the checksum sees it
        "header": 16 + header.index(b'"written":') + len(b'"written":') + 1,
        "checksum": size - FORMAT.trailer.size,
    }[where]
    _flip(path, offset)
    with pytest.raises(CorruptObjectError, match="fails its checksum"):
        store.get("x/big")


def test_a_large_object_reads_back_whole(store, read_path):
    np = pytest.importorskip("numpy")
    a, _ = _large(store, "x/big")
    back = store.get("x/big")
    assert np.array_equal(back, a)
    owner = back
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(getattr(owner, "obj", None), mmap.mmap) == (read_path == "mapped")
    # an array handed out as a view of the mapped file is aligned, writable, and private
    assert back.flags.aligned and back.flags.writeable
    back[:] = -1.0
    assert np.array_equal(store.get("x/big"), a)


def test_several_big_buffers_read_back_whole(store, read_path):
    """Only the first buffer is aligned in the file; the others are copied where a view
    would be misaligned (numpy arrays need their dtype's alignment)."""
    np = pytest.importorskip("numpy")
    value = {"a": np.arange(3 * 1024 * 1024, dtype=np.float64), "b": np.arange(1_000_003, dtype=np.uint8),
             "c": np.arange(2 * 1024 * 1024, dtype=np.int32)}
    store.put(value, "x/many")
    back = store.get("x/many")
    for k, v in value.items():
        assert np.array_equal(back[k], v) and back[k].flags.aligned and back[k].flags.writeable


def test_mapping_is_refused_on_network_filesystems(monkeypatch):
    """A mapped file removed from another host faults (SIGBUS) on NFS: only local types map."""
    monkeypatch.setattr(store_module, "_fs_types", {})
    for fstype, maps in (("ext4", True), ("xfs", True), ("nfs4", False), ("lustre", False), ("", False)):
        monkeypatch.setattr(store_module, "_fs_type", lambda dev, t=fstype: t)
        store_module._fs_types.clear()
        fd = os.open("/", os.O_RDONLY)
        try:
            assert store_module._maps_safely(fd) is maps, fstype
        finally:
            os.close(fd)


def _format1_object(path, parts, meta=None):
    """An object as format 1 wrote it (CRC-32), built here from docs/on-disk.md."""
    header = json.dumps({"sizes": [len(p) for p in parts], "python": "3.x", "type": "t", "written": 0.0,
                         "host": "h", "meta": meta or {}}).encode()
    body = b"HPCSOBJ1" + struct.pack("<Q", len(header)) + header + b"".join(parts)
    os.makedirs(path.parent, mode=0o700, exist_ok=True)
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)) + b"HPCSEND1")
    os.chmod(path, 0o600)


def test_format1_objects_still_read(store):
    """An object written by the previous release (tests/data, made by its store.py) loads."""
    path = Path(store.path_of("x/old"))
    os.makedirs(path.parent, mode=0o700)
    shutil.copyfile(DATA / "store_object_format1.bin", path)
    assert path.read_bytes()[:8] == b"HPCSOBJ1"
    assert store.header("x/old")["meta"] == {"ok": True}
    value = store.get("x/old")
    assert value["list"] == list(range(10)) and value["text"] == "format 1"
    assert bytes(value["buffer"]) == b"hpc-serverless " * 100


@pytest.mark.parametrize("where", ["header", "buffer", "checksum"])
def test_format1_objects_are_still_verified(store, where):
    np = pytest.importorskip("numpy")
    a = np.arange(5 * 1024 * 1024, dtype=np.float64)  # 40 MiB: the threaded CRC-32 path
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(a, protocol=5, buffer_callback=buffers.append)
    parts = [data] + [bytes(b.raw()) for b in buffers]
    path = Path(store.path_of("x/old"))
    _format1_object(path, parts)
    assert np.array_equal(store.get("x/old"), a)
    size = path.stat().st_size
    offset = {"header": 16 + path.read_bytes()[16:].index(b'"python"') + 2,
              "buffer": size - 12 - a.nbytes // 3, "checksum": size - 12}[where]
    _flip(path, offset)
    with pytest.raises(CorruptObjectError, match="fails its checksum"):
        store.get("x/old")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("when", ["open", "write", "sync"])
def test_a_full_disk_or_quota_is_told_and_leaves_nothing(store, monkeypatch, code, when):
    """The disk-full (or over-quota) condition is simulated: the failing call raises the
    OSError the kernel would give; no disk is filled."""
    import hpc_serverless.core.store as store_mod

    full = OSError(code, os.strerror(code))
    store.put(0, "x/first")  # the directory exists; only the new object's files are counted
    if when == "open":
        def open_new(path, mode=0o600):
            raise full
        monkeypatch.setattr(store.fs, "open_new", open_new)
    elif when == "write":
        calls = {"n": 0}
        real = store_mod._write_all

        def write_all(f, view):
            calls["n"] += 1
            if calls["n"] == 3:  # after the head and a first chunk
                raise full
            real(f, view)
        monkeypatch.setattr(store_mod, "_write_all", write_all)
        monkeypatch.setattr(store_mod, "_CHUNK", 1000)
    else:  # NFS reports a full server when the data is flushed
        def sync(f):
            raise full
        monkeypatch.setattr(store.fs, "sync", sync)
    payload = b"x" * 100_000
    with pytest.raises(StoreError) as info:
        store.put(payload, "x/big")
    assert isinstance(info.value, HPCServerlessError) and info.value.__cause__ is full
    message = str(info.value)
    assert str(store.root) in message
    size = int(message.split(" bytes)")[0].rsplit("(", 1)[1])
    assert size > len(payload)
    assert ("over quota" if code == errno.EDQUOT else "no space left") in message
    assert "`hpc-serverless du`" in message and "`hpc-serverless gc`" in message
    assert sorted(p.name for p in Path(store.path_of("x/big")).parent.iterdir()) == ["first"]
