"""The flow runs' bucket-scoped InfluxDB token, made by `marketpipe setup --scoped-token-secret`.

No InfluxDB 2.x server and no Kubernetes cluster can run here, so both are loopback fakes of
*external* APIs: ``FakeInfluxDB`` speaks the few InfluxDB 2.x endpoints setup uses (buckets,
authorizations), ``FakeKubernetes`` the two Secret endpoints (GET and PATCH
/api/v1/namespaces/NS/secrets/NAME). Each records the requests it got, so the tests assert what
was sent. Our own parts are real: influxdb-client and kubernetes-asyncio make the requests, and
the end-to-end test runs the `marketpipe` command against a real Prefect server.
"""

from __future__ import annotations

import base64
import gzip
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from pydantic import SecretStr

from flows.scoped_token import (
    OPERATOR_TOKEN_ENV,
    ScopedTokenError,
    authorization_description,
    ensure_scoped_authorization,
    read_secret_token,
    retire_authorizations,
    store_token_in_secret,
)
from tests.conftest import marketpipe, marketpipe_process
from tests.servers import serving_http

ORG, ORG_ID = "marketpipe", "0123456789abcdef"
BUCKET, BUCKET_ID = "market_data", "fedcba9876543210"
OPERATOR = SecretStr("operator-token-" + "o" * 40)
KUBE_TOKEN = "kube-serviceaccount-token"
NAMESPACE, SECRET = "marketpipe", "mp-marketpipe-flow-run-env"
DESCRIPTION = authorization_description(BUCKET)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class Fake:
    """A loopback HTTP server whose ``respond`` answers each request; ``requests`` keeps them all."""

    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def respond(self, request: Request) -> tuple[int, Any]:
        raise NotImplementedError

    @classmethod
    @contextmanager
    def serving(cls, **kwargs: Any) -> Iterator[Any]:
        fake = cls(**kwargs)

        def handle(http: BaseHTTPRequestHandler) -> None:
            raw = http.rfile.read(int(http.headers.get("Content-Length") or 0))
            if http.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
            parts = urlsplit(http.path)
            request = Request(
                http.command,
                parts.path,
                parse_qs(parts.query),
                {k.lower(): v for k, v in http.headers.items()},
                json.loads(raw) if raw else None,
            )
            fake.requests.append(request)
            status, payload = fake.respond(request)
            body = b"" if payload is None else json.dumps(payload).encode()
            http.send_response(status)
            http.send_header("Content-Type", "application/json")
            http.send_header("Content-Length", str(len(body)))
            http.end_headers()
            http.wfile.write(body)

        with serving_http(handle) as url:
            fake.url = url
            yield fake


def permission(action: str, kind: str = "buckets", resource_id: str | None = BUCKET_ID) -> dict[str, Any]:
    resource = {"type": kind, "orgID": ORG_ID, **({"id": resource_id} if resource_id else {})}
    return {"action": action, "resource": resource}


@dataclass
class FakeInfluxDB(Fake):
    """InfluxDB 2.x's buckets and authorizations API, with one org, one bucket and the operator token."""

    authorizations: list[dict[str, Any]] = field(default_factory=list)
    retention_seconds: int = 0

    def respond(self, request: Request) -> tuple[int, Any]:
        if request.headers.get("authorization") != f"Token {OPERATOR.get_secret_value()}":
            return 401, {"code": "unauthorized", "message": "unauthorized access"}
        path, method = request.path, request.method
        if path == "/api/v2/buckets" and method == "GET":
            matches = request.query.get("name") == [BUCKET] and request.query.get("org", [ORG]) == [ORG]
            return 200, {"buckets": [self.bucket()] if matches else []}
        if path == f"/api/v2/buckets/{BUCKET_ID}" and method == "PATCH":
            self.retention_seconds = request.body["retentionRules"][0]["everySeconds"]
            return 200, self.bucket()
        if path == "/api/v2/authorizations" and method == "GET":
            assert request.query["orgID"] == [ORG_ID]
            return 200, {"authorizations": self.authorizations, "links": {"self": "/api/v2/authorizations"}}
        if path == "/api/v2/authorizations" and method == "POST":
            auth_id = secrets.token_hex(8)
            made = {
                **request.body,
                "id": auth_id,
                "links": {"self": f"/api/v2/authorizations/{auth_id}", "user": "/api/v2/users/aaaaaaaaaaaaaaaa"},
                "token": "scoped-" + secrets.token_urlsafe(24),
                "status": request.body.get("status", "active"),
                "userID": "aaaaaaaaaaaaaaaa",
            }
            self.authorizations.append(made)
            return 201, made
        if path.startswith("/api/v2/authorizations/") and method == "DELETE":
            auth_id = path.rsplit("/", 1)[1]
            self.authorizations = [a for a in self.authorizations if a["id"] != auth_id]
            return 204, None
        return 404, {"code": "not found", "message": f"no route {method} {path}"}

    def bucket(self) -> dict[str, Any]:
        rules = [{"type": "expire", "everySeconds": self.retention_seconds}] if self.retention_seconds else []
        return {"id": BUCKET_ID, "orgID": ORG_ID, "name": BUCKET, "type": "user", "retentionRules": rules}

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]


