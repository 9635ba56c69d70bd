"""The Helm chart at helm/marketpipe, offline: lint, render, strict Kubernetes schemas, security, and
the work pool's base job template resolved by Prefect itself.

Helm runs in-process (helm-python-sdk bundles Helm's Go SDK) and kubernetes-validate bundles the
Kubernetes OpenAPI schemas, so nothing here needs a cluster, a helm binary or the network.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from unittest.mock import AsyncMock

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import FlowRun
from prefect_kubernetes.settings import KubernetesSettings
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from configs.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "marketpipe"
TEMPLATE_FILE = CHART / "files" / "base-job-template.json"
FIXTURES = Path(__file__).parent / "fixtures" / "helm"

RELEASE = "mp"
NAMESPACE = "marketpipe"
# The Kubernetes versions the manifests are checked against: 1.31 and the newest the package bundles.
KUBE_VERSION = "1.31.0"
KUBE_VERSIONS = sorted({KUBE_VERSION, str(kubernetes_validate.latest_version())})
API_URL = "http://prefect-server.prefect.svc:4200/api"
# prefect.apiUrl has no default (a wrong one would send the worker nowhere): the one value to pass.
MINIMAL = {"prefect": {"apiUrl": API_URL}}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
CLIENT_COMPONENTS = {"worker", "flow-run", "setup", "realtime"}

# The work pool's variables, which deployments set through job_variables in prefect.yaml.
TEMPLATE_VARIABLES = {
    "annotations",
    "backoff_limit",
    "cluster_config",
    "command",
    "cpu_limit",
    "cpu_request",
    "env",
    "env_secret",
    "finished_job_ttl",
    "image",
    "image_pull_policy",
    "job_watch_timeout_seconds",
    "labels",
    "memory_limit",
    "memory_request",
    "name",
    "namespace",
    "pod_watch_timeout_seconds",
    "service_account_name",
    "stream_output",
}

Doc = dict[str, Any]


def fixture_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((FIXTURES / name).read_text())
    return values


CASES: dict[str, dict[str, Any]] = {
    "default": MINIMAL,
    "production": fixture_values("production-values.yaml"),
    "external-influxdb": fixture_values("external-influxdb-values.yaml"),
}


def render_files(values: dict[str, Any]) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any]) -> list[Doc]:
    docs: list[Doc] = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render_files(values)
    return str(caught.value)


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge values layers, later ones winning (as repeated -f/--set do)."""
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged(result[key], value)
            else:
                result[key] = copy.deepcopy(value)
    return result


