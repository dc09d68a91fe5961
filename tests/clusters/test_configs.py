"""Every YAML under clusters/ is checked; no test starts Ray.

Launcher configs (any YAML with a top-level ``provider``) go through what Ray itself runs on
them: ``ray up`` calls ``prepare_config`` (merge the provider's defaults.yaml) and then
``validate_config`` (jsonschema against ``ray/autoscaler/ray-schema.json`` plus Ray's own
cross-field checks); the autoscaler started by ``ray start --autoscaling-config`` validates the
file as-is, which is what we do for fake_multinode (its defaults file is missing from the
wheel). On top of that, ``launcher_problems`` checks what matters for bigopt.

KubeRay manifests (``apiVersion: ray.io/...``) get structural checks in ``kuberay_problems``.

Each checker is also run on deliberately broken copies, so every check is shown to fail.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
ALL_YAML = sorted(p for p in CLUSTERS.rglob("*") if p.suffix in (".yaml", ".yml"))

# Providers whose config Ray reads as-is (no defaults merged): the fake multi-node provider is
# started with `ray start --autoscaling-config`, and `ray up` cannot run it.
RAW_PROVIDERS = {"fake_multinode"}
# Keys the autoscaler indexes directly when it (re)loads a raw config.
AUTOSCALER_READS = (
    "file_mounts",
    "cluster_synced_files",
    "worker_setup_commands",
    "worker_start_ray_commands",
)
DEFAULT_SPEC = "jobs/quickstart.yaml"


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def is_launcher(docs: list[dict[str, Any]]) -> bool:
    return len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0]


def is_kuberay(docs: list[dict[str, Any]]) -> bool:
    return any(str(d.get("apiVersion", "")).startswith("ray.io/") for d in docs)


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


LAUNCHER_FILES = [p for p in ALL_YAML if is_launcher(load_docs(p))]
KUBERAY_FILES = [p for p in ALL_YAML if is_kuberay(load_docs(p))]


# --------------------------------------------------------------------------- launcher configs
def ray_validated(config: dict[str, Any]) -> dict[str, Any]:
    """The config as Ray would use it, after Ray's own validation (raises when Ray would)."""
    config = copy.deepcopy(config)
    if config["provider"]["type"] not in RAW_PROVIDERS:
        config = prepare_config(config)
    validate_config(config)
    return config


def _ray_start_commands(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (key, cmd)
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for cmd in cfg.get(key) or []
        if "ray start" in cmd
    ]


