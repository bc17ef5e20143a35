"""Contracts between the API and the worker, and the job stores' life-cycle rules.

The store tests run against both implementations (real Redis DB 13 and
SQLite): the API and the worker rely on exactly these semantics.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from service.contracts import (METHODS, TASK_NAMES, WARPS, ArtifactStore, JobKind, JobOptions, JobRecord, JobStatus,
                               Settings, celery_config, new_job_id, queue_for)
from service_testlib import REDIS_URL


def _imports_torch(code: str) -> bool:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "CONGEAL_REDIS_URL": REDIS_URL})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] == "True"


def test_api_process_never_imports_torch():
    code = ("import service.app, service.cli, service.embedded, service.client\n"
            "from fastapi.testclient import TestClient\n"
            "import tempfile\n"
            "from service.contracts import Settings\n"
            "app = service.app.create_app(Settings(redis_url=None, allow_open=True, data_dir=tempfile.mkdtemp()))\n"
            "with TestClient(app) as c:\n"
            "    assert c.get('/readyz').status_code == 200\n"
            "    assert c.get('/openapi.json').status_code == 200\n")
    assert not _imports_torch(code)


def test_worker_process_never_imports_torch():
    # Only the training child may: CUDA state must never be created in a process that forks.
    assert not _imports_torch("import worker.app")


def test_the_check_above_can_fail():
    assert _imports_torch("import models.pipeline")


def test_worker_registers_every_task_name_the_api_sends():
    import worker.app

    sent = set(TASK_NAMES.values())
    assert set(TASK_NAMES) == set(JobKind)  # every kind of job has a task
    assert sent <= set(worker.app.app.tasks), sent - set(worker.app.app.tasks)


def test_every_kind_routes_to_a_queue_the_docs_tell_workers_to_consume():
    s = Settings(queue="q")
    assert {queue_for(k, s) for k in JobKind} == {"q", "q.inference"}


def test_api_methods_and_warps_exist_in_the_core():
    from models.geometry import get_family
    from models.catalog import list_methods

    core = set(list_methods())
    assert set(METHODS) <= core, f"the API offers methods the core lacks: {set(METHODS) - core}"
    assert core <= set(METHODS), (f"the core has methods the API does not offer: {core - set(METHODS)}; "
                                  f"add them to METHODS in service/contracts/records.py")
    for w in WARPS:
        get_family(w)


def test_celery_settings_for_long_gpu_jobs():
    conf = celery_config(Settings(redis_url="redis://x", visibility_timeout_s=1234))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] == 1234
    assert Settings().visibility_timeout_s > Settings().job_time_limit_s


def test_artifact_paths_only_for_ids_we_issue(tmp_path):
    a = ArtifactStore(tmp_path)
    jid = new_job_id()
    assert a.job_dir(jid).parent == tmp_path.resolve() / "jobs"
    for bad in ("../etc", "a" * 31, "A" * 32, jid + "/..", ""):
        with pytest.raises(ValueError):
            a.job_dir(bad)
    with pytest.raises(ValueError):
        a.result_file(jid, "../../x")


# ---------------------------------------------------------------------- stores




def _job(owner="alice", key=None, t=None) -> JobRecord:
    r = JobRecord(id=new_job_id(), kind=JobKind.align, owner=owner, idempotency_key=key)
    if t is not None:
        r.created_at = t
    return r


def test_list_is_newest_first_paginated_and_per_owner(store):
    t0 = time.time()
    ids = [store.insert(_job(t=t0 + i))[0].id for i in range(5)]
    store.insert(_job(owner="bob"))
    page, total = store.list("alice", 0, 2)
    assert total == 5 and [r.id for r in page] == ids[::-1][:2]
    page, _ = store.list("alice", 4, 2)
    assert [r.id for r in page] == [ids[0]]
    assert store.list("carol", 0, 10) == ([], 0)


def test_idempotency_key_returns_the_first_job(store):
    a, created_a = store.insert(_job(key="k1"))
    b, created_b = store.insert(_job(key="k1"))
    c, created_c = store.insert(_job(owner="bob", key="k1"))
    assert created_a and not created_b and created_c
    assert b.id == a.id and c.id != a.id
    assert store.find_idempotent("alice", "k1").id == a.id
    assert store.list("alice", 0, 10)[1] == 1


def test_claim_runs_once_and_counts_attempts(store):
    rec, _ = store.insert(_job())
    first = store.claim(rec.id, "w1", lease_ttl_s=30, max_attempts=3)
    assert first.run and first.record.status == JobStatus.running and len(first.record.attempts) == 1
    # A duplicate delivery while w1 holds a live lease must not start a second run, whoever gets it.
    assert not store.claim(rec.id, "w2", 30, 3).run
    assert not store.claim(rec.id, "w1", 30, 3).run
    assert store.get(rec.id).attempts[-1].worker == "w1"


def test_a_dead_workers_job_is_requeued_and_resumed_then_given_up(store):
    rec, _ = store.insert(_job())
    assert store.claim(rec.id, "w1", lease_ttl_s=30, max_attempts=2).run
    assert store.requeue_if_orphaned(rec.id) is None  # its worker holds a live lease
    assert store.renew_lease(rec.id, "w1", 0.05) is not None
    assert store.renew_lease(rec.id, "w2", 30) is None  # not the holder
    time.sleep(0.1)
    back = store.requeue_if_orphaned(rec.id)
    assert back is not None and back.status == JobStatus.queued and back.attempts[0].outcome == "lost"
    second = store.claim(rec.id, "w2", lease_ttl_s=0.05, max_attempts=2)
    assert second.run and [a.n for a in second.record.attempts] == [1, 2]
    # The dead worker's late writes are ignored: it no longer holds the job.
    assert not store.finish(rec.id, "w1", JobStatus.succeeded, result={"x": 1})
    assert not store.report(rec.id, "w1", None, last_epoch=99)
    time.sleep(0.1)
    assert store.requeue_if_orphaned(rec.id) is not None
    third = store.claim(rec.id, "w3", 30, max_attempts=2)
    assert not third.run
    final = store.get(rec.id)
    assert final.status == JobStatus.failed and final.error_kind == "lost"
    assert "stopped without finishing 2 times" in final.error
    assert rec.id not in store.active_ids()


def test_orderly_shutdowns_do_not_count_as_crashes(store):
    rec, _ = store.insert(_job())
    for i in range(4):
        assert store.claim(rec.id, f"w{i}", 30, max_attempts=2).run
        store.release(rec.id, f"w{i}")
        assert store.requeue_if_orphaned(rec.id) is not None
    got = store.get(rec.id)
    assert got.status == JobStatus.queued and [a.outcome for a in got.attempts] == ["interrupted"] * 4


def test_cancel_queued_is_immediate_running_is_flagged(store):
    q, _ = store.insert(_job())
    rec, changed = store.request_cancel(q.id)
    assert changed and rec.status == JobStatus.cancelled
    assert not store.claim(q.id, "w1", 30, 3).run  # its task, delivered later, does nothing
    assert store.request_cancel(q.id)[1] is False

    r, _ = store.insert(_job())
    store.claim(r.id, "w1", 30, 3)
    rec, changed = store.request_cancel(r.id)
    assert changed and rec.status == JobStatus.running and rec.cancel_requested
    assert store.finish(r.id, "w1", JobStatus.cancelled)
    assert store.get(r.id).status == JobStatus.cancelled


def test_finish_records_the_outcome_and_leaves_the_active_set(store):
    rec, _ = store.insert(_job())
    assert rec.id in store.active_ids()
    store.claim(rec.id, "w1", 30, 3)
    assert store.report(rec.id, "w1", None, first_epoch=1)
    assert store.finish(rec.id, "w1", JobStatus.failed, error="boom", error_kind="input")
    got = store.get(rec.id)
    assert (got.status, got.error, got.error_kind, got.attempts[0].first_epoch) == (JobStatus.failed, "boom", "input", 1)
    assert got.finished_at is not None and got.lease_owner is None
    assert rec.id not in store.active_ids()


def test_unsent_queued_job_is_sent_by_the_reconciler_after_a_grace(store):
    rec, _ = store.insert(_job())
    assert store.requeue_if_orphaned(rec.id, grace_s=60) is None
    assert store.requeue_if_orphaned(rec.id, grace_s=0) is not None
    assert store.requeue_if_orphaned(rec.id, grace_s=0) is None  # marked as sent now


def test_updates_are_atomic_under_contention(store):
    rec, _ = store.insert(_job())

    def bump(r: JobRecord) -> JobRecord:
        r = r.model_copy()
        r.input_bytes += 1
        return r

    def work():
        for _ in range(25):
            store.update(rec.id, bump)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(rec.id).input_bytes == 200


def test_worker_heartbeats_expire(store):
    store.heartbeat("w-live", ttl_s=30, info={"kind": "test"})
    store.heartbeat("w-gone", ttl_s=0.05, info={})
    time.sleep(0.2)
    names = {w["name"] for w in store.live_workers()}
    assert "w-live" in names and "w-gone" not in names


def test_one_holder_leads_a_duty_until_its_lease_lapses(store):
    assert store.lead("maintenance", "w1", ttl_s=0.3)
    assert not store.lead("maintenance", "w2", ttl_s=0.3)
    assert store.lead("maintenance", "w1", ttl_s=0.3)  # renewed by its holder
    assert store.lead("other-duty", "w2", ttl_s=0.3)  # roles are independent
    time.sleep(0.45)
    assert store.lead("maintenance", "w2", ttl_s=30)  # w1 stopped renewing
    assert not store.lead("maintenance", "w1", ttl_s=30)
    store.resign("maintenance", "w1")  # not the holder: changes nothing
    assert not store.lead("maintenance", "w1", ttl_s=30)
    store.resign("maintenance", "w2")
    assert store.lead("maintenance", "w1", ttl_s=30)


def test_job_options_reject_unknown_fields_and_values():
    with pytest.raises(ValueError, match="colour"):
        JobOptions(colour="red")
    with pytest.raises(ValueError, match="warp"):
        JobOptions(warp="spiral")


def test_every_setting_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    missing = [f"CONGEAL_{n.upper()}" for n in Settings.model_fields if f"`CONGEAL_{n.upper()}`" not in doc]
    assert not missing, missing


def test_retention_sweep_purges_only_jobs_finished_before_the_ttl(store, tmp_path):
    from service.contracts import ArtifactStore
    from service.execution import sweep_expired

    arts = ArtifactStore(tmp_path)
    old, recent, running = _job(), _job(), _job()
    for r in (old, recent, running):
        store.insert(r)
        arts.input_dir(r.id).mkdir(parents=True)
        (arts.input_dir(r.id) / "a.png").write_bytes(b"x")
    for r, age in ((old, 100.0), (recent, 1.0)):
        store.update(r.id, lambda rec, age=age: rec.model_copy(update={
            "status": JobStatus.succeeded, "finished_at": time.time() - age}))
    assert sweep_expired(store, arts, ttl_s=50) == [old.id]
    assert store.get(old.id) is None and not arts.job_dir(old.id).exists()
    assert old.id not in [r.id for r in store.list("alice", 0, 100)[0]]
    assert store.get(recent.id) is not None and arts.job_dir(recent.id).exists()
    assert store.get(running.id) is not None and arts.job_dir(running.id).exists()
    assert sweep_expired(store, arts, ttl_s=50) == []  # twice is harmless


def test_sweep_removes_an_old_upload_folder_with_no_record_and_nothing_else(store, tmp_path):
    import os

    from service.contracts import ArtifactStore
    from service.execution.maintenance import ORPHAN_FOLDER_GRACE_S, sweep_expired

    arts = ArtifactStore(tmp_path)
    kept = _job()
    store.insert(kept)
    orphan, fresh = new_job_id(), new_job_id()  # an API killed mid-upload left these behind
    for jid in (kept.id, orphan, fresh):
        arts.input_dir(jid).mkdir(parents=True)
        (arts.input_dir(jid) / "a.png").write_bytes(b"x")
    old = time.time() - ORPHAN_FOLDER_GRACE_S - 60
    for jid in (kept.id, orphan):
        for p in (arts.input_dir(jid) / "a.png", arts.input_dir(jid), arts.job_dir(jid)):
            os.utime(p, (old, old))
    assert sweep_expired(store, arts, ttl_s=1) == [orphan]
    assert not arts.job_dir(orphan).exists()
    assert arts.job_dir(kept.id).exists() and arts.job_dir(fresh).exists()  # a record; an upload under way


def test_the_in_flight_limit_is_atomic_with_the_insert(store):
    # Eight uploads racing for a limit of three: exactly three are stored, the rest are
    # refused with the count they saw; an idempotent replay is still answered at the limit.
    from concurrent.futures import ThreadPoolExecutor

    from service.contracts.store import InFlightLimit

    first, _ = store.insert(_job(key="k"), max_in_flight=3)

    def attempt(_):
        try:
            return store.insert(_job(), max_in_flight=3)[1]
        except InFlightLimit as e:
            assert e.count == 3
            return False

    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(attempt, range(8)))
    assert sum(created) == 2 and store.count_in_flight("alice") == 3
    again, created_again = store.insert(_job(key="k"), max_in_flight=3)
    assert again.id == first.id and not created_again
    assert store.insert(_job(owner="bob"), max_in_flight=3)[1]  # per owner