@dataclass
class FakeKubernetes(Fake):
    """The Kubernetes API's Secret read and patch, for the Secrets in ``secrets`` (name -> data)."""

    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    forbidden: bool = False

    def respond(self, request: Request) -> tuple[int, Any]:
        prefix = f"/api/v1/namespaces/{NAMESPACE}/secrets/"
        name = request.path.removeprefix(prefix)
        if request.headers.get("authorization") != f"Bearer {KUBE_TOKEN}":
            return 401, self.status(401, "Unauthorized", "Unauthorized")
        if self.forbidden:
            message = f'secrets "{name}" is forbidden: User cannot {request.method.lower()} resource "secrets"'
            return 403, self.status(403, "Forbidden", message)
        if not request.path.startswith(prefix) or name not in self.secrets:
            return 404, self.status(404, "NotFound", f'secrets "{name}" not found')
        if request.method == "PATCH":
            self.secrets[name] = {**self.secrets[name], **request.body["data"]}
        elif request.method != "GET":
            return 405, self.status(405, "MethodNotAllowed", "method not allowed")
        metadata = {"name": name, "namespace": NAMESPACE}
        return 200, {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": "Opaque",
            "data": self.secrets[name],
        }

    @staticmethod
    def status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }

    def token(self, name: str = SECRET) -> str:
        return base64.b64decode(self.secrets[name].get("INFLUXDB_TOKEN", "")).decode()


@pytest.fixture
def influxdb() -> Iterator[FakeInfluxDB]:
    with FakeInfluxDB.serving() as fake:
        yield fake


@pytest.fixture
def kubernetes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetes]:
    """The fake API server, reached through a kubeconfig (KUBECONFIG), as outside a pod."""
    with FakeKubernetes.serving(secrets={SECRET: {"INFLUXDB_TOKEN": "", "ALPHA_VANTAGE_API_KEY": "YXY="}}) as fake:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(kubeconfig_for(fake.url)))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield fake


def kubeconfig_for(server: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "setup", "user": {"token": KUBE_TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "setup", "namespace": NAMESPACE}}],
        "current-context": "fake",
    }


def ensure(influxdb: FakeInfluxDB, current: SecretStr | None) -> Any:
    return ensure_scoped_authorization(influxdb.url, ORG, BUCKET, OPERATOR, current)


# --- the authorization -------------------------------------------------------------------------


def test_a_bucket_scoped_authorization_is_created_once_then_reused(influxdb: FakeInfluxDB) -> None:
    made = ensure(influxdb, current=None)
    assert made.created and made.stale == ()
    (post,) = influxdb.calls("POST", "/api/v2/authorizations")
    # read and write on the one bucket, in its org: no org-wide, no all-access permission
    assert post.body["orgID"] == ORG_ID and post.body["description"] == DESCRIPTION
    assert sorted(post.body["permissions"], key=lambda p: p["action"]) == [permission("read"), permission("write")]
    assert made.token.get_secret_value() == influxdb.authorizations[0]["token"] != OPERATOR.get_secret_value()
    (lookup,) = influxdb.calls("GET", "/api/v2/buckets")
    assert lookup.query == {"name": [BUCKET], "org": [ORG]}

    again = ensure(influxdb, current=made.token)
    assert not again.created and again.id == made.id and again.token == made.token
    assert len(influxdb.calls("POST", "/api/v2/authorizations")) == 1
    assert len(influxdb.authorizations) == 1