def one(docs: list[Doc], kind: str, suffix: str = "") -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def containers(pod_spec: Doc) -> list[Doc]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def env_of(container: Doc) -> dict[str, Any]:
    """name -> value, or the valueFrom mapping for references."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes LabelSelector matches the labels (In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    name = cast(str, request.param)
    return name, render(CASES[name])


@pytest.fixture(scope="module")
def default_docs() -> list[Doc]:
    return render(MINIMAL)


@pytest.fixture(scope="module")
def production_docs() -> list[Doc]:
    return render(CASES["production"])


# --- lint and render -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [None, MINIMAL, CASES["production"], CASES["external-influxdb"]],
    ids=["chart-defaults", "default", "production", "external-influxdb"],
)
def test_helm_lint_strict_finds_no_warning_or_error(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error; 1 is info
    assert problems == []


def test_every_rendered_manifest_validates_strictly(case: tuple[str, list[Doc]]) -> None:
    name, docs = case
    assert len(docs) >= 9, name
    for doc in docs:
        # strict: the schemas forbid unknown fields, so a misspelt or misplaced key fails here
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        assert len(doc["metadata"]["name"]) <= 63


def test_strict_validation_rejects_an_unknown_field(default_docs: list[Doc]) -> None:
    deployment = copy.deepcopy(one(default_docs, "Deployment", "-worker"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_the_chart_renders_what_each_case_needs(case: tuple[str, list[Doc]]) -> None:
    name, docs = case
    kinds = sorted(d["kind"] for d in docs)
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert kinds.count("Deployment") == 1 and kinds.count("ConfigMap") == 1 and kinds.count("Job") == 1
    # the setup Job's Role (and its NetworkPolicy to the Kubernetes API) exist where it writes the scoped token
    scoped = int(name == "default")
    assert kinds.count("Role") == 1 + scoped and kinds.count("RoleBinding") == 1 + scoped
    assert kinds.count("ServiceAccount") == 3
    in_chart_influxdb = name != "external-influxdb"
    assert kinds.count("StatefulSet") == int(in_chart_influxdb)
    assert kinds.count("Service") == 2 * int(in_chart_influxdb)
    assert kinds.count("NetworkPolicy") == 2 + int(in_chart_influxdb) + scoped
    # secrets are generated only when nothing names an existing one
    assert kinds.count("Secret") == (2 if name == "default" else 0)


# --- security ---------------------------------------------------------------------------------


def test_every_pod_runs_hardened(case: tuple[str, list[Doc]]) -> None:
    _, docs = case
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert {d["kind"] for d in workloads} >= {"Deployment", "Job"}
    for doc in workloads:
        assert_hardened_pod(doc["spec"]["template"]["spec"], doc["metadata"]["name"])


def assert_hardened_pod(pod: Doc, where: str) -> None:
    assert pod["securityContext"].get("runAsNonRoot") is True, where
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
    assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, where
    for container in containers(pod):
        at = f"{where}/{container['name']}"
        context = container["securityContext"]
        assert context.get("allowPrivilegeEscalation") is False, at
        assert context.get("capabilities") == {"drop": ["ALL"]}, at
        assert context.get("privileged") is not True, at
        assert context.get("runAsNonRoot", True) is True, at
        # the worker, the setup Job, the flow runs and InfluxDB alike: writable paths are volumes
        assert context.get("readOnlyRootFilesystem") is True, at
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) >= {"cpu", "memory"}, f"{at} {bound}"


def test_the_worker_role_is_namespaced_and_minimal(case: tuple[str, list[Doc]]) -> None:
    _, docs = case
    role = one(docs, "Role", "-worker")
    grants = {
        (g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert grants[("batch", "jobs")] == {"create", "get", "list", "watch", "delete"}
    assert grants[("", "pods")] == {"get", "list", "watch"}
    assert grants[("", "pods/log")] == {"get"}
    assert grants[("", "events")] <= {"get", "list", "watch"}
    assert set(grants) == {("batch", "jobs"), ("", "pods"), ("", "pods/log"), ("", "events")}
    assert all("*" not in verbs for verbs in grants.values())
    binding = one(docs, "RoleBinding", "-worker")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    worker = one(docs, "Deployment", "-worker")["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": worker["serviceAccountName"], "namespace": NAMESPACE}
    ]
    # the observer must stay in this namespace, or it would need cluster-wide list/watch
    assert env_of(worker["containers"][0])["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == NAMESPACE


def test_only_the_worker_and_the_token_writing_setup_job_get_a_service_account_token(
    case: tuple[str, list[Doc]],
) -> None:
    name, docs = case
    for doc in docs:
        if doc["kind"] in WORKLOADS and not doc["metadata"]["name"].endswith("-worker"):
            # the setup Job needs one only to write the flow runs' scoped token (default case)
            expected = name == "default" and doc["metadata"]["name"].endswith("-setup")
            assert doc["spec"]["template"]["spec"]["automountServiceAccountToken"] is expected, doc["metadata"]["name"]
    for suffix in ("-flow-run", "-setup"):
        assert one(docs, "ServiceAccount", suffix)["automountServiceAccountToken"] is False


def test_network_policies_confine_clients_and_influxdb(case: tuple[str, list[Doc]]) -> None:
    name, docs = case
    clients = one(docs, "NetworkPolicy", "-clients")["spec"]
    assert set(clients["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in clients  # default-deny ingress
    component_rule = next(
        e for e in clients["podSelector"]["matchExpressions"] if e["key"] == "app.kubernetes.io/component"
    )
    assert set(component_rule["values"]) == CLIENT_COMPONENTS
    for rule in clients["egress"]:
        ports = {p["port"] for p in rule["ports"]}
        # a rule without `to` allows every destination: only DNS may be that open
        assert "to" in rule or ports == {53}, rule
    egress_ports = {p["port"] for rule in clients["egress"] for p in rule["ports"]}
    assert {53, 443} <= egress_ports

    # the pods the policies are for carry the labels it selects
    worker = one(docs, "Deployment", "-worker")["spec"]["template"]["metadata"]["labels"]
    setup = one(docs, "Job", "-setup")["spec"]["template"]["metadata"]["labels"]
    flow_run = base_job_template(docs)["job_configuration"]["job_manifest"]["spec"]["template"]["metadata"]["labels"]
    for labels in (worker, setup, flow_run):
        assert selects(clients["podSelector"], labels), labels

    worker_policy = one(docs, "NetworkPolicy", "-worker")["spec"]
    assert "Egress" in worker_policy["policyTypes"] and "Ingress" in worker_policy["policyTypes"]
    assert "ingress" not in worker_policy
    assert selects(worker_policy["podSelector"], worker)
    assert not selects(worker_policy["podSelector"], flow_run)

    if name == "external-influxdb":
        influx_rule = next(r for r in clients["egress"] if any(p["port"] == 8086 for p in r["ports"]))
        assert influx_rule["to"] == [{"ipBlock": {"cidr": "10.20.30.0/24"}}]
        return
    influxdb = one(docs, "NetworkPolicy", "-influxdb")["spec"]
    pod_labels = one(docs, "StatefulSet", "-influxdb")["spec"]["template"]["metadata"]["labels"]
    assert selects(influxdb["podSelector"], pod_labels)
    assert set(influxdb["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = influxdb["ingress"]
    assert ingress["ports"] == [{"port": 8086, "protocol": "TCP"}]
    assert selects(ingress["from"][0]["podSelector"], flow_run)
    assert not selects(ingress["from"][0]["podSelector"], pod_labels)


def test_source_apis_are_reachable_only_when_allowed(default_docs: list[Doc]) -> None:
    def https_rules(docs: list[Doc]) -> list[Doc]:
        egress = one(docs, "NetworkPolicy", "-clients")["spec"]["egress"]
        return [r for r in egress if any("ipBlock" in peer for peer in r.get("to", []))]

    (public,) = https_rules(default_docs)
    assert public["ports"] == [{"port": 443, "protocol": "TCP"}]
    block = public["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(block["except"])
    assert https_rules(render(merged(MINIMAL, {"networkPolicy": {"allowSourceApis": False}}))) == []
    off = render(merged(MINIMAL, {"networkPolicy": {"enabled": False}}))
    assert [d for d in off if d["kind"] == "NetworkPolicy"] == []


def test_dns_egress_is_open_to_any_destination_only_on_request(default_docs: list[Doc]) -> None:
    def dns_rule(docs: list[Doc]) -> Doc:
        egress = one(docs, "NetworkPolicy", "-clients")["spec"]["egress"]
        (rule,) = [r for r in egress if {p["port"] for p in r["ports"]} == {53}]
        return cast(Doc, rule)

    assert dns_rule(default_docs)["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    anywhere = merged(MINIMAL, {"networkPolicy": {"dns": {"namespaceSelector": None, "podSelector": None}}})
    assert "to" not in dns_rule(render(anywhere))


def test_values_yaml_holds_no_secret() -> None:
    """Under keys named like a credential, values.yaml may only hold empty values or references
    (the `name`/`key` of an existing Secret, or `<password|token>Key`: a key inside one)."""
    sensitive = re.compile(r"token|password|secret|api_?key|credential", re.IGNORECASE)
    reference = re.compile(r"^(name|key|(.*(password|token))Key)$", re.IGNORECASE)

    def walk(node: Any, path: str, inside: bool) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                key_path = f"{path}.{key}" if path else key
                flagged = (inside or bool(sensitive.search(key))) and not reference.match(key)
                yield from walk(value, key_path, flagged or (inside and isinstance(value, dict)))
        elif isinstance(node, list):
            for index, item in enumerate(node):
                yield from walk(item, f"{path}[{index}]", inside)
        elif inside and node not in (None, "", False):
            yield f"{path}={node!r}"

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(walk(values, "", False)) == []
    # the walk does catch one
    planted = {"influxdb": {"auth": {"adminToken": "s3cr3t"}}, "prefect": {"apiKeySecret": {"value": "pnu_x"}}}
    assert list(walk(planted, "", False)) == ["influxdb.auth.adminToken='s3cr3t'", "prefect.apiKeySecret.value='pnu_x'"]


def test_generated_influxdb_credentials_are_random_and_stay_with_influxdb(default_docs: list[Doc]) -> None:
    auth = one(default_docs, "Secret", "-influxdb-auth")
    env = one(default_docs, "Secret", "-flow-run-env")
    for secret in (auth, env):
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    token = base64.b64decode(auth["data"]["admin-token"]).decode()
    password = base64.b64decode(auth["data"]["admin-password"]).decode()
    assert len(token) == 64 and len(password) == 32 and token.isalnum()
    # the flow runs' Secret starts empty: the setup Job writes the bucket-scoped token into it
    assert env["data"] == {"INFLUXDB_TOKEN": ""}
    again = one(render(MINIMAL), "Secret", "-influxdb-auth")
    assert again["data"]["admin-token"] != auth["data"]["admin-token"]  # no cluster to look up: fresh


def secret_refs(node: Any) -> Iterator[tuple[str, str | None]]:
    """(Secret, key) of every secretKeyRef, and (Secret, None) of every secretRef (envFrom), in ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "secretKeyRef":
                yield value["name"], value["key"]
            elif key == "secretRef":
                yield value["name"], None
            else:
                yield from secret_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from secret_refs(item)


