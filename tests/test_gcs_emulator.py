"""gs:// against a local GCS emulator: epath, array_record, tensorstore, Orbax.

Everything runs offline against ``gcs_emulator.running_emulator`` (127.0.0.1).
"""

import json
import os
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

from gcs_emulator import (  # noqa: E402,F401  (pytest fixtures)
    emulator_env,
    gcs_bucket,
    gcs_emulator,
    hang_guard,
    running_emulator,
)

TIMEOUT = 30  # seconds, for tensorstore futures


# --------------------------------------------------------------------------
# Fixture plumbing
# --------------------------------------------------------------------------


def test_env_set_and_restored_and_new_port_picked_up():
    from etils import epath

    names = list(emulator_env("http://x"))
    before = {k: os.environ.get(k) for k in names}
    with hang_guard(60):
        with running_emulator() as first:
            assert os.environ["STORAGE_EMULATOR_HOST"] == first.endpoint
            assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == first.endpoint
            assert os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] == first.endpoint
            assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
            assert os.environ["EPATH_USE_TF"] == "false"
            assert os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"]
            first.make_bucket("shared-name")
            epath.Path("gs://shared-name/only-in-first").write_bytes(b"1")
            assert epath.Path("gs://shared-name/only-in-first").exists()
        assert {k: os.environ.get(k) for k in names} == before
        # A second emulator (new port, same bucket name) must not be served
        # by a filesystem or listing cached from the first one.
        with running_emulator() as second:
            assert second.port != first.port
            second.make_bucket("shared-name")
            assert not epath.Path("gs://shared-name/only-in-first").exists()
            assert list(epath.Path("gs://shared-name").iterdir()) == []
            assert not second.errors


# --------------------------------------------------------------------------
# (a) etils.epath
# --------------------------------------------------------------------------


def test_epath_roundtrip(gcs_bucket):
    from etils import epath

    root = epath.Path(f"gs://{gcs_bucket}")
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    payload = bytes(range(256)) * 5
    (data / "a.bin").write_bytes(payload)
    (data / "b.bin").write_bytes(b"b")
    (data / "sub" / "c.txt").write_text("hello")

    assert (data / "a.bin").read_bytes() == payload
    assert (data / "sub" / "c.txt").read_text() == "hello"
    assert (data / "a.bin").exists() and (data / "a.bin").is_file()
    assert data.exists() and data.is_dir() and (data / "sub").is_dir()
    assert not (data / "missing.bin").exists()
    assert sorted(p.name for p in data.iterdir()) == ["a.bin", "b.bin", "sub"]
    assert sorted(p.name for p in data.glob("*.bin")) == ["a.bin", "b.bin"]
    assert [p.name for p in root.glob("data/*/*.txt")] == ["c.txt"]
    assert [p.name for p in root.iterdir()] == ["data"]

    (data / "b.bin").unlink()
    assert not (data / "b.bin").exists()
    assert sorted(p.name for p in data.iterdir()) == ["a.bin", "sub"]
    (data / "sub").rmtree()
    assert sorted(p.name for p in data.iterdir()) == ["a.bin"]


# --------------------------------------------------------------------------
# Emulator fixes, at the HTTP level and through tensorstore
# --------------------------------------------------------------------------