def test_a_secret_without_the_tokens_value_gets_a_new_one_and_the_old_one_is_retired(influxdb: FakeInfluxDB) -> None:
    """The Secret was emptied or rewritten: the old token is held nowhere, so it goes."""
    old = ensure(influxdb, current=None)
    fresh = ensure(influxdb, current=SecretStr("something-else"))
    assert fresh.created and fresh.token != old.token and fresh.stale == (old.id,)
    assert retire_authorizations(influxdb.url, ORG, OPERATOR, fresh.stale) == 1
    assert [r.path for r in influxdb.calls("DELETE", f"/api/v2/authorizations/{old.id}")] == [
        f"/api/v2/authorizations/{old.id}"
    ]
    assert [a["id"] for a in influxdb.authorizations] == [fresh.id]


@pytest.mark.parametrize(
    "permissions",
    [
        [permission("read"), permission("write"), permission("write", "orgs", None)],
        [permission("read")],
        [permission("read", resource_id="0000000000000001"), permission("write", resource_id="0000000000000001")],
    ],
    ids=["wider", "read-only", "another-bucket"],
)
def test_an_authorization_that_is_not_exactly_the_buckets_is_replaced(
    influxdb: FakeInfluxDB, permissions: list[dict[str, Any]]
) -> None:
    held = "held-" + secrets.token_hex(8)
    influxdb.authorizations.append(
        {"id": "1111111111111111", "token": held, "status": "active", "description": DESCRIPTION,
         "orgID": ORG_ID, "permissions": permissions}
    )  # fmt: skip
    made = ensure(influxdb, current=SecretStr(held))
    assert made.created and made.token.get_secret_value() != held and made.stale == ("1111111111111111",)


def test_an_inactive_authorization_is_replaced(influxdb: FakeInfluxDB) -> None:
    held = "held-" + secrets.token_hex(8)
    influxdb.authorizations.append(
        {"id": "2222222222222222", "token": held, "status": "inactive", "description": DESCRIPTION,
         "orgID": ORG_ID, "permissions": [permission("read"), permission("write")]}
    )  # fmt: skip
    assert ensure(influxdb, current=SecretStr(held)).created


def test_a_wrong_operator_token_fails_naming_the_variable_not_the_token(influxdb: FakeInfluxDB) -> None:
    wrong = SecretStr("not-the-operator-" + secrets.token_hex(8))
    with pytest.raises(ScopedTokenError) as caught:
        ensure_scoped_authorization(influxdb.url, ORG, BUCKET, wrong, current=None)
    message = str(caught.value)
    assert "401" in message and OPERATOR_TOKEN_ENV in message and "operator" in message
    assert wrong.get_secret_value() not in message and influxdb.authorizations == []


def test_a_missing_bucket_or_server_fails_with_what_to_check(influxdb: FakeInfluxDB) -> None:
    with pytest.raises(ScopedTokenError, match=r"has no bucket elsewhere in org marketpipe.*INFLUXDB_BUCKET"):
        ensure_scoped_authorization(influxdb.url, ORG, "elsewhere", OPERATOR, current=None)
    influxdb_url = influxdb.url
    with pytest.raises(ScopedTokenError, match=r"unreachable.*INFLUXDB_URL"):
        ensure_scoped_authorization(influxdb_url.rsplit(":", 1)[0] + ":9", ORG, BUCKET, OPERATOR, current=None)


# --- the Kubernetes Secret ---------------------------------------------------------------------


def test_the_token_is_patched_into_the_secret_keeping_its_other_keys(kubernetes: FakeKubernetes) -> None:
    assert read_secret_token(SECRET, NAMESPACE) is None  # the chart renders it empty
    token = SecretStr("scoped-" + secrets.token_hex(16))
    store_token_in_secret(SECRET, NAMESPACE, token)
    get, patch = kubernetes.requests
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}"
    assert (get.method, get.path, patch.method, patch.path) == ("GET", path, "PATCH", path)
    assert patch.headers["content-type"] == "application/strategic-merge-patch+json"
    assert patch.body == {"data": {"INFLUXDB_TOKEN": base64.b64encode(token.get_secret_value().encode()).decode()}}
    assert all(r.headers["authorization"] == f"Bearer {KUBE_TOKEN}" for r in kubernetes.requests)
    assert kubernetes.secrets[SECRET]["ALPHA_VANTAGE_API_KEY"] == "YXY="
    assert read_secret_token(SECRET, NAMESPACE) == token


