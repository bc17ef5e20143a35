"""The dataset records' rules on both stores (real Redis DB 13 and SQLite): atomic file
updates, the per-tenant quota, holding a dataset for a job, deleting, and the retention sweep."""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_testlib import REDIS_URL

from service.contracts import ArtifactStore, JobKind, JobRecord, JobStatus, new_dataset_id, new_job_id
from service.contracts.datasets import (USER_GRACE_S, DatasetFile, DatasetQuota, DatasetRecord, DatasetState,
                                        DatasetUnavailable, begin_delete, check_file_name, classify_files, release_use,
                                        sweep_datasets, use_dataset)
from service.contracts.redis_store import RedisDatasetStore, RedisJobStore
from service.contracts.sqlite_store import SqliteDatasetStore, SqliteJobStore


@pytest.fixture(params=["redis", "sqlite"])
def stores(request, tmp_path, redis_client):
    if request.param == "redis":
        prefix = f"congeal-test-{uuid.uuid4().hex[:10]}"
        jobs, ds = RedisJobStore(REDIS_URL, prefix), RedisDatasetStore(REDIS_URL, prefix)
        yield jobs, ds
        keys = list(redis_client.scan_iter(match=f"{prefix}:*"))
        if keys:
            redis_client.delete(*keys)
    else:
        path = tmp_path / "jobs.sqlite3"
        jobs, ds = SqliteJobStore(path), SqliteDatasetStore(path)  # one file, two connections
        yield jobs, ds
    ds.close()
    jobs.close()


def _dataset(ds, owner="alice", state=DatasetState.ready, n_images=10, names=("a.png", "b.png"), **kw):
    rec = DatasetRecord(id=new_dataset_id(), owner=owner, state=state, n_images=n_images, n_files=len(names), **kw)
    ds.insert(rec, [DatasetFile(name=n, size=100) for n in names])
    return rec


def test_records_and_files_round_trip(stores):
    _, ds = stores
    rec = _dataset(ds, label="x")
    assert ds.get(rec.id).label == "x" and set(ds.files(rec.id)) == {"a.png", "b.png"}
    assert list(ds.files(rec.id, ["b.png", "nope.png"])) == ["b.png"]
    got, files, changed = ds.transact(rec.id, lambda r, f: (None, {"a.png": f["a.png"].model_copy(
        update={"received": 100})}), ["a.png"])
    assert changed and files["a.png"].complete and ds.files(rec.id)["a.png"].received == 100
    assert ds.files(rec.id)["b.png"].received == 0
    assert ds.transact(rec.id, lambda r, f: None)[2] is False
    assert ds.transact("ds" + "0" * 32, lambda r, f: (r, None))[0] is None
    older = _dataset(ds)
    recs, total = ds.list("alice", 0, 10)
    assert total == 2 and [r.id for r in recs] == [older.id, rec.id]  # newest first
    assert ds.list("alice", 2, 10) == ([], 2) and ds.list("alice", 2**62, 10) == ([], 2)
    assert ds.list("bob", 0, 10) == ([], 0)
    ds.delete(rec.id)
    assert ds.get(rec.id) is None and ds.files(rec.id) == {} and ds.all_ids() == [older.id]


def test_file_updates_are_atomic_under_contention(stores):
    _, ds = stores
    rec = _dataset(ds, names=("a.png",))

    def bump(_):
        for _ in range(25):
            ds.transact(rec.id, lambda r, f: (
                r.model_copy(update={"bytes_declared": r.bytes_declared + 1}),
                {"a.png": f["a.png"].model_copy(update={"received": f["a.png"].received + 1})}), ["a.png"])

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(bump, range(6)))
    assert ds.files(rec.id)["a.png"].received == 150 and ds.get(rec.id).bytes_declared == 150


def test_the_per_tenant_quota_is_atomic(stores):
    _, ds = stores
    rec = DatasetRecord(id=new_dataset_id(), owner="alice")
    ds.insert(rec, [], max_per_owner=3)

    def limited(_):
        try:
            ds.insert(DatasetRecord(id=new_dataset_id(), owner="alice"), [], max_per_owner=3)
            return True
        except DatasetQuota as e:
            assert e.count == 3
            return False

    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(limited, range(8)))
    assert sum(created) == 2 and ds.list("alice", 0, 100)[1] == 3
    ds.insert(DatasetRecord(id=new_dataset_id(), owner="bob"), [], max_per_owner=3)  # per owner


def test_a_job_holds_only_a_ready_dataset_of_its_owner(stores):
    jobs, ds = stores
    ready, uploading = _dataset(ds), _dataset(ds, state=DatasetState.uploading)
    invalid = _dataset(ds, state=DatasetState.invalid, error="x.png: corrupt")
    for did, owner, status, text in ((ready.id, "bob", 404, "no dataset"), (uploading.id, "alice", 409, "uploading"),
                                     (invalid.id, "alice", 409, "x.png: corrupt"), ("ds" + "9" * 32, "alice", 404, "")):
        with pytest.raises(DatasetUnavailable) as e:
            use_dataset(ds, jobs, did, owner, new_job_id(), max_images=100, min_images=2)
        assert e.value.status == status and text in e.value.message
    with pytest.raises(DatasetUnavailable) as e:
        use_dataset(ds, jobs, ready.id, "alice", new_job_id(), max_images=9, min_images=2)
    assert e.value.status == 413 and "10 images" in e.value.message
    jid = new_job_id()
    held = use_dataset(ds, jobs, ready.id, "alice", jid, max_images=100, min_images=2)
    assert jid in held.users
    release_use(ds, ready.id, jid)
    assert ds.get(ready.id).users == {}


