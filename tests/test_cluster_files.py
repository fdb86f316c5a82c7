"""The cluster files parse, match Ray 2.60's schema, and keep their security promises.

ray_cluster.yaml is checked against Ray's own cluster-launcher JSON schema; every
documented job entrypoint (RayJob manifest, cluster/README.md) must name a real job module
and config, and its key=value overrides must pass dvsa's config validation, with
checkpoints and the MLflow store on the shared volume.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from dvsa.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
RAYJOB = REPO / "cluster" / "rayjob.yaml"
RESULTS_POD = REPO / "cluster" / "results-pod.yaml"
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
GUIDE = REPO / "cluster" / "README.md"

IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
PINNED_TAG = re.compile(r"^[\w./-]+:(?!latest$|nightly)[\w.-]*\d[\w.-]*$")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def _entrypoint_config(cmd: str):
    """`python -m jobs.NAME --config configs/X.yaml k=v ...` -> the validated Config."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"], cmd
    module = argv[2]
    assert module.startswith("jobs."), cmd
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"no module {module}"
    assert argv[3] == "--config", cmd
    config = argv[4]
    assert config.startswith("configs/") and (REPO / config).is_file(), f"no config {config}"
    overrides = argv[5:]
    assert all("=" in o for o in overrides), overrides
    return load_config(REPO / config, overrides)     # raises ConfigError on a bad key/value


# --------------------------------------------------------------------------- ray_cluster.yaml


@pytest.fixture(scope="module")
def launcher() -> dict:
    return _load(CLUSTER_YAML)


def test_cluster_yaml_matches_ray_schema(launcher):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    validate_config(launcher)                      # Ray's own ray-schema.json
    with pytest.raises(jsonschema.ValidationError):
        validate_config({**launcher, "dashbaord_host": "x"})   # the schema is strict on keys


def test_cluster_yaml_image_and_node_types(launcher):
    assert launcher["docker"]["image"] == IMAGE
    assert PINNED_TAG.match(launcher["docker"]["image"])
    assert launcher["provider"]["type"] == "aws"
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    for t in gpu_types.values():
        assert re.match(r"^(g5|g6|p4d|p5)\.", t["node_config"]["InstanceType"])
    assert all(0 < t["max_workers"] <= launcher["max_workers"] for t in gpu_types.values())