def test_secret_errors_say_what_to_check(kubernetes: FakeKubernetes) -> None:
    with pytest.raises(ScopedTokenError, match=r"Secret marketpipe/other does not exist.*--scoped-token-secret"):
        read_secret_token("other", NAMESPACE)
    kubernetes.forbidden = True
    token = SecretStr("scoped-" + secrets.token_hex(16))
    with pytest.raises(ScopedTokenError) as caught:
        store_token_in_secret(SECRET, NAMESPACE, token)
    message = str(caught.value)
    assert "refused to patch Secret marketpipe/mp-marketpipe-flow-run-env (403" in message and "Role" in message
    assert token.get_secret_value() not in message


def test_no_kubernetes_api_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ScopedTokenError, match=r"no Kubernetes API.*KUBECONFIG"):
        read_secret_token(SECRET, NAMESPACE)


# --- `marketpipe setup --scoped-token-secret`, end to end --------------------------------------


def test_setup_saves_the_scoped_token_never_the_operator_token(
    prefect_env: dict[str, str], influxdb: FakeInfluxDB, kubernetes: FakeKubernetes, tmp_path: Path
) -> None:
    """The chart's setup Job: the operator token makes the bucket's retention and the scoped token;
    the Secret and the saved store block get the scoped one; a second run changes nothing."""
    block = "scoped-token-test-store"
    kubeconfig = tmp_path / "kubeconfig"
    env = {
        **prefect_env,
        "KUBECONFIG": str(kubeconfig),
        "MARKETPIPE_ENV": "production",
        "MARKETPIPE__STORAGE__BLOCK": block,
        "MARKETPIPE__RETENTION__DURATION": "30d",
        "INFLUXDB_URL": influxdb.url,
        "INFLUXDB_ORG": ORG,
        "INFLUXDB_BUCKET": BUCKET,
        "INFLUXDB_TOKEN": "",  # what the flow-run env Secret holds before setup
        OPERATOR_TOKEN_ENV: OPERATOR.get_secret_value(),
        "ALPHA_VANTAGE_API_KEY": "",
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    args = ("setup", "--scoped-token-secret", SECRET, "--scoped-token-namespace", NAMESPACE)
    first = marketpipe_process(*args, env=env)  # a child: its log lines are searched for the tokens too
    assert first.returncode == 0, first.stdout + first.stderr
    scoped = kubernetes.token()
    assert scoped.startswith("scoped-") and scoped == influxdb.authorizations[0]["token"]
    assert f"created  influxdb authorization '{DESCRIPTION}'" in first.stdout
    assert f"updated  secret {NAMESPACE}/{SECRET} key INFLUXDB_TOKEN" in first.stdout
    assert f"created  block marketpipe-influxdb-store/{block}" in first.stdout
    for output in (first.stdout, first.stderr):
        assert scoped not in output and OPERATOR.get_secret_value() not in output
    # the bucket's retention was set with the operator token, before the authorization was made for it
    assert influxdb.retention_seconds == 30 * 86400
    patch = influxdb.calls("PATCH", f"/api/v2/buckets/{BUCKET_ID}")[0]
    assert influxdb.requests.index(patch) < influxdb.requests.index(influxdb.calls("POST", "/api/v2/authorizations")[0])

    from blocks.influxdb_store import InfluxDBStore

    saved = cast(InfluxDBStore, InfluxDBStore.load(block))
    assert saved.token.get_secret_value() == scoped
    assert (saved.url, saved.org, saved.bucket) == (influxdb.url, ORG, BUCKET)

    # the setup Job again (every upgrade): the Secret's token is reused, nothing is made or saved
    second = marketpipe(*args, env={**env, "INFLUXDB_TOKEN": scoped})
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"unchanged  influxdb authorization '{DESCRIPTION}'" in second.stdout
    assert f"unchanged  block marketpipe-influxdb-store/{block}" in second.stdout
    assert len(influxdb.calls("POST", "/api/v2/authorizations")) == 1 and kubernetes.token() == scoped

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:  # leave the session's server as it was
        for source in ("yahoo_finance", "alpha_vantage", "files"):
            with suppress(ObjectNotFound):
                client.delete_concurrency_limit_by_tag(f"collect:{source}")


def test_setup_without_the_operator_token_is_a_usage_error(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MARKETPIPE_ENV": "production", OPERATOR_TOKEN_ENV: ""}
    result = marketpipe("setup", "--scoped-token-secret", SECRET, "--scoped-token-namespace", NAMESPACE, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"needs the InfluxDB operator token in {OPERATOR_TOKEN_ENV}" in result.stderr