def _is_gpu_hardware(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return bool(re.match(r"(g\d|p\d)", node_config.get("InstanceType", "")))
    if provider == "gcp":
        machine = node_config.get("machineType", "").rsplit("/", 1)[-1]
        return machine.startswith(("a2-", "a3-", "a4-", "g2-")) or bool(
            node_config.get("guestAccelerators")
        )
    return False


def launcher_problems(raw: dict[str, Any], text: str) -> list[str]:
    """bigopt's rules for a launcher config; ``raw`` is the file, ``text`` its source."""
    problems: list[str] = []
    cfg = ray_validated(raw)
    provider = cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head_type = cfg.get("head_node_type")
    if head_type not in types:
        return [f"head_node_type {head_type!r} is not in available_node_types"]
    head = types[head_type]

    # The head coordinates; it must not host training.
    if head["resources"].get("GPU", 0):
        problems.append("head declares GPUs")
    if head["resources"].get("CPU") != 0:
        problems.append("head must advertise CPU: 0 (no tasks or training on the head)")

    # Scaling bounds.
    for name, nt in types.items():
        lo, hi = nt.get("min_workers", 0), nt.get("max_workers", cfg["max_workers"])
        if lo > hi:
            problems.append(f"{name}: min_workers {lo} > max_workers {hi}")
        if name != head_type and hi > cfg["max_workers"]:
            problems.append(f"{name}: max_workers {hi} > global max_workers")

    # GPU node types declare their GPUs (the autoscaler only knows what `resources` says).
    workers = {n: nt for n, nt in types.items() if n != head_type}
    for name, nt in workers.items():
        hw = _is_gpu_hardware(provider, nt["node_config"])
        gpus = nt["resources"].get("GPU", 0)
        if hw and gpus < 1:
            problems.append(f"{name}: GPU instance type without a GPU resource")
        if gpus and not hw and provider not in RAW_PROVIDERS:
            problems.append(f"{name}: declares GPU on a machine type without GPUs")
    if provider not in RAW_PROVIDERS:
        if not any(nt["resources"].get("GPU", 0) for nt in workers.values()):
            problems.append("no GPU worker type for training")
        if not any(not nt["resources"].get("GPU", 0) for nt in workers.values()):
            problems.append("no CPU-only worker type for Ray Data")

    # A per-type worker_setup_commands *replaces* setup_commands for that type.
    for name, nt in types.items():
        if "worker_setup_commands" in nt:
            missing = [
                c for c in raw.get("setup_commands", []) if c not in nt["worker_setup_commands"]
            ]
            if missing:
                problems.append(f"{name}: worker_setup_commands drop setup_commands {missing}")

    # Nothing listens on every interface; the dashboard stays on the head's loopback.
    if "0.0.0.0" in text:
        problems.append("file mentions 0.0.0.0")
    for key, cmd in _ray_start_commands(cfg):
        if "--head" in cmd and "--dashboard-host=127.0.0.1" not in cmd:
            problems.append(f"{key}: head must start with --dashboard-host=127.0.0.1")
        if "0.0.0.0" in cmd:
            problems.append(f"{key}: binds 0.0.0.0")
        if provider not in RAW_PROVIDERS and "RAY_AUTH_MODE=token" not in cmd:
            problems.append(f"{key}: ray start without RAY_AUTH_MODE=token")
    if provider not in RAW_PROVIDERS:
        if not cfg.get("head_start_ray_commands"):
            problems.append("head_start_ray_commands is empty")
        if "~/.ray/auth_token" not in cfg.get("file_mounts", {}):
            problems.append("file_mounts does not ship ~/.ray/auth_token to the nodes")

    # Versions: the cluster runs the Ray the project pins (ray up needs them to match).
    for pinned in re.findall(r"\bray(?:\[[^\]]*\])?==([\w.]+)", text):
        if pinned != ray.__version__:
            problems.append(f"pins ray=={pinned}, project uses {ray.__version__}")

    # Storage: the nodes that write checkpoints and shards can reach the bucket.
    for name, nt in workers.items():
        node_config = nt["node_config"]
        if provider == "aws" and "IamInstanceProfile" not in node_config:
            problems.append(f"{name}: no IamInstanceProfile (S3 access)")
        if provider == "gcp" and not node_config.get("serviceAccounts"):
            problems.append(f"{name}: no serviceAccounts (Cloud Storage access)")
    if provider == "aws":
        region = cfg["provider"].get("region")
        for found in set(re.findall(r"AWS_REGION=([\w-]+)", text)):
            if found != region:
                problems.append(f"AWS_REGION={found} differs from provider.region {region}")

    if provider in RAW_PROVIDERS:
        if head_type != FAKE_HEAD_NODE_TYPE:
            problems.append(f"fake_multinode head type must be named {FAKE_HEAD_NODE_TYPE}")
        problems += [f"missing key {k}" for k in AUTOSCALER_READS if k not in raw]
        problems += [
            f"{n}: set min_workers and max_workers (no defaults are merged)"
            for n, nt in raw["available_node_types"].items()
            if "min_workers" not in nt or "max_workers" not in nt
        ]
    return problems


@pytest.fixture(params=LAUNCHER_FILES, ids=_rel)
def launcher(request) -> tuple[dict[str, Any], str]:
    path: Path = request.param
    return load_docs(path)[0], path.read_text()


def test_every_yaml_is_covered():
    assert {p.name for p in LAUNCHER_FILES} >= {"aws.yaml", "gcp.yaml", "fake_multinode.yaml"}
    assert {p.name for p in KUBERAY_FILES} >= {"raycluster.yaml", "rayjob.yaml"}
    unchecked = [_rel(p) for p in ALL_YAML if p not in LAUNCHER_FILES + KUBERAY_FILES]
    assert unchecked == [], "neither a launcher config nor a KubeRay manifest"


def test_readme_lists_every_config():
    readme = (CLUSTERS / "README.md").read_text()
    missing = [_rel(p) for p in ALL_YAML if str(p.relative_to(CLUSTERS)) not in readme]
    assert missing == []


def test_launcher_passes_ray_schema(launcher):
    raw, _ = launcher
    cfg = ray_validated(raw)
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_launcher_bigopt_rules(launcher):
    raw, text = launcher
    assert launcher_problems(raw, text) == []


def _a_worker(cfg: dict[str, Any]) -> str:
    return next(n for n in cfg["available_node_types"] if n != cfg["head_node_type"])


def _gpu_worker(cfg: dict[str, Any]) -> str | None:
    return next(
        (n for n, nt in cfg["available_node_types"].items() if nt["resources"].get("GPU")), None
    )


def test_ray_schema_rejects_node_type_without_resources(launcher):
    raw = copy.deepcopy(launcher[0])
    del raw["available_node_types"][_a_worker(raw)]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        ray_validated(raw)


def test_ray_schema_rejects_unknown_key(launcher):
    raw = copy.deepcopy(launcher[0])
    raw["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        ray_validated(raw)


def test_ray_rejects_missing_head_type(launcher):
    raw = copy.deepcopy(launcher[0])
    raw["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validated(raw)


def test_ray_rejects_min_workers_above_global_max(launcher):
    raw = copy.deepcopy(launcher[0])
    raw["available_node_types"][_a_worker(raw)]["min_workers"] = raw["max_workers"] + 1
    raw["available_node_types"][_a_worker(raw)]["max_workers"] = raw["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        ray_validated(raw)


def test_rules_reject_min_above_max(launcher):
    raw, text = copy.deepcopy(launcher[0]), launcher[1]
    nt = raw["available_node_types"][_a_worker(raw)]
    nt["min_workers"], nt["max_workers"] = 2, 1
    assert any("min_workers 2 > max_workers 1" in p for p in launcher_problems(raw, text))


def test_rules_reject_gpu_head(launcher):
    raw, text = copy.deepcopy(launcher[0]), launcher[1]
    raw["available_node_types"][raw["head_node_type"]]["resources"]["GPU"] = 1
    assert "head declares GPUs" in launcher_problems(raw, text)


def test_rules_reject_public_dashboard(launcher):
    raw, text = copy.deepcopy(launcher[0]), launcher[1]
    assert launcher_problems(raw, text.replace("127.0.0.1", "0.0.0.0")) != []
    if raw["head_start_ray_commands"]:
        # Without our head command Ray's defaults.yaml (dashboard on 0.0.0.0) would apply.
        del raw["head_start_ray_commands"]
        problems = launcher_problems(raw, text)
        assert any("--dashboard-host=127.0.0.1" in p for p in problems)


def test_rules_reject_gpu_type_without_gpu_resource(launcher):
    raw, text = copy.deepcopy(launcher[0]), launcher[1]
    name = _gpu_worker(raw)
    if name is None:
        pytest.skip("no GPU node type in this config")
    del raw["available_node_types"][name]["resources"]["GPU"]
    assert f"{name}: GPU instance type without a GPU resource" in launcher_problems(raw, text)


def test_rules_reject_type_setup_that_drops_global_setup(launcher):
    raw, text = copy.deepcopy(launcher[0]), launcher[1]
    if not raw.get("setup_commands"):
        pytest.skip("no setup_commands to drop")
    raw["available_node_types"][_a_worker(raw)]["worker_setup_commands"] = ["echo only"]
    assert any("drop setup_commands" in p for p in launcher_problems(raw, text))


def test_rules_reject_auth_disabled(launcher):
    raw, text = copy.deepcopy(launcher[0]), launcher[1]
    if raw["provider"]["type"] in RAW_PROVIDERS:
        pytest.skip("the local cluster is started by hand")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        raw[key] = [c.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled") for c in raw[key]]
    assert any("RAY_AUTH_MODE=token" in p for p in launcher_problems(raw, text))


# --------------------------------------------------------------------------- KubeRay manifests
def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return (pod_template.get("spec") or {}).get("containers") or []


def _resources(container: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    res = container.get("resources") or {}
    return res.get("requests") or {}, res.get("limits") or {}


def spec_path_of(entrypoint: str) -> str | None:
    """The job spec that ``bigopt run SPEC ...`` names, or None if it is not such a command."""
    argv = shlex.split(entrypoint)
    if argv[:2] != ["bigopt", "run"]:
        return None
    positional = [a for a in argv[2:] if not a.startswith("-")]
    # `--set a=b` takes a value; the spec is the first positional that is not such a value.
    values = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"}
    return next((a for a in positional if a not in values), None)


def cluster_spec_problems(spec: dict[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}: enableInTreeAutoscaling must be true")
    if "idleTimeoutSeconds" not in (spec.get("autoscalerOptions") or {}):
        problems.append(f"{where}: autoscalerOptions.idleTimeoutSeconds not set")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}: authOptions.mode must be token")
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')} != {ray.__version__}")

    head = spec.get("headGroupSpec") or {}
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{where}: head must stay inside the cluster (ClusterIP, no ingress)")
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        problems.append(f'{where}: head rayStartParams num-cpus must be "0"')
    if (head.get("rayStartParams") or {}).get("dashboard-host") == "0.0.0.0":
        problems.append(f"{where}: dashboard-host 0.0.0.0")
    pods = [("head", head.get("template") or {})]
    for c in _containers(head.get("template") or {}):
        if "nvidia.com/gpu" in _resources(c)[1]:
            problems.append(f"{where}: head requests GPUs")

    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        problems.append(f"{where}: duplicate groupName")
    gpu_groups = 0
    for g in groups:
        name = f"{where}/{g.get('groupName')}"
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not isinstance(lo, int) or not isinstance(hi, int):
            problems.append(f"{name}: minReplicas and maxReplicas must be set")
        elif not 0 <= lo <= hi:
            problems.append(f"{name}: minReplicas {lo} > maxReplicas {hi}")
        elif not lo <= g.get("replicas", lo) <= hi:
            problems.append(f"{name}: replicas outside [minReplicas, maxReplicas]")
        pods.append((name, g.get("template") or {}))
        gpu_containers = [
            c
            for c in _containers(g.get("template") or {})
            if "nvidia.com/gpu" in _resources(c)[0] or "nvidia.com/gpu" in _resources(c)[1]
        ]
        for c in gpu_containers:
            req, lim = _resources(c)
            if req.get("nvidia.com/gpu") is None or int(req["nvidia.com/gpu"]) < 1:
                problems.append(f"{name}: GPU container must request nvidia.com/gpu")
        gpu_groups += bool(gpu_containers)
    if gpu_groups == 0:
        problems.append(f"{where}: no GPU worker group (nvidia.com/gpu) for training")
    if gpu_groups == len(groups):
        problems.append(f"{where}: no CPU worker group for Ray Data")

    for name, template in pods:
        if not _containers(template):
            problems.append(f"{name}: no containers")
        for c in _containers(template):
            req, lim = _resources(c)
            if not c.get("image"):
                problems.append(f"{name}: container without image")
            if not req or req != lim:
                problems.append(f"{name}: resources requests must equal limits")
    return problems


def kuberay_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    accounts = {d["metadata"]["name"] for d in docs if d.get("kind") == "ServiceAccount"}
    ray_docs = [d for d in docs if str(d.get("apiVersion", "")).startswith("ray.io/")]
    if not ray_docs:
        return ["no ray.io resource"]
    for d in ray_docs:
        kind, name = d.get("kind"), (d.get("metadata") or {}).get("name")
        where = f"{kind}/{name}"
        if d.get("apiVersion") != "ray.io/v1":
            problems.append(f"{where}: apiVersion must be ray.io/v1")
        spec = d.get("spec") or {}
        if kind == "RayCluster":
            cluster = spec
        elif kind == "RayJob":
            cluster = spec.get("rayClusterSpec") or {}
            entry = spec.get("entrypoint", "")
            spec_path = spec_path_of(entry)
            if spec_path is None:
                problems.append(f"{where}: entrypoint must run `bigopt run SPEC`: {entry!r}")
            elif spec_path != DEFAULT_SPEC and not (REPO / spec_path).is_file():
                problems.append(f"{where}: spec {spec_path} does not exist in the repo")
            if spec.get("shutdownAfterJobFinishes") is not True:
                problems.append(f"{where}: shutdownAfterJobFinishes must be true")
            ttl = spec.get("ttlSecondsAfterFinished")
            if not isinstance(ttl, int) or ttl < 0:
                problems.append(f"{where}: ttlSecondsAfterFinished must be a non-negative int")
            if "runtimeEnvYAML" in spec and not isinstance(
                yaml.safe_load(spec["runtimeEnvYAML"]), dict
            ):
                problems.append(f"{where}: runtimeEnvYAML is not a YAML mapping")
            if not cluster:
                problems.append(f"{where}: no rayClusterSpec")
                continue
        else:
            problems.append(f"{where}: unexpected kind")
            continue
        problems += cluster_spec_problems(cluster, where)
        templates = [cluster.get("headGroupSpec", {}).get("template") or {}] + [
            g.get("template") or {} for g in cluster.get("workerGroupSpecs") or []
        ]
        used = {(t.get("spec") or {}).get("serviceAccountName") for t in templates} - {None}
        problems += [
            f"{where}: serviceAccountName {sa} is not defined in the file"
            for sa in sorted(used - accounts)
        ]
    return problems


@pytest.fixture(params=KUBERAY_FILES, ids=_rel)
def manifest(request) -> list[dict[str, Any]]:
    return load_docs(request.param)


def _cluster_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in docs:
        if d.get("kind") == "RayCluster":
            out.append(d["spec"])
        elif d.get("kind") == "RayJob":
            out.append(d["spec"]["rayClusterSpec"])
    return out


def test_kuberay_manifest(manifest):
    assert kuberay_problems(manifest) == []


def test_kuberay_rejects_min_above_max(manifest):
    docs = copy.deepcopy(manifest)
    group = _cluster_specs(docs)[0]["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"] = 3, 2
    assert any("minReplicas 3 > maxReplicas 2" in p for p in kuberay_problems(docs))


def test_kuberay_rejects_gpu_requests_not_limits(manifest):
    docs = copy.deepcopy(manifest)
    for spec in _cluster_specs(docs):
        for g in spec["workerGroupSpecs"]:
            for c in _containers(g["template"]):
                if "nvidia.com/gpu" in _resources(c)[1]:
                    del c["resources"]["requests"]["nvidia.com/gpu"]
    problems = kuberay_problems(docs)
    assert any("must request nvidia.com/gpu" in p for p in problems)
    assert any("requests must equal limits" in p for p in problems)


def test_kuberay_rejects_no_autoscaling_or_no_auth(manifest):
    docs = copy.deepcopy(manifest)
    spec = _cluster_specs(docs)[0]
    spec["enableInTreeAutoscaling"] = False
    spec["authOptions"] = {"mode": "disabled"}
    problems = kuberay_problems(docs)
    assert any("enableInTreeAutoscaling" in p for p in problems)
    assert any("authOptions.mode" in p for p in problems)


def test_kuberay_rejects_undefined_service_account(manifest):
    docs = [d for d in copy.deepcopy(manifest) if d.get("kind") != "ServiceAccount"]
    assert any("serviceAccountName bigopt-ray" in p for p in kuberay_problems(docs))


def test_kuberay_rejects_exposed_head(manifest):
    docs = copy.deepcopy(manifest)
    _cluster_specs(docs)[0]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert any("ClusterIP" in p for p in kuberay_problems(docs))


@pytest.mark.parametrize(
    ("entrypoint", "ok"),
    [
        ("bigopt run jobs/quickstart.yaml", True),
        ("bigopt run --set train.max_steps=5 jobs/quickstart.yaml", True),
        ("bigopt run jobs/no_such_spec.yaml", False),
        ("python -m bigopt.cli run jobs/quickstart.yaml", False),
        ("bigopt validate jobs/quickstart.yaml", False),
        ("bigopt run --set storage=s3://b/p", False),
    ],
)
def test_rayjob_entrypoint_check(entrypoint, ok):
    rayjobs = [p for p in KUBERAY_FILES if any(d.get("kind") == "RayJob" for d in load_docs(p))]
    assert rayjobs, "no RayJob manifest under clusters/"
    docs = load_docs(rayjobs[0])
    for d in docs:
        if d.get("kind") == "RayJob":
            d["spec"]["entrypoint"] = entrypoint
    problems = [p for p in kuberay_problems(docs) if "entrypoint" in p or "spec " in p]
    assert (problems == []) is ok, problems