def test_cluster_yaml_security(launcher):
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text and "::/0" not in text
    head_cmds = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in launcher[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    # the token reaches every node; no extra public ingress rules
    assert launcher["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for rule in launcher["provider"].get("security_group", {}).get("IpPermissions", []):
        for r in rule.get("IpRanges", []):
            assert r["CidrIp"] != "0.0.0.0/0"


def test_cluster_yaml_installs_the_project_and_mounts_shared_storage(launcher):
    assert launcher["file_mounts"]["~/dvsa"] == "."
    assert any("cd ~/dvsa" in c and "pip install" in c and "-e ." in c
               for c in launcher["setup_commands"])
    assert ".venv" in launcher["rsync_exclude"]
    init = " ".join(launcher["initialization_commands"])
    assert "mount -t nfs4" in init and "/mnt/efs" in init
    assert "-v /mnt/efs:/mnt/efs" in launcher["docker"]["run_options"]


# --------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    docs = _docs(RAYJOB)
    assert set(docs) == {"PersistentVolumeClaim", "NetworkPolicy", "RayJob"}
    return docs


def _pod_specs(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    out = {"head": spec["headGroupSpec"]["template"]}
    for g in spec["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]
    return out


def test_rayjob_groups_and_auth(kuberay):
    job = kuberay["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    assert job["spec"]["submissionMode"] == "SidecarMode"   # submitter reaches the head via localhost
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "dashboard-host" not in head["rayStartParams"] or \
        head["rayStartParams"]["dashboard-host"] != "0.0.0.0"
    pods = _pod_specs(job)
    head_res = pods["head"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {})
    gpu_groups = [p for n, p in pods.items() if n != "head"
                  and int(p["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no GPU worker group"
    for p in pods.values():
        image = p["spec"]["containers"][0]["image"]
        assert PINNED_TAG.match(image), image


def test_rayjob_shared_volume_and_network_policy(kuberay):
    pvc, policy, job = kuberay["PersistentVolumeClaim"], kuberay["NetworkPolicy"], kuberay["RayJob"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    label = policy["spec"]["podSelector"]["matchLabels"]
    for name, pod in _pod_specs(job).items():
        assert label.items() <= pod["metadata"]["labels"].items(), name
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert [mounts[n] for n, c in claims.items() if c == pvc["metadata"]["name"]] == ["/mnt/dvsa"], name
    # only the operator gets in from outside the job's pods, and only on the dashboard port
    outside = [r for r in policy["spec"]["ingress"]
               if not all(f.get("podSelector", {}).get("matchLabels") == label and "namespaceSelector" not in f
                          for f in r["from"])]
    assert outside and all(r.get("ports") == [{"protocol": "TCP", "port": 8265}] for r in outside)


def test_rayjob_entrypoint_is_a_real_job_on_shared_storage(kuberay):
    job = kuberay["RayJob"]
    cfg = _entrypoint_config(job["spec"]["entrypoint"])
    assert cfg.train.use_gpu is True
    assert cfg.train.storage_path.startswith("/mnt/dvsa/")
    assert cfg.mlflow.tracking_uri.startswith("sqlite:////mnt/dvsa/")
    assert cfg.data.shards.startswith(("/mnt/dvsa/", "s3://", "gs://"))
    workers = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert cfg.train.num_workers <= sum(g["maxReplicas"] for g in workers)
    # CPU accounting with autoscaling off: the Train workers plus one CPU per decode task fit
    # the worker pods' CPUs (the head has num-cpus 0)
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is False and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    cpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in workers)
    needed = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.decode_concurrency
    assert needed <= cpus, (needed, cpus)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/dvsa"               # WORKDIR of cluster/Dockerfile
    _assert_merges_with_driver_env(env)
    assert "WORKDIR /home/ray/dvsa" in DOCKERFILE.read_text()


def test_results_pod_binds_mlflow_to_loopback():
    pod = _load(RESULTS_POD)
    cmd = pod["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "dvsa-shared"


def _content(path: Path) -> str:
    """What a file configures, comments left out (YAML re-dumped, Dockerfile '#' lines dropped)."""
    if path.suffix == ".yaml":
        return "\n".join(yaml.safe_dump(d) for d in yaml.safe_load_all(path.read_text()) if d)
    return "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))


def test_no_public_binding_anywhere():
    for path in (CLUSTER_YAML, RAYJOB, RESULTS_POD, RUNTIME_ENV, DOCKERFILE):
        text = _content(path)
        assert "0.0.0.0" not in text, path
        assert not re.search(r"dashboard-host[= :\"']+0", text), path
        assert not re.search(r"\b(LoadBalancer|NodePort|kind:\s*Ingress)\b", text), path
        assert not re.search(r":latest\b", text), path


# --------------------------------------------------------------------------- image, runtime_env, guide


def test_dockerfile_pins_the_image_and_installs_the_project():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == [IMAGE]
    assert re.search(r'pip install .*\s"\.\[cluster\]"(\s|$)', text)     # with the PostgreSQL driver
    for d in ("dvsa", "jobs", "configs"):
        assert re.search(rf"^COPY .*\b{d} ", text, re.M), d


def _assert_merges_with_driver_env(env: dict) -> None:
    """The Train workers run with runtime_env={"env_vars": QUIET_ENV} (build_trainer's
    worker_runtime_env); Ray fails them if that cannot merge with the submitted runtime_env (any
    shared env var key is a conflict)."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from dvsa.runtime import QUIET_ENV

    assert _merge_runtime_env(env, {"env_vars": dict(QUIET_ENV)}) is not None, \
        set(env.get("env_vars", {})) & set(QUIET_ENV)


def test_runtime_env_is_valid_and_ships_a_small_working_dir():
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    from ray.runtime_env import RuntimeEnv

    env = _load(RUNTIME_ENV)
    RuntimeEnv(**env)                           # Ray's own validation of the fields
    _assert_merges_with_driver_env(env)
    assert env["working_dir"] == "."
    shipped: list[Path] = []
    _dir_travel(REPO, [_get_excludes(REPO, env["excludes"])],
                lambda p: shipped.append(p) if p.is_file() else None, include_gitignore=False)
    rel = [p.relative_to(REPO).parts[0] for p in shipped]
    assert ".venv" not in rel and ".git" not in rel and "runs" not in rel
    assert "configs" in rel and "jobs" in rel
    size = sum(p.stat().st_size for p in shipped)
    assert size < 50 * 2**20, f"working dir upload is {size / 2**20:.1f} MiB"


def _guide_commands() -> list[str]:
    """Shell commands of the guide's indented code blocks, continuation lines joined."""
    text = GUIDE.read_text()
    cmds, cur = [], ""
    for line in text.splitlines():
        if not line.startswith("       ") or not line.strip():
            if cur:
                cmds.append(cur)
            cur = ""
            continue
        part = line.strip()
        cur = f"{cur} {part.rstrip(chr(92)).strip()}" if cur else part.rstrip(chr(92)).strip()
        if not part.endswith("\\"):
            cmds.append(cur)
            cur = ""
    return cmds


def test_guide_covers_the_lifecycle_and_its_jobs_validate():
    cmds = _guide_commands()
    joined = "\n".join(cmds)
    for needed in ("ray up", "ray dashboard", "ray job submit", "ray job logs -f", "ray job status",
                   "mlflow ui --backend-store-uri", "ray down", "kubectl apply -f cluster/rayjob.yaml",
                   "kubectl delete", "docker build -f cluster/Dockerfile"):
        assert needed in joined, needed
    submits = [c for c in cmds if c.startswith("ray job submit")]
    assert submits
    for c in submits:
        assert "--runtime-env cluster/runtime_env.yaml" in c
        cfg = _entrypoint_config(c.split(" -- ", 1)[1])
        assert cfg.train.storage_path.startswith("/mnt/efs/")        # EFS, shared by all nodes
        assert cfg.mlflow.tracking_uri.startswith("sqlite:////mnt/efs/")
    for c in cmds:
        if "mlflow ui" in c or "mlflow server" in c:
            assert "--host 127.0.0.1" in c or "--host" not in c, c   # mlflow ui defaults to 127.0.0.1


def test_ci_runs_the_readmes_commands_verbatim():
    """The README's first lines give the two commands (demo, tests); CI runs the test one as is."""
    readme = (REPO / "README.md").read_text().splitlines()
    commands = [ln.strip() for ln in readme[:12] if ln.startswith("    ")]
    assert commands == ["bash scripts/setup.sh && .venv/bin/dvsa demo --out demo-out",
                        "bash scripts/setup.sh && bash scripts/check.sh"]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1] in [ln.strip() for ln in ci]