def test_delete_waits_for_jobs_in_flight_and_for_a_job_being_created(stores):
    jobs, ds = stores
    rec = _dataset(ds)
    queued = JobRecord(id=new_job_id(), kind=JobKind.align, owner="alice")
    use_dataset(ds, jobs, rec.id, "alice", queued.id, 100, 2)
    jobs.insert(queued)
    _, busy, why = begin_delete(ds, jobs, rec.id)
    assert busy == [queued.id] and why == "in use" and not ds.get(rec.id).deleting
    jobs.update(queued.id, lambda r: r.model_copy(update={"status": JobStatus.cancelled, "finished_at": time.time()}))
    # A job named a moment ago whose record is not there yet counts as in flight ...
    pending = new_job_id()
    use_dataset(ds, jobs, rec.id, "alice", pending, 100, 2)
    assert begin_delete(ds, jobs, rec.id)[1] == [pending]
    # ... until the grace for an insert is long past (a job that was never created).
    ds.update(rec.id, lambda r: r.model_copy(update={"users": {pending: time.time() - USER_GRACE_S - 1}}))
    got, busy, why = begin_delete(ds, jobs, rec.id)
    assert busy == [] and why is None and got.deleting
    with pytest.raises(DatasetUnavailable) as e:  # once marked, no job can take it
        use_dataset(ds, jobs, rec.id, "alice", new_job_id(), 100, 2)
    assert e.value.status == 404


def test_a_racing_job_and_delete_never_leave_a_job_on_deleted_files(stores):
    jobs, ds = stores
    outcomes = set()
    for _ in range(30):
        rec = _dataset(ds)
        jid = new_job_id()
        result: dict = {}

        def job():
            try:
                use_dataset(ds, jobs, rec.id, "alice", jid, 100, 2)
                jobs.insert(JobRecord(id=jid, kind=JobKind.align, owner="alice"))
                result["job"] = True
            except DatasetUnavailable:
                result["job"] = False

        def delete():
            result["deleted"] = begin_delete(ds, jobs, rec.id)[2] is None

        ts = [threading.Thread(target=job), threading.Thread(target=delete)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not (result["job"] and result["deleted"]), result
        outcomes.add((result["job"], result["deleted"]))
    assert outcomes <= {(True, False), (False, True)}


def test_the_sweep_deletes_only_unused_expired_datasets_and_finishes_deletes(stores, tmp_path):
    jobs, ds = stores
    arts = ArtifactStore(tmp_path)
    old = time.time() - 1000
    expired, fresh, in_use, half_deleted = (_dataset(ds), _dataset(ds), _dataset(ds), _dataset(ds))
    validating = _dataset(ds, state=DatasetState.validating, check_holder="t", check_until=time.time() + 60)
    for r in (expired, fresh, in_use, half_deleted, validating):
        arts.dataset_files(r.id).mkdir(parents=True)
        (arts.dataset_files(r.id) / "a.png").write_bytes(b"x")
    running = JobRecord(id=new_job_id(), kind=JobKind.align, owner="alice")
    use_dataset(ds, jobs, in_use.id, "alice", running.id, 100, 2)
    jobs.insert(running)
    for r in (expired, in_use, validating):
        ds.update(r.id, lambda x: x.model_copy(update={"last_used_at": old, "updated_at": old}))
    ds.update(half_deleted.id, lambda x: x.model_copy(update={"deleting": True}))
    gone = sweep_datasets(ds, jobs, arts, ttl_s=100)
    assert sorted(gone) == sorted([expired.id, half_deleted.id])
    for r in (expired, half_deleted):
        assert ds.get(r.id) is None and not arts.dataset_dir(r.id).exists()
    for r in (fresh, in_use, validating):
        assert ds.get(r.id) is not None and arts.dataset_dir(r.id).exists()
    assert sweep_datasets(ds, jobs, arts, ttl_s=None) == []  # no TTL: nothing expires; twice is harmless


@pytest.mark.parametrize("names, layout", [
    (["a.png", "b.jpg"], ("images", None)), (["x.zip"], ("bundle", "x.zip")), (["x.tar.gz"], ("bundle", "x.tar.gz")),
    (["x.npy"], ("bundle", "x.npy")), (["x.npz"], ("shards", None)), (["a.npy", "b.npz"], ("shards", None)),
    (["a.tar", "b.zip"], ("shards", None)),
])
def test_layouts(names, layout):
    assert classify_files(names) == layout


def test_file_names_are_plain_and_accepted():
    for ok in ("a.png", "shard-00001.npy", "Ünï côde.JPG", "x.tar.gz"):
        assert check_file_name(ok) is None, ok
    for bad in ("", " a.png", "a/b.png", "a\\b.png", "..", ".a.png", "a\x00.png", "a.exe", "x" * 300 + ".png"):
        assert check_file_name(bad), bad
