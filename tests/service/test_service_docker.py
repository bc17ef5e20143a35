"""docker-compose.yml and Dockerfile, checked without Docker (none runs in CI).

Also validated by hand with ``docker-compose config`` (1.29) and ``hadolint``;
these tests keep the properties the service depends on from drifting.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.contracts import Settings, queue_for
from service.contracts.records import JobKind

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _stages() -> dict[str, str]:
    """Dockerfile text per stage name."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M | re.I)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_compose_services_and_healthchecks(compose):
    svc = compose["services"]
    assert set(svc) == {"redis", "api", "worker"}
    for name, s in svc.items():
        assert s["healthcheck"]["test"], name
    for name in ("api", "worker"):
        assert svc[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_keeps_an_append_only_file_on_a_volume(compose):
    r = compose["services"]["redis"]
    cmd = r["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in r["volumes"])


def test_api_and_workers_share_the_artifact_volume_and_redis(compose):
    svc = compose["services"]
    mounts = {}
    for name in ("api", "worker"):
        env = svc[name]["environment"]
        vol = [v for v in svc[name]["volumes"] if v.startswith("artifacts:")]
        assert len(vol) == 1, name
        mounts[name] = vol[0].split(":")[1]
        assert env["CONGEAL_DATA_DIR"] == mounts[name]
        assert env["CONGEAL_REDIS_URL"].startswith("redis://redis:")
        # As compose interpolates with the variable unset on the host: '${X:-default}' -> default.
        env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}
        s = Settings(**{k[len("CONGEAL_"):].lower(): v for k, v in env.items()})
        assert s.visibility_timeout_s > s.job_time_limit_s  # no redelivery of a job that is still running
    assert mounts["api"] == mounts["worker"]
    assert "artifacts" in compose["volumes"] and "redis-data" in compose["volumes"]


def test_each_worker_reserves_one_gpu_and_can_be_scaled(compose):
    w = compose["services"]["worker"]
    (dev,) = w["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in dev["capabilities"] and dev["count"] == 1
    # --scale worker=N needs no fixed container name and no host port.
    assert "container_name" not in w and "ports" not in w
    assert w["build"]["target"] == "worker" and compose["services"]["api"]["build"]["target"] == "api"


def test_dockerfile_api_image_has_no_torch_but_every_other_dependency():
    stages = _stages()
    assert {"base", "api", "worker"} <= set(stages)
    api = stages["api"]
    assert "torch" not in api.lower() and "cuda" not in api.lower()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    worker_only = {"torch", "safetensors", "tqdm"}
    for d in deps:
        name = re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower()
        if name not in worker_only:
            assert re.search(rf'"{re.escape(name)}[\[<>=" ]', api, re.I), f"API image lacks {d}"
    assert "--no-deps" in api  # so installing the package cannot pull torch in


def test_dockerfile_worker_runs_celery_on_both_queues_as_non_root():
    stages = _stages()
    w = stages["worker"]
    assert "torch" in w and "celery" in w and "worker.app" in w and "--concurrency=1" in w
    s = Settings()
    queues = re.search(r'"-Q",\s*"([^"]+)"', w).group(1).split(",")
    assert set(queues) == {queue_for(k, s) for k in JobKind}
    for name in ("api", "worker"):
        assert re.search(r"^USER\s+(?!root|0\b)\S+", stages[name], re.M), name
        assert "HEALTHCHECK" in stages[name]


def test_dockerfile_copies_only_what_exists_and_dockerignore_keeps_data_out():
    text = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(\S+)", text, re.M):
        if src != "README.md":  # written by the lead alongside; checked in the README's own tests
            assert (ROOT / src).exists(), src
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "congeal-data"} <= set(ignore)


@pytest.mark.integration
def test_worker_healthcheck_sees_its_own_heartbeat(worker_env):
    run = lambda env: subprocess.run([sys.executable, "-m", "worker.health"], capture_output=True, text=True,  # noqa: E731
                                     env={**os.environ, **env}, timeout=60)
    ok = run(worker_env.vars)
    assert ok.returncode == 0 and ok.stdout.startswith("healthy"), ok.stderr
    other = run({**worker_env.vars, "CONGEAL_KEY_PREFIX": "congeal-test-nobody"})
    assert other.returncode == 1 and "no recent heartbeat" in other.stderr
