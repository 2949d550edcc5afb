import os
import pickle
import stat
import threading
from pathlib import Path

import pytest

from hpc_serverless.core.errors import (
    CorruptObjectError,
    ObjectNotFoundError,
    SerializationError,
    StoreError,
    UnsafeStoreError,
)
from hpc_serverless.core.store import ObjectStore


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