def test_only_influxdb_and_the_setup_job_get_the_operator_token(case: tuple[str, list[Doc]]) -> None:
    """Flow runs (their template, their Job, their env Secret) never carry the operator token or a
    reference to it: a flow run's token can do no more than read and write the bucket."""
    name, docs = case
    operator = {"default": ("mp-marketpipe-influxdb-auth", "admin-token"), "production": ("influxdb-admin", "token")}
    template = base_job_template(docs)
    flow_run_job = resolve(template, {}).job_manifest
    worker = one(docs, "Deployment", "-worker")
    flow_run_side: list[Any] = [template, flow_run_job, worker]
    if name == "default":
        auth = one(docs, "Secret", "-influxdb-auth")
        env_secret = one(docs, "Secret", "-flow-run-env")
        flow_run_side.append(env_secret)
        token = auth["data"]["admin-token"]
        for part in flow_run_side:
            text = json.dumps(part)
            assert token not in text and base64.b64decode(token).decode() not in text
    auth_secret = operator.get(name, ("", ""))[0]
    for part in flow_run_side:
        assert all(secret != auth_secret for secret, _ in secret_refs(part)), secret_refs(part)
    holders = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs if operator.get(name) in set(secret_refs(d)))
    if name == "default":  # the setup Job makes the flow runs' token with it, under a name no config reads
        assert holders == ["Job/mp-marketpipe-setup", "StatefulSet/mp-marketpipe-influxdb"]
        setup = one(docs, "Job", "-setup")["spec"]["template"]["spec"]["containers"][0]
        assert env_of(setup)["INFLUXDB_OPERATOR_TOKEN"] == {
            "secretKeyRef": {"name": operator[name][0], "key": "admin-token"}
        }
    elif name == "production":  # a user-brought envSecret: setup has no use for the operator token
        assert holders == ["StatefulSet/mp-marketpipe-influxdb"]
    else:
        assert holders == []


def test_the_setup_job_alone_may_patch_the_flow_run_env_secret(case: tuple[str, list[Doc]]) -> None:
    name, docs = case
    setup_pod = one(docs, "Job", "-setup")["spec"]["template"]["spec"]
    flow_run_account = base_job_template(docs)["variables"]["properties"]["service_account_name"]["default"]
    assert setup_pod["serviceAccountName"] == one(docs, "ServiceAccount", "-setup")["metadata"]["name"]
    assert setup_pod["serviceAccountName"] != flow_run_account
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    bound = {s["name"] for b in bindings for s in b["subjects"]}
    assert flow_run_account not in bound  # flow runs may do nothing with the Kubernetes API
    if name != "default":  # nothing to write: no Role for the setup Job
        assert bound == {one(docs, "ServiceAccount", "-worker")["metadata"]["name"]}
        assert [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-setup")] == []
        return
    role = one(docs, "Role", "-setup")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [one(docs, "Secret", "-flow-run-env")["metadata"]["name"]],
            "verbs": ["get", "patch"],
        }
    ]
    binding = one(docs, "RoleBinding", "-setup")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": setup_pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    # and it may reach the Kubernetes API, which the flow runs may not
    policy = one(docs, "NetworkPolicy", "-setup")["spec"]
    labels = one(docs, "Job", "-setup")["spec"]["template"]["metadata"]["labels"]
    flow_run = base_job_template(docs)["job_configuration"]["job_manifest"]["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"], labels) and not selects(policy["podSelector"], flow_run)
    assert {p["port"] for rule in policy["egress"] for p in rule["ports"]} == {443, 6443}


def test_a_production_release_needs_a_persistent_spool() -> None:
    message = render_error(merged(MINIMAL, {"environment": "production"}))
    assert "spool.existingClaim" in message and "lost with its pod" in message
    claimed = merged(MINIMAL, {"environment": "production", "spool": {"existingClaim": "marketpipe-spool"}})
    pod = resolve(base_job_template(render(claimed)), {}).job_manifest["spec"]["template"]["spec"]
    spool = next(v for v in pod["volumes"] if v["name"] == "spool")
    assert spool == {"name": "spool", "persistentVolumeClaim": {"claimName": "marketpipe-spool"}}
    assert "schema" in render_error(merged(MINIMAL, {"environment": "prod"}))
    # elsewhere an emptyDir still renders, with NOTES.txt saying what it loses
    notes = render_files(merged(MINIMAL, {"environment": "staging"}))["marketpipe/templates/NOTES.txt"]
    assert "emptyDir and is lost with each flow-run pod" in notes


# --- workloads --------------------------------------------------------------------------------