def _http(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_generation_header_preconditions_ranges_listing(gcs_emulator):
    base, bucket = gcs_emulator.endpoint, gcs_emulator.bucket
    upload = f"{base}/upload/storage/v1/b/{bucket}/o?uploadType=media&name=dir%2Fobj"
    media = f"{base}/storage/v1/b/{bucket}/o/dir%2Fobj?alt=media"
    octet = {"Content-Type": "application/octet-stream"}

    status, _, body = _http("POST", upload + "&ifGenerationMatch=0", b"0123456789", octet)
    assert status == 200
    gen = json.loads(body)["generation"]
    # ifGenerationMatch=0 means "only if absent".
    status, _, _ = _http("POST", upload + "&ifGenerationMatch=0", b"other", octet)
    assert status == 412
    status, _, _ = _http("POST", upload + f"&ifGenerationMatch={int(gen) + 1}", b"x", octet)
    assert status == 412

    status, headers, body = _http("GET", media)
    assert status == 200 and body == b"0123456789"
    assert headers["x-goog-generation"] == gen
    assert headers["x-goog-metageneration"]
    status, _, _ = _http("GET", media + f"&ifGenerationNotMatch={gen}")
    assert status == 304
    status, _, body = _http("GET", media + f"&ifGenerationMatch={gen}")
    assert status == 200 and body == b"0123456789"
    status, headers, body = _http("GET", media, headers={"Range": "bytes=-3"})
    assert (status, body, headers["Content-Range"]) == (206, b"789", "bytes 7-9/10")
    status, _, body = _http("GET", media, headers={"Range": "bytes=2-4"})
    assert (status, body) == (206, b"234")
    assert _http("GET", media, headers={"Range": "bytes=10-"})[0] == 416

    status, _, body = _http("POST", upload + f"&ifGenerationMatch={gen}", b"new", octet)
    assert status == 200 and json.loads(body)["generation"] != gen
    assert _http("DELETE", media.split("?")[0] + f"?ifGenerationMatch={gen}")[0] == 412

    for name in ("a/1", "a/2", "b/1", "c/1"):
        _http("POST", f"{base}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
              + urllib.parse.quote(name, safe=""), b"x", octet)
    listing = f"{base}/storage/v1/b/{bucket}/o?startOffset=a%2F2&endOffset=c"
    names = [o["name"] for o in json.loads(_http("GET", listing)[2])["items"]]
    assert names == ["a/2", "b/1"]


def test_tensorstore_generations(gcs_bucket):
    import tensorstore as ts

    kv = ts.KvStore.open(
        {"driver": "gcs", "bucket": gcs_bucket, "path": "kv/"}
    ).result(timeout=TIMEOUT)
    gen1 = kv.write("k", b"hello").result(timeout=TIMEOUT).generation
    full = kv.read("k").result(timeout=TIMEOUT)
    part = kv.read("k", byte_range=slice(1, 3)).result(timeout=TIMEOUT)
    # Needs x-goog-generation on media downloads (else generation 0).
    assert full.value == b"hello" and full.stamp.generation == gen1
    assert part.value == b"el" and part.stamp.generation == gen1
    # Needs ifGenerationNotMatch -> 304.
    assert kv.read("k", if_not_equal=gen1).result(timeout=TIMEOUT).state == "unspecified"
    gen2 = kv.write("k", b"world", if_equal=gen1).result(timeout=TIMEOUT).generation
    assert gen2 not in (b"", gen1)
    # Needs ifGenerationMatch -> 412: a stale conditional write must not land.
    assert kv.write("k", b"stale", if_equal=gen1).result(timeout=TIMEOUT).generation == b""
    assert kv.read("k").result(timeout=TIMEOUT).value == b"world"
    kv.write("other", b"1").result(timeout=TIMEOUT)
    assert sorted(kv.list().result(timeout=TIMEOUT)) == [b"k", b"other"]


# --------------------------------------------------------------------------
# (b) array_record
# --------------------------------------------------------------------------


def test_array_record_reads_gs_directly(gcs_bucket, tmp_path):
    from array_record.python import array_record_data_source, array_record_module
    from etils import epath

    records = [f"record-{i:03d}".encode() * (i + 1) for i in range(50)]
    local = tmp_path / "data.array_record"
    writer = array_record_module.ArrayRecordWriter(str(local), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    remote = epath.Path(f"gs://{gcs_bucket}/shards/data.array_record-00000-of-00001")
    remote.parent.mkdir(parents=True, exist_ok=True)
    remote.write_bytes(local.read_bytes())

    # C++ GcsReader (google-cloud-cpp) talks to CLOUD_STORAGE_EMULATOR_ENDPOINT.
    reader = array_record_module.ArrayRecordReader(str(remote))
    assert reader.num_records() == len(records)
    assert reader.read_all() == records
    assert reader.read([7, 3, 49]) == [records[7], records[3], records[49]]
    reader.close()
    random_access = array_record_module.ArrayRecordReader(
        str(remote), "readahead_buffer_size:0,max_parallelism:0"
    )
    assert random_access.read([42]) == [records[42]]
    random_access.close()

    source = array_record_data_source.ArrayRecordDataSource([str(remote)])
    assert len(source) == len(records)
    assert source[10] == records[10]
    assert source.__getitems__([0, 25, 49]) == [records[0], records[25], records[49]]


# --------------------------------------------------------------------------
# (c) Orbax CheckpointManager
# --------------------------------------------------------------------------


def _assert_bit_exact(actual, expected):
    import jax

    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        assert a.tobytes() == e.tobytes()


def test_orbax_checkpoint_manager(gcs_bucket, devices):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(devices), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    tree = {
        "w": jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 7.0, sharded),
        "b": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.bfloat16),
        "step": jnp.array(3, dtype=jnp.int32),
        "nested": {"ids": jnp.arange(6, dtype=jnp.int32).reshape(2, 3) - 2},
    }
    tree2 = jax.tree.map(lambda x: x * 3 + 1, tree)
    directory = f"gs://{gcs_bucket}/ckpt"

    options = ocp.CheckpointManagerOptions(max_to_keep=3, create=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        assert manager.latest_step() is None
        manager.save(1, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
        assert manager.latest_step() == 1
        manager.save(2, args=ocp.args.StandardSave(tree2))
        manager.wait_until_finished()
        assert manager.latest_step() == 2
        assert list(manager.all_steps()) == [1, 2]

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    with ocp.CheckpointManager(directory) as manager:  # fresh, from storage
        assert manager.latest_step() == 2
        restored2 = manager.restore(2, args=ocp.args.StandardRestore(abstract))
        restored1 = manager.restore(1, args=ocp.args.StandardRestore(abstract))
    _assert_bit_exact(restored2, tree2)
    _assert_bit_exact(restored1, tree)
    assert restored2["w"].sharding.is_equivalent_to(sharded, 2)
