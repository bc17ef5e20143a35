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

from service.compose import compose_file
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


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, as far as these files use it: ${X}, ${X:-default}, ${X:?error}."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, str(value))


def _workers(compose: dict) -> dict[str, dict]:
    return {k: v for k, v in compose["services"].items() if k.startswith("worker")}


def test_the_committed_compose_file_is_the_generated_one(compose):
    assert (ROOT / "docker-compose.yml").read_text() == compose_file(1)
    assert set(compose["services"]) == {"redis", "api", "worker-gpu0"}


def test_compose_services_and_healthchecks(compose):
    svc = compose["services"]
    for name, s in svc.items():
        assert s["healthcheck"]["test"], name
        if name != "redis":
            assert s["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_keeps_an_append_only_file_on_a_volume(compose):
    r = compose["services"]["redis"]
    cmd = r["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in r["volumes"])


def test_compose_refuses_to_start_without_api_keys(compose):
    """'${CONGEAL_API_KEYS:?...}': compose stops before starting anything when the key is unset
    (the API would refuse to start anyway, and then restart in a loop under 'unless-stopped')."""
    for name in ("api", *_workers(compose)):
        raw = compose["services"][name]["environment"]["CONGEAL_API_KEYS"]
        with pytest.raises(ValueError, match="set CONGEAL_API_KEYS"):
            _interpolate(raw, {})
        with pytest.raises(ValueError, match="set CONGEAL_API_KEYS"):
            _interpolate(raw, {"CONGEAL_API_KEYS": ""})  # ':?' refuses an empty value too
        assert _interpolate(raw, {"CONGEAL_API_KEYS": "alice:" + "0" * 64}) == "alice:" + "0" * 64


def test_api_and_workers_share_the_artifact_volume_and_redis(compose):
    svc = compose["services"]
    mounts = {}
    for name in ("api", *_workers(compose)):
        env = svc[name]["environment"]
        vol = [v for v in svc[name]["volumes"] if v.startswith("artifacts:")]
        assert len(vol) == 1, name
        mounts[name] = vol[0].split(":")[1]
        assert env["CONGEAL_DATA_DIR"] == mounts[name]
        assert env["CONGEAL_REDIS_URL"].startswith("redis://redis:")
        env = {k: _interpolate(v, {"CONGEAL_API_KEYS": "alice:" + "0" * 64}) for k, v in env.items()}
        s = Settings(**{k[len("CONGEAL_"):].lower(): v for k, v in env.items()})
        assert s.visibility_timeout_s > s.job_time_limit_s  # no redelivery of a job that is still running
    assert len(set(mounts.values())) == 1
    assert "artifacts" in compose["volumes"] and "redis-data" in compose["volumes"]


@pytest.mark.parametrize("gpus,per_worker", [(4, 1), (["1", "3"], 1), (4, 2), (8, 4)])
def test_each_generated_worker_holds_its_own_gpus(gpus, per_worker):
    """One worker service per GPU (or group): its own device ids, disjoint from every other
    worker's, together every GPU asked for; --scale cannot do this (every replica gets the same
    device request)."""
    compose = yaml.safe_load(compose_file(gpus, per_worker))
    ids = [str(g) for g in (range(gpus) if isinstance(gpus, int) else gpus)]
    workers = _workers(compose)
    assert len(workers) == len(ids) // per_worker
    held, names = [], set()
    for name, w in workers.items():
        (dev,) = w["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and "count" not in dev
        assert len(dev["device_ids"]) == per_worker and all(isinstance(i, str) for i in dev["device_ids"])
        held += dev["device_ids"]
        cmd = w["command"]
        assert cmd[:4] == ["celery", "-A", "worker.app", "worker"] and "--concurrency=1" in cmd
        assert set(cmd[cmd.index("-Q") + 1].split(",")) == {queue_for(k, Settings()) for k in JobKind}
        names.add(cmd[cmd.index("-n") + 1].split("@")[0])
        env = w["environment"]
        assert env["CONGEAL_DEVICE"] == "cuda" and env["CONGEAL_MAX_GPUS_PER_JOB"] == str(per_worker)
        assert w["build"]["target"] == "worker" and w["healthcheck"]["test"] and w["restart"] == "unless-stopped"
        assert "container_name" not in w and "ports" not in w
    assert sorted(held) == sorted(ids)  # each GPU held by exactly one worker
    assert len(names) == len(workers)  # distinct Celery node names
    # The API accepts jobs over as many GPUs as one worker holds, and no more.
    assert compose["services"]["api"]["environment"]["CONGEAL_MAX_GPUS_PER_JOB"] == str(per_worker)
    assert compose["services"]["api"]["build"]["target"] == "api"


def test_congeal_compose_writes_the_file_and_refuses_a_bad_split(tmp_path):
    out = tmp_path / "compose.yml"
    r = subprocess.run([sys.executable, "-m", "congeal", "compose", "--gpus", "0,2", "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert set(_workers(yaml.safe_load(out.read_text()))) == {"worker-gpu0", "worker-gpu2"}
    assert out.read_text().startswith("# Generated by `congeal compose --gpus 0,2`")
    r = subprocess.run([sys.executable, "-m", "congeal", "compose", "--gpus", "3", "--gpus-per-worker", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "congeal compose: error: 3 GPU(s) do not split into workers of 2"


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


def _pins() -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    return dict(ln.split("==") for ln in lines if ln)


def test_constraints_pin_every_dependency_within_what_pyproject_allows():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _pins()
    assert all(canonicalize_name(n) == n for n in pins)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        r = Requirement(spec)
        name = canonicalize_name(r.name)
        assert name in pins, f"constraints.txt does not pin {name}"
        assert r.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {spec}"
    assert pins["torch"] == "2.13.0"


def test_ci_and_both_images_install_from_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    installs = [ln for ln in ci.splitlines() if "pip install" in ln]
    assert installs and all("-c constraints.txt" in ln for ln in installs)
    assert f'"torch=={_pins()["torch"]}"' in ci
    assert f"pip install torch=={_pins()['torch']}" in (ROOT / "README.md").read_text()
    text = (ROOT / "Dockerfile").read_text()
    base = _stages()["base"]
    assert "COPY constraints.txt" in base and "PIP_CONSTRAINT=/app/constraints.txt" in base  # every stage, every pip
    assert f'pip install "torch=={_pins()["torch"]}"' in _stages()["worker"]
    assert text.index("PIP_CONSTRAINT") < text.index("RUN pip install")


def test_this_environment_is_the_pinned_one():
    """CI installs with the constraints (.ci/run): what the tests run on is what the images get."""
    import importlib.metadata as md

    for name, version in _pins().items():
        assert md.version(name).split("+")[0] == version, name