def test_worker_runs_the_pool_with_the_mounted_template(case: tuple[str, list[Doc]]) -> None:
    name, docs = case
    worker = one(docs, "Deployment", "-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pool = CASES[name].get("workPool", {}).get("name", "marketpipe-k8s")
    assert container["args"][:9] == [
        "prefect",
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        "kubernetes",
        "--base-job-template",
        "/etc/marketpipe/base-job-template.json",
    ]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/marketpipe"]]["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = env_of(container)
    assert env["PREFECT_HOME"].startswith("/tmp/")
    assert env["PREFECT_API_URL"] == CASES[name]["prefect"]["apiUrl"]
    if name == "production":
        assert env["PREFECT_API_KEY"] == {"secretKeyRef": {"name": "prefect-cloud", "key": "PREFECT_API_KEY"}}
        assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_NAME"] == "prefect-cloud"
        assert worker["spec"]["replicas"] == 2
    else:
        assert "PREFECT_API_KEY" not in env


def test_prefect_kubernetes_reads_the_workers_settings(
    case: tuple[str, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, docs = case
    (container,) = one(docs, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"]
    for key, value in env_of(container).items():
        if isinstance(value, str):
            monkeypatch.setenv(key, value)
    settings = KubernetesSettings()
    assert settings.observer.namespaces == {NAMESPACE}
    if name == "production":
        assert (settings.worker.api_key_secret_name, settings.worker.api_key_secret_key) == (
            "prefect-cloud",
            "PREFECT_API_KEY",
        )
    else:
        assert settings.worker.api_key_secret_name is None


def test_setup_job_is_a_hook_with_the_flow_run_environment(case: tuple[str, list[Doc]]) -> None:
    name, docs = case
    job = one(docs, "Job", "-setup")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["ttlSecondsAfterFinished"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    setup = next(c for c in pod["containers"] if c["name"] == "setup")
    if name == "default":  # the chart generated InfluxDB's credentials: setup makes the flow runs' token
        secret = one(docs, "Secret", "-flow-run-env")["metadata"]["name"]
        assert setup["args"] == [
            "marketpipe",
            "setup",
            "--scoped-token-secret",
            secret,
            "--scoped-token-namespace",
            NAMESPACE,
        ]
    else:
        assert setup["args"] == ["marketpipe", "setup"]
    env = env_of(setup)
    template = base_job_template(docs)
    defaults = template["variables"]["properties"]
    flow_env = defaults["env"]["default"]
    for key in ("INFLUXDB_URL", "INFLUXDB_ORG", "INFLUXDB_BUCKET", "MARKETPIPE_ENV"):
        assert env[key] == flow_env[key], key
    assert env["MARKETPIPE_ENV"] == "production"
    assert env["PREFECT_API_URL"] == CASES[name]["prefect"]["apiUrl"]
    # INFLUXDB_TOKEN comes from the same Secret the flow runs use (the operator token, if any, apart)
    assert "INFLUXDB_TOKEN" not in env
    assert setup["envFrom"] == [{"secretRef": {"name": defaults["env_secret"]["default"]}}]
    if name == "production":
        assert env["ALPHA_VANTAGE_API_KEY"] == {"secretKeyRef": {"name": "alpha-vantage", "key": "api-key"}}
        assert "PREFECT_API_KEY" in env
    (sync,) = pod["initContainers"]
    assert "prefect work-pool create" in sync["args"][-1] and "--base-job-template" in sync["args"][-1]


def test_influxdb_statefulset(default_docs: list[Doc], production_docs: list[Doc]) -> None:
    for docs, secret, storage_class in (
        (default_docs, "mp-marketpipe-influxdb-auth", None),
        (production_docs, "influxdb-admin", "fast-ssd"),
    ):
        sts = one(docs, "StatefulSet", "-influxdb")
        assert sts["spec"]["replicas"] == 1
        pod = sts["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["fsGroup"] == 1000
        (container,) = pod["containers"]
        assert container["image"] == "influxdb:2.7"
        env = env_of(container)
        assert env["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
        assert env["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]["secretKeyRef"]["name"] == secret
        assert env["DOCKER_INFLUXDB_INIT_PASSWORD"]["secretKeyRef"]["name"] == secret
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"/var/lib/influxdb2", "/etc/influxdb2", "/tmp"}
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["spec"].get("storageClassName") == storage_class
        service = one(docs, "Service", "-influxdb")
        assert service["spec"]["ports"][0]["port"] == 8086
        assert selects({"matchLabels": service["spec"]["selector"]}, sts["spec"]["template"]["metadata"]["labels"])
    influxdb = one(production_docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(influxdb)["DOCKER_INFLUXDB_INIT_RETENTION"] == "104w"


# --- values checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"bogus": 1},
        {"worker": {"bogus": 1}},
        {"influxdb": {"persistance": {"size": "1Gi"}}},
        {"workPool": {"jobDefaults": {"cpuLimit": 2}}},
    ],
    ids=["top-level", "worker", "influxdb-typo", "number-for-quantity"],
)
def test_values_outside_the_schema_fail(extra: dict[str, Any]) -> None:
    message = render_error(merged(MINIMAL, extra))
    assert "schema" in message


def test_missing_prefect_api_url_fails_with_a_clear_message() -> None:
    assert "prefect.apiUrl is required" in render_error({})


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"prefect": {"cloud": {"enabled": True}}}, "prefect.cloud.apiKeySecret.name is required"),
        ({"influxdb": {"enabled": False}}, "influxdb.external.url is required"),
        ({"influxdb": {"external": {"url": "http://influx:8086"}}}, "influxdb.enabled is true"),
        ({"influxdb": {"auth": {"existingSecret": "influx"}}}, "workPool.jobDefaults.envSecret is required"),
        (
            {
                "influxdb": {"enabled": False, "external": {"url": "http://influx:8086"}},
                "workPool": {"jobDefaults": {"envSecret": "e"}},
            },
            "influxdb.external.cidrs is required",
        ),
        # null removes a default map (an empty one would merge into it)
        (
            {"networkPolicy": {"prefectApi": {"namespaceSelector": None, "podSelector": None}}},
            "networkPolicy.prefectApi needs",
        ),
        ({"setup": {"enabled": False}}, "setup.enabled=false leaves the flow runs without an InfluxDB token"),
    ],
    ids=[
        "cloud-without-key",
        "external-without-url",
        "both-influxdbs",
        "no-env-secret",
        "external-without-cidrs",
        "no-prefect-peer",
        "generated-token-without-setup",
    ],
)
def test_inconsistent_values_fail_with_a_message(extra: dict[str, Any], expected: str) -> None:
    assert expected in render_error(merged(MINIMAL, extra))


def test_notes_name_the_next_steps() -> None:
    notes = render_files(MINIMAL)["marketpipe/templates/NOTES.txt"]
    assert "prefect deploy --all" in notes
    backfill = "prefect deployment run 'market-data/market-data-backfill' -p symbols='[\"AAPL\"]' -p start=2024-01-01"
    assert backfill in notes
    assert "spool.existingClaim" in notes and "daily quota" in notes
    assert "spool.existingClaim" not in render_files(CASES["production"])["marketpipe/templates/NOTES.txt"]


# --- the base job template ----------------------------------------------------------------------


def base_job_template(docs: list[Doc]) -> Doc:
    template: Doc = json.loads(one(docs, "ConfigMap", "-base-job-template")["data"]["base-job-template.json"])
    return template


def resolve(template: Doc, values: dict[str, Any]) -> KubernetesWorkerJobConfiguration:
    """What the worker does with a flow run: template + job variables -> a Job manifest."""
    client = AsyncMock(spec=PrefectClient)
    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=cast(PrefectClient, client))
    )
    assert client.method_calls == []  # no block or variable reference needed the API
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="calm-otter"))
    return configuration


