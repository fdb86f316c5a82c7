"""The cluster files parse, match Ray 2.60's schema and KubeRay's CRD, and keep their promises.

ray_cluster.yaml is checked against Ray's own cluster-launcher JSON schema and its start commands
are run in a shell with stand-ins for `hostname`, `ray` and the tracking-server script; every
documented job entrypoint (RayJob manifest, cluster/README.md) must name a real job module and
config, and its key=value overrides must pass dvsa's config validation. The MLflow design: a
tracking server (cluster/mlflow_server.sh: PostgreSQL + `mlflow server`, run for real in the slow
test here) that every Ray node finds through MLFLOW_TRACKING_URI; no SQLite store anywhere.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from dvsa.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
CLUSTER_DIR = REPO / "cluster"
RAYJOB = CLUSTER_DIR / "rayjob.yaml"
RESULTS_POD = CLUSTER_DIR / "results-pod.yaml"
RUNTIME_ENV = CLUSTER_DIR / "runtime_env.yaml"
DOCKERFILE = CLUSTER_DIR / "Dockerfile"
GUIDE = CLUSTER_DIR / "README.md"
SERVER_SCRIPT = CLUSTER_DIR / "mlflow_server.sh"
SHIPPED = [CLUSTER_YAML, *sorted(p for p in CLUSTER_DIR.iterdir() if p.is_file())]

IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
PINNED_TAG = re.compile(r"^[\w./-]+:(?!latest$|nightly)[\w.-]*\d[\w.-]*$")
DLAMI_SSM = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
PRIVATE_IP = "10.1.2.3"       # what the stand-in `hostname -I` reports first


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


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


def _content(path: Path) -> str:
    """What a file configures, comments left out (YAML re-dumped, '#' lines of others dropped)."""
    if path.suffix == ".yaml":
        return "\n".join(yaml.safe_dump(d) for d in yaml.safe_load_all(path.read_text()) if d)
    return "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))


# --------------------------------------------------------------------------- shipped files, all


def test_no_sqlite_store_in_any_cluster_file():
    """The MLflow store is the tracking server's PostgreSQL: no SQLite file, not even in a comment."""
    for path in SHIPPED:
        text = path.read_text()
        assert "sqlite:" not in text.lower(), path
        assert "mlflow.tracking_uri=" not in text, path       # the URI comes from the nodes' env