def test_the_template_file_is_a_kubernetes_base_job_template() -> None:
    template = json.loads(TEMPLATE_FILE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    assert set(template["variables"]["properties"]) == TEMPLATE_VARIABLES
    default = KubernetesWorker.get_default_base_job_template()
    # everything Prefect's default has stays, with the same placeholders
    assert set(default["variables"]["properties"]) < TEMPLATE_VARIABLES
    assert {k: v for k, v in template["job_configuration"].items() if k != "job_manifest"} == {
        k: v for k, v in default["job_configuration"].items() if k != "job_manifest"
    }
    WorkPoolCreate(name="marketpipe-k8s", type="kubernetes", base_job_template=template)


def test_rendered_template_keeps_prefects_placeholders(case: tuple[str, list[Doc]]) -> None:
    _, docs = case
    text = one(docs, "ConfigMap", "-base-job-template")["data"]["base-job-template.json"]
    for placeholder in ("{{ image }}", "{{ env_secret }}", "{{ cpu_limit }}", "{{ command }}", "{{ namespace }}"):
        assert placeholder in text
    template = json.loads(text)
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "{{ image }}"
    assert container["envFrom"] == [{"secretRef": {"name": "{{ env_secret }}"}}]
    # Helm changed defaults only: the job configuration is the file's, but for the per-release patches
    original = json.loads(TEMPLATE_FILE.read_text())
    assert set(template["variables"]["properties"]) == set(original["variables"]["properties"]) == TEMPLATE_VARIABLES
    WorkPoolCreate(name="marketpipe-k8s", type="kubernetes", base_job_template=template)


def test_template_defaults_come_from_the_values(default_docs: list[Doc], production_docs: list[Doc]) -> None:
    defaults = {k: v.get("default") for k, v in base_job_template(default_docs)["variables"]["properties"].items()}
    assert defaults["namespace"] == NAMESPACE
    assert defaults["image"] == "marketpipe:0.1.0"
    assert defaults["service_account_name"] == "mp-marketpipe-flow-run"
    assert defaults["env_secret"] == "mp-marketpipe-flow-run-env"
    assert (defaults["cpu_request"], defaults["cpu_limit"], defaults["memory_request"], defaults["memory_limit"]) == (
        "250m",
        "1",
        "512Mi",
        "2Gi",
    )
    assert defaults["finished_job_ttl"] == 86400 and defaults["backoff_limit"] == 0
    assert defaults["env"] == {
        "MARKETPIPE_ENV": "production",
        "INFLUXDB_URL": "http://mp-marketpipe-influxdb.marketpipe.svc:8086",
        "INFLUXDB_ORG": "marketpipe",
        "INFLUXDB_BUCKET": "market_data",
        "MARKETPIPE__RETENTION__DURATION": "365d",
        "MARKETPIPE__STORAGE__SPOOL_DIR": "/var/spool/marketpipe",
        "PREFECT_HOME": "/tmp/prefect",
        "NUMBA_CACHE_DIR": "/tmp/numba-cache",
    }
    prod = {k: v.get("default") for k, v in base_job_template(production_docs)["variables"]["properties"].items()}
    assert prod["image"] == "registry.example.com/marketpipe:0.1.0" and prod["image_pull_policy"] == "Always"
    assert prod["env_secret"] == "marketpipe-flow-run-env"
    assert (prod["cpu_request"], prod["cpu_limit"], prod["memory_request"], prod["memory_limit"]) == (
        "500m",
        "2",
        "1Gi",
        "4Gi",
    )
    assert prod["env"]["INFLUXDB_ORG"] == "markets" and prod["env"]["INFLUXDB_BUCKET"] == "bars"


def test_prefect_resolves_the_template_into_a_valid_hardened_job(case: tuple[str, list[Doc]]) -> None:
    name, docs = case
    template = base_job_template(docs)
    configuration = resolve(template, {"image": "registry.example.com/marketpipe:1.2.3"})
    job = copy.deepcopy(configuration.job_manifest)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/marketpipe:1.2.3"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = env_of(container)
    defaults = template["variables"]["properties"]
    for key, value in defaults["env"]["default"].items():
        assert env[key] == value, key
    assert env["MARKETPIPE__STORAGE__SPOOL_DIR"] == "/var/spool/marketpipe"
    assert container["envFrom"] == [{"secretRef": {"name": defaults["env_secret"]["default"]}}]
    assert container["resources"] == {
        "requests": {"cpu": defaults["cpu_request"]["default"], "memory": defaults["memory_request"]["default"]},
        "limits": {"cpu": defaults["cpu_limit"]["default"], "memory": defaults["memory_limit"]["default"]},
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    spool = volumes[mounts["/var/spool/marketpipe"]]
    if name == "default":
        assert "emptyDir" in spool
    else:
        assert spool == {"name": "spool", "persistentVolumeClaim": {"claimName": "marketpipe-spool"}}
    if name == "production":
        assert env["ALPHA_VANTAGE_API_KEY"] == {"secretKeyRef": {"name": "alpha-vantage", "key": "api-key"}}
        assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert job["metadata"]["namespace"] == NAMESPACE
    assert pod["serviceAccountName"].endswith("-flow-run") and pod["automountServiceAccountToken"] is False
    assert_hardened_pod(pod, "flow-run")
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["fsGroup"] == 10001
    # Prefect's validator requires parallelism/completions inside the pod spec, where Kubernetes
    # ignores them (with a warning); everything else must be a valid Job.
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)


def test_the_daily_quota_state_lives_on_the_spools_claim(
    case: tuple[str, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/tmp dies with each flow-run pod, and with it the day's request count: with a claim the pacing
    state goes on it, in a directory kubelet leaves private (it would open it to the fsGroup)."""
    name, docs = case
    job = resolve(base_job_template(docs), {}).job_manifest
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    if name == "default":  # no claim: nothing outlives the pod, and NOTES.txt warns about it
        assert "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR" not in env
        return
    state_dir = env["MARKETPIPE__COLLECTION__RATE_LIMIT_DIR"]
    mount = next(m for m in container["volumeMounts"] if state_dir.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == CASES[name]["spool"]["existingClaim"]
    assert not mount.get("readOnly") and state_dir != env["MARKETPIPE__STORAGE__SPOOL_DIR"]
    monkeypatch.setenv("MARKETPIPE__COLLECTION__RATE_LIMIT_DIR", state_dir)
    assert load_settings().collection.rate_limit_dir == state_dir  # the variable is the setting's


def test_deployments_override_job_variables() -> None:
    template = base_job_template(render(MINIMAL))
    configuration = resolve(
        template,
        {
            "image": "marketpipe:2",
            "cpu_limit": "4",
            "memory_limit": "8Gi",
            "env_secret": "other-env",
            "env": {"MARKETPIPE__COLLECTION__OVERLAP_DAYS": "10"},
        },
    )
    (container,) = configuration.job_manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert container["resources"]["requests"] == {"cpu": "250m", "memory": "512Mi"}
    assert container["envFrom"] == [{"secretRef": {"name": "other-env"}}]
    env = env_of(container)
    # a deployment's env adds to the pool's, it does not replace it
    assert env["MARKETPIPE__COLLECTION__OVERLAP_DAYS"] == "10"
    assert env["INFLUXDB_URL"] == "http://mp-marketpipe-influxdb.marketpipe.svc:8086"


# --- the Grafana dashboard ----------------------------------------------------------------------

DASHBOARD_FILE = CHART / "files" / "grafana" / "marketpipe.json"
DASHBOARDS_ON = merged(MINIMAL, {"grafana": {"dashboards": {"enabled": True}}})


def test_the_dashboard_configmap_is_off_by_default(case: tuple[str, list[Doc]]) -> None:
    _, docs = case
    assert not [d for d in docs if "grafana_dashboard" in d["metadata"].get("labels", {})]


def test_the_dashboard_reaches_grafanas_sidecar_by_its_label() -> None:
    report = helm.lint(CHART, DASHBOARDS_ON, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    dashboard = one(render(DASHBOARDS_ON), "ConfigMap", "-grafana-dashboard")
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(dashboard, version, strict=True)
    assert dashboard["metadata"]["namespace"] == NAMESPACE
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "annotations" not in dashboard["metadata"]
    # the file as it is: Grafana's own ${datasource} and $symbol are left for Grafana
    assert dashboard["data"]["marketpipe.json"] == DASHBOARD_FILE.read_text()
    assert json.loads(dashboard["data"]["marketpipe.json"])["uid"] == "marketpipe"


def test_the_dashboards_label_namespace_and_folder_follow_the_sidecars_settings() -> None:
    values = merged(
        DASHBOARDS_ON,
        {
            "grafana": {
                "dashboards": {
                    "label": "grafana.example/dashboard",
                    "labelValue": "markets",
                    "namespace": "monitoring",
                    "annotations": {"grafana_folder": "Markets"},
                }
            }
        },
    )
    dashboard = one(render(values), "ConfigMap", "-grafana-dashboard")
    kubernetes_validate.validate(dashboard, KUBE_VERSION, strict=True)
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana.example/dashboard"] == "markets"
    assert "grafana_dashboard" not in dashboard["metadata"]["labels"]
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Markets"}


@pytest.mark.parametrize(
    "dashboards",
    [{"enabled": "yes"}, {"label": "not a label"}, {"labelValue": 1}, {"namespace": "Monitoring"}, {"folder": "x"}],
    ids=["enabled-string", "label-with-spaces", "value-number", "namespace-uppercase", "unknown-key"],
)
def test_dashboard_values_outside_the_schema_fail(dashboards: dict[str, Any]) -> None:
    assert "schema" in render_error(merged(MINIMAL, {"grafana": {"dashboards": dashboards}}))


# --- the realtime Deployment --------------------------------------------------------------------

SYMBOLS = ["AAPL", "MSFT", "^GSPC"]
REALTIME_ON = {"realtime": {"enabled": True, "symbols": SYMBOLS}}
REALTIME_ARGS = [
    "marketpipe",
    "realtime",
    "--symbols",
    "AAPL,MSFT,^GSPC",
    "--source",
    "yahoo_finance",
    "--interval",
    "1m",
    "--mode",
    "poll",
    "--poll-seconds",
    "5",
    "--health-port",
    "8080",
]


@pytest.fixture(scope="module", params=sorted(CASES))
def realtime_case(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    """Each case with the realtime Deployment enabled."""
    name = cast(str, request.param)
    return name, render(merged(CASES[name], REALTIME_ON))


def is_realtime(doc: Doc) -> bool:
    labels = doc["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/component") == "realtime" or "realtime" in doc["metadata"]["name"]


def realtime_container(docs: list[Doc]) -> Doc:
    (container,) = one(docs, "Deployment", "-realtime")["spec"]["template"]["spec"]["containers"]
    return cast(Doc, container)


def flow_run_pod(docs: list[Doc]) -> Doc:
    """The pod spec of a flow-run Job, as the worker makes it from the base job template."""
    pod: Doc = resolve(base_job_template(docs), {}).job_manifest["spec"]["template"]["spec"]
    return pod


def test_the_realtime_deployment_is_off_by_default(case: tuple[str, list[Doc]]) -> None:
    name, docs = case
    assert yaml.safe_load((CHART / "values.yaml").read_text())["realtime"]["enabled"] is False
    assert [f"{d['kind']}/{d['metadata']['name']}" for d in docs if is_realtime(d)] == []
    assert "marketpipe realtime" not in render_files(CASES[name])["marketpipe/templates/NOTES.txt"]


def test_realtime_manifests_lint_and_validate_strictly(realtime_case: tuple[str, list[Doc]]) -> None:
    name, docs = realtime_case
    values = merged(CASES[name], REALTIME_ON)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    for doc in docs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    # enabling it adds its Deployment and ServiceAccount, and nothing else (no Role, no Service)
    before = {(d["kind"], d["metadata"]["name"]) for d in render(CASES[name])}
    after = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert before < after
    assert sorted(after - before) == [
        ("Deployment", "mp-marketpipe-realtime"),
        ("ServiceAccount", "mp-marketpipe-realtime"),
    ]
    assert sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs if is_realtime(d)) == [
        "Deployment/mp-marketpipe-realtime",
        "ServiceAccount/mp-marketpipe-realtime",
    ]


def test_the_realtime_deployment_is_one_replica_replaced_with_recreate(realtime_case: tuple[str, list[Doc]]) -> None:
    name, docs = realtime_case
    deployment = one(docs, "Deployment", "-realtime")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    labels = spec["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "realtime"
    assert selects(spec["selector"], labels)
    worker = one(docs, "Deployment", "-worker")
    assert not selects(spec["selector"], worker["spec"]["template"]["metadata"]["labels"])
    assert not selects(worker["spec"]["selector"], labels)
    pod = spec["template"]["spec"]
    assert "initContainers" not in pod
    assert pod["terminationGracePeriodSeconds"] == 30  # the process needs about 20 s to store what it has
    container = realtime_container(docs)
    assert container["args"] == REALTIME_ARGS
    assert "command" not in container  # the image's entrypoint stays PID 1
    (worker_container,) = worker["spec"]["template"]["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == (
        worker_container["image"],
        worker_container["imagePullPolicy"],
    )
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    if name == "production":
        assert container["image"] == "registry.example.com/marketpipe:0.1.0"
        assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    else:
        assert container["image"] == "marketpipe:0.1.0" and "imagePullSecrets" not in pod


def test_realtime_probes_ask_healthz_on_the_health_port(realtime_case: tuple[str, list[Doc]]) -> None:
    _, docs = realtime_case
    container = realtime_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080}
    assert container["ports"][0]["protocol"] == "TCP"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert ports.get(get["port"], get["port"]) == 8080, probe
    # the first backfill has 5 minutes before liveness may restart the pod; a stall, two minutes at most
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 120


def test_realtime_args_ports_and_scheduling_follow_the_values() -> None:
    values = merged(
        MINIMAL,
        {
            "realtime": {
                "enabled": True,
                "symbols": ["BTC-USD", "EURUSD=X"],
                "source": "alpha_vantage",
                "interval": "5m",
                "mode": "stream",
                "pollSeconds": 30,
                "healthPort": 9090,
                "terminationGracePeriodSeconds": 45,
                "extraArgs": ["--log-level", "DEBUG"],
                "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
                "serviceAccount": {"annotations": {"example.com/team": "data"}},
                "podAnnotations": {"example.com/scrape": "false"},
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "realtime", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["data"]}]}
                            ]
                        }
                    }
                },
            }
        },
    )
    docs = render(values)
    deployment = one(docs, "Deployment", "-realtime")
    for doc in (deployment, one(docs, "ServiceAccount", "-realtime")):
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    container = realtime_container(docs)
    assert container["args"] == [
        "marketpipe",
        "realtime",
        "--symbols",
        "BTC-USD,EURUSD=X",
        "--source",
        "alpha_vantage",
        "--interval",
        "5m",
        "--mode",
        "stream",
        "--poll-seconds",
        "30",
        "--health-port",
        "9090",
        "--log-level",
        "DEBUG",
    ]
    assert container["ports"] == [{"name": "health", "containerPort": 9090, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert container["resources"] == values["realtime"]["resources"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == values["realtime"]["tolerations"]
    assert pod["affinity"] == values["realtime"]["affinity"]
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"example.com/scrape": "false"}
    assert deployment["spec"]["replicas"] == 1  # whatever the values
    assert one(docs, "ServiceAccount", "-realtime")["metadata"]["annotations"] == {"example.com/team": "data"}
    # the worker's scheduling is its own
    assert "nodeSelector" not in one(docs, "Deployment", "-worker")["spec"]["template"]["spec"]
    notes = render_files(values)["marketpipe/templates/NOTES.txt"]
    assert "BTC-USD, EURUSD=X" in notes and "port 9090" in notes


def test_the_realtime_pod_runs_like_a_flow_run_without_an_api_token(realtime_case: tuple[str, list[Doc]]) -> None:
    _, docs = realtime_case
    pod = one(docs, "Deployment", "-realtime")["spec"]["template"]["spec"]
    assert_hardened_pod(pod, "realtime")
    flow_run = flow_run_pod(docs)
    # the flow runs' exact securityContexts: uid/gid/fsGroup 10001, seccomp RuntimeDefault, read-only
    # root filesystem, no privilege escalation, every capability dropped
    assert pod["securityContext"] == flow_run["securityContext"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["fsGroup"] == 10001
    (container,) = pod["containers"]
    assert container["securityContext"] == flow_run["containers"][0]["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    # no Kubernetes API: no token mounted, its own account, bound to no Role
    account = one(docs, "ServiceAccount", "-realtime")
    assert pod["automountServiceAccountToken"] is False
    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "mp-marketpipe-realtime"
    bound = {s["name"] for d in docs if d["kind"] == "RoleBinding" for s in d["subjects"]}
    assert bound and account["metadata"]["name"] not in bound
    # writable paths are volumes: /tmp and the spool
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {"/tmp", "/var/spool/marketpipe"}
    assert not any(m.get("readOnly") for m in mounts.values())
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_the_realtime_pod_gets_the_flow_runs_environment_and_spool(
    realtime_case: tuple[str, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, docs = realtime_case
    container = realtime_container(docs)
    env = env_of(container)
    template = base_job_template(docs)
    defaults = template["variables"]["properties"]
    flow_run = flow_run_pod(docs)
    # what a flow-run Job gets, but for what Prefect adds for each run (PREFECT__FLOW_RUN_ID ...):
    # the template's default env and its fixed entries (ALPHA_VANTAGE_API_KEY)
    flow_env = {
        key: value
        for key, value in env_of(flow_run["containers"][0]).items()
        if key in defaults["env"]["default"] or not key.startswith("PREFECT")
    }
    assert set(defaults["env"]["default"]) <= set(flow_env)
    assert {key: env.get(key) for key in flow_env} == flow_env
    assert env["MARKETPIPE_ENV"] == "production"
    assert (
        container["envFrom"]
        == flow_run["containers"][0]["envFrom"]
        == [{"secretRef": {"name": defaults["env_secret"]["default"]}}]
    )
    assert container["envFrom"][0]["secretRef"]["name"] == (
        "mp-marketpipe-flow-run-env" if name == "default" else CASES[name]["workPool"]["jobDefaults"]["envSecret"]
    )
    # the Prefect API as the worker and the setup Job get it
    (worker,) = one(docs, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"]
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_HOME"):
        assert env.get(key) == env_of(worker).get(key), key
    assert env["PREFECT_API_URL"] == CASES[name]["prefect"]["apiUrl"]
    if name == "production":
        assert env["PREFECT_API_KEY"] == {"secretKeyRef": {"name": "prefect-cloud", "key": "PREFECT_API_KEY"}}
        assert env["ALPHA_VANTAGE_API_KEY"] == {"secretKeyRef": {"name": "alpha-vantage", "key": "api-key"}}
    else:
        assert "PREFECT_API_KEY" not in env and "ALPHA_VANTAGE_API_KEY" not in env
    assert "INFLUXDB_TOKEN" not in env  # from the env Secret, like the flow runs'
    # the same spool volume as the flow runs: their claim, or an emptyDir
    spool_dir = env["MARKETPIPE__STORAGE__SPOOL_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    flow_mounts = {m["mountPath"]: m["name"] for m in flow_run["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in one(docs, "Deployment", "-realtime")["spec"]["template"]["spec"]["volumes"]}
    flow_volumes = {v["name"]: v for v in flow_run["volumes"]}
    assert spool_dir == "/var/spool/marketpipe" and spool_dir in flow_mounts
    claim = CASES[name].get("spool", {}).get("existingClaim")
    if claim:
        spool = {"name": "spool", "persistentVolumeClaim": {"claimName": claim}}
        assert env["MARKETPIPE__COLLECTION__RATE_LIMIT_DIR"].startswith(spool_dir + "/")
    else:
        spool = {"name": "spool", "emptyDir": {"sizeLimit": "2Gi"}}
        assert "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR" not in env
        assert flow_volumes[flow_mounts[spool_dir]] == spool
    assert volumes[mounts[spool_dir]] == spool
    # and marketpipe's settings read them
    for key, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.storage.backend == "influxdb"
    assert settings.storage.spool_dir == spool_dir
    assert settings.storage.influxdb.url == env["INFLUXDB_URL"]
    assert settings.storage.influxdb.bucket == env["INFLUXDB_BUCKET"]
    if claim:
        assert settings.collection.rate_limit_dir == env["MARKETPIPE__COLLECTION__RATE_LIMIT_DIR"]


def test_the_realtime_pod_never_gets_the_operator_token(realtime_case: tuple[str, list[Doc]]) -> None:
    name, docs = realtime_case
    deployment = one(docs, "Deployment", "-realtime")
    env_secret = base_job_template(docs)["variables"]["properties"]["env_secret"]["default"]
    # every Secret it references: the flow-run env Secret, and the Cloud and Alpha Vantage keys where set
    expected: set[tuple[str, str | None]] = {(env_secret, None)}
    if name == "production":
        expected |= {("prefect-cloud", "PREFECT_API_KEY"), ("alpha-vantage", "api-key")}
    assert set(secret_refs(deployment)) == expected
    assert not [e for e in env_of(realtime_container(docs)) if "OPERATOR" in e or "ADMIN" in e]
    operator = {"default": ("mp-marketpipe-influxdb-auth", "admin-token"), "production": ("influxdb-admin", "token")}
    holders = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs if operator.get(name) in set(secret_refs(d)))
    assert "Deployment/mp-marketpipe-realtime" not in holders
    if name == "default":
        assert holders == ["Job/mp-marketpipe-setup", "StatefulSet/mp-marketpipe-influxdb"]
        token = one(docs, "Secret", "-influxdb-auth")["data"]["admin-token"]
        text = json.dumps(deployment)
        assert token not in text and base64.b64decode(token).decode() not in text
        assert env_secret != operator[name][0]


def test_network_policies_let_the_realtime_pod_reach_only_its_peers(realtime_case: tuple[str, list[Doc]]) -> None:
    name, docs = realtime_case
    labels = one(docs, "Deployment", "-realtime")["spec"]["template"]["metadata"]["labels"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    # only the clients' policy selects it: not the worker's or the setup Job's (the Kubernetes API)
    (clients,) = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], labels)]
    assert clients == one(docs, "NetworkPolicy", "-clients")["spec"]
    assert set(clients["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in clients
    egress = clients["egress"]
    ports = {(p["port"], p["protocol"]) for rule in egress for p in rule["ports"]}
    prefect_port = CASES[name].get("networkPolicy", {}).get("prefectApi", {}).get("port", 4200)
    assert ports == {(53, "UDP"), (53, "TCP"), (8086, "TCP"), (prefect_port, "TCP"), (443, "TCP")}
    assert 6443 not in {port for port, _ in ports}
    for rule in egress:
        assert "to" in rule or {p["port"] for p in rule["ports"]} == {53}, rule
    # HTTPS for the sources and Yahoo's streamer (wss): public addresses only
    public = [r for r in egress if r["ports"] == [{"port": 443, "protocol": "TCP"}]]
    blocks = [peer["ipBlock"] for rule in public for peer in rule["to"]]
    chart_except = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["sourceApisExcept"]
    assert "10.0.0.0/8" in chart_except
    assert {"cidr": "0.0.0.0/0", "except": chart_except} in blocks
    (influx_rule,) = [r for r in egress if r["ports"] == [{"port": 8086, "protocol": "TCP"}]]
    if name == "external-influxdb":
        assert influx_rule["to"] == [{"ipBlock": {"cidr": "10.20.30.0/24"}}]
        return
    influxdb_pod = one(docs, "StatefulSet", "-influxdb")["spec"]["template"]["metadata"]["labels"]
    (peer,) = influx_rule["to"]
    assert selects(peer["podSelector"], influxdb_pod)
    # and InfluxDB lets it in on 8086
    (ingress,) = one(docs, "NetworkPolicy", "-influxdb")["spec"]["ingress"]
    assert ingress["ports"] == [{"port": 8086, "protocol": "TCP"}]
    assert selects(ingress["from"][0]["podSelector"], labels)
    # a pod of another release with the same component label is not let in
    assert not selects(ingress["from"][0]["podSelector"], {**labels, "app.kubernetes.io/instance": "other"})


def test_without_source_apis_the_realtime_pod_has_no_https_egress() -> None:
    docs = render(merged(MINIMAL, REALTIME_ON, {"networkPolicy": {"allowSourceApis": False}}))
    labels = one(docs, "Deployment", "-realtime")["spec"]["template"]["metadata"]["labels"]
    selecting = [d for d in docs if d["kind"] == "NetworkPolicy" and selects(d["spec"]["podSelector"], labels)]
    assert [d["metadata"]["name"] for d in selecting] == ["mp-marketpipe-clients"]
    ports = {p["port"] for d in selecting for rule in d["spec"]["egress"] for p in rule["ports"]}
    assert ports == {53, 8086, 4200}
    notes = render_files(merged(MINIMAL, REALTIME_ON, {"networkPolicy": {"allowSourceApis": False}}))
    assert "Neither can the realtime Deployment" in notes["marketpipe/templates/NOTES.txt"]


@pytest.mark.parametrize(
    ("realtime", "expected"),
    [
        ({"interval": "3m"}, "/realtime/interval"),
        ({"interval": "1h"}, "/realtime/interval"),
        ({"mode": "push"}, "/realtime/mode"),
        ({"source": "polygon"}, "/realtime/source"),
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"strategy": "RollingUpdate"}, "additional properties 'strategy' not allowed"),
        ({"healthPort": 80}, "/realtime/healthPort"),
        ({"healthPort": 70000}, "/realtime/healthPort"),
        ({"pollSeconds": 0}, "/realtime/pollSeconds"),
        ({"pollSeconds": "5"}, "/realtime/pollSeconds"),
        ({"terminationGracePeriodSeconds": 0}, "/realtime/terminationGracePeriodSeconds"),
        ({"symbols": ["AAPL,MSFT"]}, "/realtime/symbols/0"),
        ({"symbols": ["AAPL", "AAPL"]}, "/realtime/symbols"),
        ({"symbols": "AAPL"}, "/realtime/symbols"),
        ({"enabled": "true"}, "/realtime/enabled"),
        ({"resources": {"requests": {"cpu": 1, "memory": "1Gi"}}}, "/realtime/resources"),
    ],
    ids=[
        "interval-3m",
        "interval-1h",
        "mode",
        "source",
        "replicas",
        "strategy",
        "privileged-port",
        "port-too-high",
        "poll-zero",
        "poll-string",
        "no-grace",
        "comma-in-symbol",
        "duplicate-symbol",
        "symbols-string",
        "enabled-string",
        "resources-without-limits",
    ],
)
def test_realtime_values_outside_the_schema_fail(realtime: dict[str, Any], expected: str) -> None:
    message = render_error(merged(MINIMAL, REALTIME_ON, {"realtime": realtime}))
    assert "schema" in message and expected in message


def test_every_documented_realtime_choice_renders() -> None:
    choices = [
        *({"interval": i} for i in ("1m", "2m", "5m", "15m")),
        *({"mode": m} for m in ("poll", "stream")),
        *({"source": s} for s in ("yahoo_finance", "alpha_vantage")),
    ]
    for choice in choices:
        ((flag, value),) = choice.items()
        args = realtime_container(render(merged(MINIMAL, REALTIME_ON, {"realtime": choice})))["args"]
        assert args[args.index(f"--{flag}") + 1] == value
    args = realtime_container(render(merged(MINIMAL, REALTIME_ON, {"realtime": {"pollSeconds": 2.5}})))["args"]
    assert args[args.index("--poll-seconds") + 1] == "2.5"


def test_realtime_without_symbols_fails_with_a_message() -> None:
    for realtime in ({"enabled": True}, {"enabled": True, "symbols": []}):
        message = render_error(merged(MINIMAL, {"realtime": realtime}))
        assert "realtime.symbols is required when realtime.enabled" in message
    # disabled, the empty default renders
    assert not [d for d in render(merged(MINIMAL, {"realtime": {"symbols": []}})) if is_realtime(d)]


def test_a_production_realtime_release_still_needs_a_persistent_spool() -> None:
    message = render_error(merged(MINIMAL, REALTIME_ON, {"environment": "production"}))
    assert "spool.existingClaim" in message


def test_notes_describe_the_realtime_deployment() -> None:
    notes = render_files(merged(MINIMAL, REALTIME_ON))["marketpipe/templates/NOTES.txt"]
    assert "The realtime Deployment (mp-marketpipe-realtime) runs `marketpipe realtime` for AAPL, MSFT, ^GSPC" in notes
    assert f"kubectl -n {NAMESPACE} rollout status deployment/mp-marketpipe-realtime" in notes
    assert "The realtime pod's spool is an emptyDir too" in notes
    # the generated token may arrive after the pod started: NOTES says how to pick it up
    assert f"kubectl -n {NAMESPACE} rollout restart deployment/mp-marketpipe-realtime" in notes
    production = render_files(merged(CASES["production"], REALTIME_ON))["marketpipe/templates/NOTES.txt"]
    assert "marketpipe realtime" in production
    assert "emptyDir" not in production and "rollout restart" not in production