SECRET_PATTERNS = [
    re.compile(r"postgres(?:ql)?(?:\+\w+)?://[^/\s:@]+:[^@\s]+@"),     # user:password@ in a DSN
    re.compile(r"(?i)\b\w*passw(?:or)?d\w*\s*[:=]\s*[\"']?(?!\$|\"?\$|<)[\w+/=-]{6,}"),
    re.compile(r"AKIA[0-9A-Z]{16}"),                                     # an AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def test_no_secret_values_in_cluster_files():
    for path in SHIPPED:
        text = _content(path)
        for pat in SECRET_PATTERNS:
            assert not pat.search(text), (path, pat.search(text).group(0))
    kinds = [d["kind"] for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    assert "Secret" not in kinds                       # the user creates it with kubectl


def test_no_public_binding_anywhere():
    for path in (CLUSTER_YAML, RESULTS_POD, RUNTIME_ENV, DOCKERFILE, SERVER_SCRIPT):
        text = _content(path)
        assert "0.0.0.0" not in text.replace("0.0.0.0|", ""), path     # the script's refusal list
        assert "::/0" not in text, path
    for path in (CLUSTER_YAML, RAYJOB, RESULTS_POD, RUNTIME_ENV, DOCKERFILE):
        text = _content(path)
        assert not re.search(r"dashboard-host[= :\"']+0", text), path
        assert not re.search(r"\b(LoadBalancer|NodePort|kind:\s*Ingress)\b", text), path
        assert not re.search(r":latest\b", text), path
    # in rayjob.yaml 0.0.0.0 appears once: the MLflow pod's own addresses (test_rayjob_mlflow_server)
    assert _content(RAYJOB).count("0.0.0.0") == 1


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


def test_cluster_yaml_image_id_is_a_deep_learning_ami(launcher):
    """Every node type (the GPU ones above all) names its AMI: the DLAMI with an R580+ driver,
    resolved by EC2 from the SSM parameter, or a literal ami-id pinned from it."""
    for name, t in launcher["available_node_types"].items():
        image = t["node_config"].get("ImageId", "")
        assert image == f"resolve:ssm:{DLAMI_SSM}" or re.fullmatch(r"ami-[0-9a-f]{8,17}", image), (name, image)
        assert image.lower() != "latest_dlami"       # Ray's own default: an Ubuntu 18.04 DLAMI
    text = CLUSTER_YAML.read_text()
    assert f"aws ssm get-parameter --region {launcher['provider']['region']}" in text   # how to pin it


def test_cluster_yaml_narrows_ssh_to_a_group_of_your_own(launcher):
    """Ray gives a group it creates SSH from 0.0.0.0/0 whatever IpPermissions add, so every node
    type names a group the user created (SSH from their CIDR, all traffic from itself)."""
    assert "security_group" not in launcher["provider"]
    groups = {name: t["node_config"].get("SecurityGroupIds") for name, t in launcher["available_node_types"].items()}
    assert all(groups.values()), groups                     # on every node type, else Ray makes one
    assert len({tuple(g) for g in groups.values()}) == 1, groups
    (sg,) = next(iter(groups.values()))
    assert sg.startswith("sg-")
    guide = GUIDE.read_text()
    assert "authorize-security-group-ingress" in guide and "--source-group $SG" in guide
    assert re.search(r"--port 22 --cidr (?!0\.0\.0\.0)[\d.]+/\d+", guide)


def test_ray_leaves_the_group_and_the_image_id_alone(launcher):
    """Ray 2.60's AWS bootstrap, run on this file: no security group is created or changed, the
    ImageId is passed through, and IpPermissions would not have removed SSH from anywhere."""
    pytest.importorskip("boto3")          # ray.autoscaler's AWS module needs it; nothing is called
    import copy

    from ray.autoscaler._private.aws import config as aws

    cfg = copy.deepcopy(launcher)
    assert aws._configure_security_group(cfg) is cfg and cfg == launcher     # returned before any AWS call
    aws._check_ami(cfg)
    assert cfg == launcher
    rules = aws._create_default_inbound_rules({"sg-1"}, [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                                          "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}])
    assert {"CidrIp": "0.0.0.0/0"} in [r for rule in rules for r in rule.get("IpRanges", [])]


def test_cluster_yaml_security(launcher):
    text = _content(CLUSTER_YAML)
    assert "0.0.0.0" not in text and "::/0" not in text
    head_cmds = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in launcher[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert launcher["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_cluster_yaml_installs_the_project_and_postgres_and_mounts_shared_storage(launcher):
    assert launcher["file_mounts"]["~/dvsa"] == "."
    assert any("cd ~/dvsa" in c and "pip install" in c and ".[cluster]" in c      # psycopg2
               for c in launcher["setup_commands"])
    assert ".venv" in launcher["rsync_exclude"]
    init = " ".join(launcher["initialization_commands"])
    assert "mount -t nfs4" in init and "/mnt/efs" in init and "hard" in init
    assert "-v /mnt/efs:/mnt/efs" in launcher["docker"]["run_options"]
    head_setup = " ".join(launcher["head_setup_commands"])
    assert "sudo" in head_setup and "install" in head_setup and "postgresql" in head_setup
    assert "create_main_cluster = false" in head_setup      # no packaged cluster squatting on 5432
    assert not launcher["worker_setup_commands"]


def _run_start_command(cmd: str, tmp: Path, extra_env: dict[str, str], ok: bool = True) -> dict[str, str]:
    """Run a start command of ray_cluster.yaml in bash with stand-ins: `hostname -I`, `ray` (records
    its argv and MLFLOW_TRACKING_URI) and ~/dvsa/cluster/mlflow_server.sh (records its MLFLOW_*)."""
    bin_dir, home = tmp / "bin", tmp / "home"
    (home / "dvsa" / "cluster").mkdir(parents=True)
    bin_dir.mkdir()
    log = tmp / "calls"
    (bin_dir / "hostname").write_text(f"#!/bin/sh\necho '{PRIVATE_IP} 172.17.0.1 '\n")
    (bin_dir / "ray").write_text(f'#!/bin/sh\necho "ray $* | URI=$MLFLOW_TRACKING_URI" >> {log}\n')
    (home / "dvsa" / "cluster" / "mlflow_server.sh").write_text(
        f'echo "server $* | HOST=$MLFLOW_HOST PORT=$MLFLOW_PORT" >> {log}\n')
    for f in (bin_dir / "hostname", bin_dir / "ray"):
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), **extra_env}
    # ulimit: the container's limit comes from docker's --ulimit; not this machine's business
    res = subprocess.run(["bash", "-c", "ulimit() { :; }; " + cmd], env=env, capture_output=True,
                         text=True, timeout=60)
    assert (res.returncode == 0) == ok, res.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return {c.split()[0] + (" " + c.split()[1] if c.startswith("server") else ""): c for c in calls}


def test_head_starts_the_tracking_server_on_its_private_address(launcher, tmp_path):
    """The head runs cluster/mlflow_server.sh (bound to the private IP, never 0.0.0.0) before
    `ray start`, and `ray start` runs with MLFLOW_TRACKING_URI pointing at it."""
    (cmd,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert cmd.index("mlflow_server.sh start") < cmd.index("ray start")
    calls = _run_start_command(cmd, tmp_path, {})
    assert calls["server start"].endswith(f"HOST={PRIVATE_IP} PORT=5000"), calls
    assert calls["ray"].endswith(f"URI=http://{PRIVATE_IP}:5000"), calls
    assert "--head" in calls["ray"] and "--dashboard-host=127.0.0.1" in calls["ray"]
    # a server that does not come up stops `ray up` (the commands are chained with &&)
    failing = cmd.replace("bash ~/dvsa/cluster/mlflow_server.sh start", "false")
    assert "ray" not in _run_start_command(failing, tmp_path / "f", {}, ok=False)


def test_workers_export_the_head_tracking_uri(launcher, tmp_path):
    (cmd,) = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    calls = _run_start_command(cmd, tmp_path, {"RAY_HEAD_IP": PRIVATE_IP})   # set by Ray's launcher
    assert calls["ray"].endswith(f"URI=http://{PRIVATE_IP}:5000"), calls
    assert f"--address={PRIVATE_IP}:6379" in calls["ray"]
    assert "server start" not in calls


# --------------------------------------------------------------------------- cluster/mlflow_server.sh


def _script(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SERVER_SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_server_script_syntax_and_lint():
    assert subprocess.run(["bash", "-n", str(SERVER_SCRIPT)]).returncode == 0
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", str(SERVER_SCRIPT)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", ""])
def test_server_script_refuses_to_bind_every_interface(host, tmp_path):
    env = {**os.environ, "DVSA_SHARED": str(tmp_path / "shared"), "MLFLOW_HOST": host}
    res = _script("start", env=env)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "MLFLOW_HOST" in res.stderr, res.stderr
    assert not (tmp_path / "shared").exists()            # refused before touching anything


# The script's start / stop / status / restart with the data kept, over a real PostgreSQL and
# `mlflow server`, run in tests/test_cluster_rehearsal.py (its tracking server is this script).


# --------------------------------------------------------------------------- KubeRay

# cluster/rayjob.yaml's RayJob fields must exist in the RayJob CRD of KubeRay v1.5.1 (the oldest
# operator the guide supports; helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml): Kubernetes
# silently drops a field a CRD does not declare. These are the CRD's properties at each level.
CRD_FIELDS = {
    "spec": {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
             "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
             "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
             "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
    "rayClusterSpec": {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                       "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
                       "workerGroupSpecs"},
    "headGroupSpec": {"enableIngress", "headService", "labels", "rayStartParams", "resources", "serviceType",
                      "template"},
    "workerGroupSpec": {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                        "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"},
    "authOptions": {"mode"},
}
API_VERSIONS = {"PersistentVolumeClaim": "v1", "Service": "v1", "Pod": "v1", "StatefulSet": "apps/v1",
                "Deployment": "apps/v1", "NetworkPolicy": "networking.k8s.io/v1", "RayJob": "ray.io/v1"}


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    out = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(out) == len(docs), "duplicate kind/name"
    return out


@pytest.fixture(scope="module")
def kuberay(manifests) -> dict:
    k = {kind: d for (kind, _), d in manifests.items() if kind in ("PersistentVolumeClaim", "RayJob")}
    k["mlflow"] = manifests[("Deployment", "dvsa-mlflow")]
    k["mlflow_svc"] = manifests[("Service", "dvsa-mlflow")]
    k["postgres"] = manifests[("StatefulSet", "dvsa-postgres")]
    k["postgres_svc"] = manifests[("Service", "dvsa-postgres")]
    k["ray_policy"] = manifests[("NetworkPolicy", "dvsa-ray-ingress")]
    k["mlflow_policy"] = manifests[("NetworkPolicy", "dvsa-mlflow-ingress")]
    k["postgres_policy"] = manifests[("NetworkPolicy", "dvsa-postgres-ingress")]
    return k


def _pod_specs(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    out = {"head": spec["headGroupSpec"]["template"]}
    for g in spec["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]
    return out


def _containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _check_pod_template(template: dict, where: str) -> None:
    for c in _containers(template):
        assert c.get("name") and c.get("image"), where
        assert PINNED_TAG.match(c["image"]), (where, c["image"])
        for e in c.get("env", []):
            assert ("value" in e) != ("valueFrom" in e), (where, e)
            if re.search(r"PASSWORD", e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), (where, e)     # never a literal
    mounts = {m["name"] for c in _containers(template) for m in c.get("volumeMounts", [])}
    assert mounts <= {v["name"] for v in template["spec"].get("volumes", [])} | {"data"}, where


def test_manifests_are_well_formed(manifests):
    """Structural checks of every object (full schema validation: kubernetes-validate --strict and
    the KubeRay CRD, see cluster/README.md; neither is a test dependency)."""
    kinds = sorted(k for k, _ in manifests)
    assert kinds == ["Deployment", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim",
                     "RayJob", "Service", "Service", "StatefulSet"]
    for (kind, name), d in manifests.items():
        assert d["apiVersion"] == API_VERSIONS[kind], (kind, name)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        assert "namespace" not in d["metadata"]                 # goes where kubectl points
        spec = d["spec"]
        if kind in ("Deployment", "StatefulSet"):
            labels = spec["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items(), name
            _check_pod_template(spec["template"], name)
        if kind == "StatefulSet":
            assert spec["serviceName"] in {n for k, n in manifests if k == "Service"}
            claims = spec["volumeClaimTemplates"]
            assert [c["metadata"]["name"] for c in claims] == ["data"] and claims[0]["spec"]["accessModes"]
        if kind == "Service":
            assert spec.get("type", "ClusterIP") == "ClusterIP", name
            assert any(spec["selector"].items() <= d2["spec"]["template"]["metadata"]["labels"].items()
                       for (k2, _), d2 in manifests.items() if k2 in ("Deployment", "StatefulSet")), name
            assert all(p["port"] and p["targetPort"] for p in spec["ports"])
        if kind == "NetworkPolicy":
            assert spec["policyTypes"] == ["Ingress"] and spec["podSelector"]["matchLabels"]
            assert all(r["from"] for r in spec["ingress"]), name        # an empty `from` admits everyone
        if kind == "RayJob":
            for p in _pod_specs(d).values():
                _check_pod_template(p, name)


def test_rayjob_fields_exist_in_the_kuberay_crd(kuberay):
    spec = kuberay["RayJob"]["spec"]
    assert set(spec) <= CRD_FIELDS["spec"], set(spec) - CRD_FIELDS["spec"]
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= CRD_FIELDS["rayClusterSpec"], set(cluster) - CRD_FIELDS["rayClusterSpec"]
    assert set(cluster["headGroupSpec"]) <= CRD_FIELDS["headGroupSpec"]
    assert set(cluster["authOptions"]) <= CRD_FIELDS["authOptions"]
    for g in cluster["workerGroupSpecs"]:
        assert set(g) <= CRD_FIELDS["workerGroupSpec"], set(g) - CRD_FIELDS["workerGroupSpec"]
        assert {"groupName", "maxReplicas", "minReplicas", "template"} <= set(g)     # the CRD's required


def test_rayjob_groups_and_auth(kuberay):
    job = kuberay["RayJob"]
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


def test_rayjob_shared_volume_and_ray_network_policy(kuberay):
    pvc, policy, job = kuberay["PersistentVolumeClaim"], kuberay["ray_policy"], kuberay["RayJob"]
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
    # neither server pod is a Ray pod (the Ray policy would admit every Ray pod on every port)
    for server in ("mlflow", "postgres"):
        assert not label.items() <= kuberay[server]["spec"]["template"]["metadata"]["labels"].items()


def _only_from(policy: dict, target: dict, source_labels: dict, port: int) -> None:
    """`policy` selects `target`'s pods and admits only pods labelled `source_labels`, on `port`."""
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= target["spec"]["template"]["metadata"]["labels"].items()
    assert spec["ingress"] == [{"from": [{"podSelector": {"matchLabels": source_labels}}],
                                "ports": [{"protocol": "TCP", "port": port}]}]


def test_rayjob_tracking_server(kuberay):
    """PostgreSQL (StatefulSet, PVC, password from a Secret) behind a ClusterIP Service that admits
    only the MLflow pod; MLflow (proxied artifacts on the shared PVC) behind one that admits only
    the dvsa Ray pods; the Ray containers find it through MLFLOW_TRACKING_URI."""
    pg, mlflow = kuberay["postgres"], kuberay["mlflow"]
    pg_c = pg["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"postgres:15[\w.-]*", pg_c["image"])
    pg_env = _env(pg_c)
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dvsa-postgres"
    assert pg_env["POSTGRES_DB"]["value"] == "mlflow"

    ray_labels = kuberay["ray_policy"]["spec"]["podSelector"]["matchLabels"]
    mlflow_labels = mlflow["spec"]["template"]["metadata"]["labels"]
    _only_from(kuberay["postgres_policy"], pg, {"app.kubernetes.io/name": mlflow_labels["app.kubernetes.io/name"]},
               kuberay["postgres_svc"]["spec"]["ports"][0]["port"])
    svc_port = kuberay["mlflow_svc"]["spec"]["ports"][0]["port"]
    _only_from(kuberay["mlflow_policy"], mlflow, ray_labels, svc_port)

    (c,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert c["image"] == _pod_specs(kuberay["RayJob"])["head"]["spec"]["containers"][0]["image"]  # cluster/Dockerfile's
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in c["args"])
    assert c["command"][-2:] == ["mlflow", "server"]
    env = _env(c)
    store = args["--backend-store-uri"]
    assert store == "$(MLFLOW_BACKEND_STORE_URI)"
    dsn = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert re.fullmatch(r"postgresql\+psycopg2://dvsa@dvsa-postgres:5432/mlflow", dsn)       # no password in it
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dvsa-postgres"
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["dvsa-shared"]
    assert args["--artifacts-destination"].startswith(mount + "/") and "--serve-artifacts" in args
    # 0.0.0.0 in a pod: its own IP and loopback (port-forward), guarded by the policy above
    assert args["--host"] == "0.0.0.0"
    target = kuberay["mlflow_svc"]["spec"]["ports"][0]["targetPort"]
    assert args["--port"] == str(c["ports"][0]["containerPort"]) == str(target)
    assert f"dvsa-mlflow:{svc_port}" in args["--allowed-hosts"].split(",")
    assert "*" not in args["--allowed-hosts"].split(",")
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    # the Ray containers log there
    uri = f"http://{kuberay['mlflow_svc']['metadata']['name']}:{svc_port}"
    for name, pod in _pod_specs(kuberay["RayJob"]).items():
        assert _env(pod["spec"]["containers"][0])["MLFLOW_TRACKING_URI"]["value"] == uri, name
    # `kubectl apply -l app.kubernetes.io/component=tracking-server` brings up all the server needs
    first = {kuberay[k]["metadata"]["name"] for k in ("PersistentVolumeClaim", "mlflow", "mlflow_svc", "postgres",
                                                      "postgres_svc", "mlflow_policy", "postgres_policy")
             if kuberay[k]["metadata"]["labels"].get("app.kubernetes.io/component") == "tracking-server"}
    assert first == {"dvsa-shared", "dvsa-mlflow", "dvsa-postgres", "dvsa-mlflow-ingress", "dvsa-postgres-ingress"}
    assert "app.kubernetes.io/component" not in kuberay["RayJob"]["metadata"]["labels"]


def test_rayjob_entrypoint_is_a_real_job_on_shared_storage(kuberay):
    job = kuberay["RayJob"]
    cfg = _entrypoint_config(job["spec"]["entrypoint"])
    assert cfg.train.use_gpu is True
    assert cfg.train.storage_path.startswith("/mnt/dvsa/")
    assert cfg.mlflow.tracking_uri is None                      # MLFLOW_TRACKING_URI of the pods
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
    # one Train worker per GPU pod: each pod keeps its CPUs minus one worker's for decode tasks
    per_pod = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in workers]
    assert cfg.train.cpus_per_worker <= min(per_pod)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/dvsa"               # WORKDIR of cluster/Dockerfile
    _assert_merges_with_driver_env(env)
    assert "WORKDIR /home/ray/dvsa" in DOCKERFILE.read_text()


def test_results_pod_is_a_copy_pod_on_the_shared_volume():
    pod = _load(RESULTS_POD)
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    (c,) = pod["spec"]["containers"]
    assert PINNED_TAG.match(c["image"]) and "ports" not in c
    assert not any("mlflow" in part for part in c.get("command", []) + c.get("args", []))
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "dvsa-shared"
    assert "kubectl port-forward svc/dvsa-mlflow" in RESULTS_POD.read_text()


# --------------------------------------------------------------------------- image, runtime_env, guide


def test_dockerfile_pins_the_image_and_installs_the_project():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == [IMAGE]
    assert re.search(r'pip install .*\s"\.\[cluster\]"(\s|$)', text)     # with the PostgreSQL driver
    assert "psycopg2" in text                                              # checked at build time
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
    for needed in ("ray up", "ray dashboard", "ray job submit", "ray job logs -f", "ray job status", "ray down",
                   "aws ec2 create-security-group", "--protocol tcp --port 22 --cidr", "aws ssm get-parameter",
                   "cluster/mlflow_server.sh status", "cluster/mlflow_server.sh stop",
                   "--port-forward 5000 'bash ~/dvsa/cluster/mlflow_server.sh relay'", "ssh -i", "pg_dump",
                   "kubectl create secret generic dvsa-postgres",
                   "kubectl apply -f cluster/rayjob.yaml -l app.kubernetes.io/component=tracking-server",
                   "kubectl apply -f cluster/rayjob.yaml", "kubectl port-forward svc/dvsa-mlflow 5000:5000",
                   "kubectl delete", "docker build -f cluster/Dockerfile"):
        assert needed in joined, needed
    assert joined.index("mlflow_server.sh stop") < joined.index("ray down")      # a clean PostgreSQL stop
    submits = [c for c in cmds if c.startswith("ray job submit")]
    assert submits
    for c in submits:
        assert "--runtime-env cluster/runtime_env.yaml" in c
        cfg = _entrypoint_config(c.split(" -- ", 1)[1])
        assert cfg.train.storage_path.startswith("/mnt/efs/")        # EFS, shared by all nodes
        assert cfg.mlflow.tracking_uri is None                       # the nodes' MLFLOW_TRACKING_URI
    for c in cmds:
        assert "0.0.0.0" not in c.replace("0.0.0.0/0", ""), c
    text = GUIDE.read_text()
    assert "SQLite" not in text and "is fine" not in text


def test_ci_runs_the_readmes_commands_verbatim():
    """The README's first lines give the two commands (demo, tests); CI runs the test one as is."""
    readme = (REPO / "README.md").read_text().splitlines()
    commands = [ln.strip() for ln in readme[:12] if ln.startswith("    ")]
    assert commands == ["bash scripts/setup.sh && .venv/bin/dvsa demo --out demo-out",
                        "bash scripts/setup.sh && bash scripts/check.sh"]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1] in [ln.strip() for ln in ci]
