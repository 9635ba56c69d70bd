"""The flow runs' InfluxDB token: one that may only read and write the bucket, never the operator's.

Where the Helm chart generates InfluxDB's credentials, its setup Job runs `marketpipe setup
--scoped-token-secret NAME`. With the operator token (``INFLUXDB_OPERATOR_TOKEN``, which only that
Job gets) it keeps one authorization limited to the bucket, writes its token into the flow runs'
env Secret through the Kubernetes API, and setup saves that token, not the operator's, in the store
block. Run again, it reuses the authorization whose token the Secret already holds.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.domain.authorization import Authorization
from influxdb_client.domain.permission import Permission
from influxdb_client.domain.permission_resource import PermissionResource
from influxdb_client.rest import ApiException as InfluxApiException
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException as KubeApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from pydantic import SecretStr
from urllib3.exceptions import HTTPError as Urllib3Error

from tasks.errors import MarketpipeError

OPERATOR_TOKEN_ENV = "INFLUXDB_OPERATOR_TOKEN"
SECRET_KEY = "INFLUXDB_TOKEN"
# Where a pod's ServiceAccount mount says which namespace the pod runs in.
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
ACTIONS = ("read", "write")
_ORG_ID = re.compile(r"[0-9a-f]{16}")


class ScopedTokenError(MarketpipeError):
    """The scoped token could not be made or stored; the message says what to check, never a token."""


@dataclass(frozen=True)
class ScopedTokenTarget:
    """Where the flow runs' bucket-scoped token goes (a Kubernetes Secret), and the token that makes it."""

    secret: str
    namespace: str
    operator_token: SecretStr


@dataclass(frozen=True)
class ScopedAuthorization:
    """The bucket's read/write authorization and its token; ``stale`` are older ones to retire."""

    id: str
    token: SecretStr
    created: bool
    stale: tuple[str, ...] = ()


def authorization_description(bucket: str) -> str:
    """How setup finds its own authorization again (InfluxDB has no other label for one)."""
    return f"marketpipe flow runs: read and write bucket {bucket}"


# --- InfluxDB 2.x ------------------------------------------------------------------------------


def ensure_scoped_authorization(
    url: str,
    org: str,
    bucket: str,
    operator_token: SecretStr,
    current: SecretStr | None,
    timeout: float = 30.0,
) -> ScopedAuthorization:
    """The authorization that may read and write ``bucket`` only: the existing one whose token is
    ``current`` (what the Secret holds), else a new one. Older ones with its description are
    listed in ``stale``, to be deleted once the Secret holds the new token."""
    description = authorization_description(bucket)
    with _Admin(url, org, operator_token, timeout, current) as admin:
        found = admin.call("look up the bucket", lambda: _find_bucket(admin.client, org, bucket))
        if found is None:
            raise ScopedTokenError(
                f"{admin.where} has no bucket {bucket} in org {org}: `marketpipe setup` creates it first, so check "
                "storage.influxdb.bucket and storage.influxdb.org (INFLUXDB_BUCKET, INFLUXDB_ORG)"
            )
        bucket_id, org_id = str(found.id), str(found.org_id)
        api = admin.client.authorizations_api()
        existing = admin.call("list authorizations", lambda: api.find_authorizations(org_id=org_id) or [])  # type: ignore[no-untyped-call]
        ours = [a for a in existing if a.description == description]
        for auth in ours:
            if current is not None and auth.token == current.get_secret_value() and _fits(auth, bucket_id):
                return ScopedAuthorization(str(auth.id), current, created=False)
        permissions = _permissions(bucket_id, org_id)
        wanted = Authorization(org_id=org_id, permissions=permissions, description=description)  # type: ignore[no-untyped-call]
        created = admin.call("create the authorization", lambda: api.create_authorization(authorization=wanted))
        if not created.token:
            raise ScopedTokenError(f"{admin.where} created authorization {created.id} without a token: delete it")
    return ScopedAuthorization(str(created.id), SecretStr(created.token), created=True, stale=tuple(a.id for a in ours))


def retire_authorizations(
    url: str, org: str, operator_token: SecretStr, ids: Iterable[str], timeout: float = 30.0
) -> int:
    """Delete the authorizations ``ids`` (setup's older tokens, which no Secret holds any more)."""
    count = 0
    with _Admin(url, org, operator_token, timeout) as admin:
        api = admin.client.authorizations_api()
        for auth_id in ids:
            admin.call(f"delete authorization {auth_id}", partial(api.delete_authorization, auth_id))
            count += 1
    return count


class _Admin:
    """InfluxDB with the operator token; a failure becomes a ScopedTokenError naming no token."""

    def __init__(self, url: str, org: str, token: SecretStr, timeout: float, *secrets: SecretStr | None) -> None:
        self.where = f"InfluxDB at {url}"
        self.client = InfluxDBClient(
            url=url, token=token.get_secret_value(), org=org, timeout=int(timeout * 1000), retries=False
        )
        self._secrets = [s.get_secret_value() for s in (token, *secrets) if s is not None and s.get_secret_value()]

    def __enter__(self) -> _Admin:
        return self

    def __exit__(self, *_: object) -> None:
        self.client.close()  # type: ignore[no-untyped-call]

    def call[T](self, action: str, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except InfluxApiException as exc:
            status = int(exc.status or 0)
            detail = self._redact(f"{status}: {exc.message or exc.reason}")
            if status in (401, 403):
                raise ScopedTokenError(
                    f"{self.where} refused to {action} ({detail}): {OPERATOR_TOKEN_ENV} must be the operator "
                    "(all-access) token, e.g. the admin token in the chart's InfluxDB auth Secret"
                ) from None
            raise ScopedTokenError(f"{self.where} could not {action} ({detail})") from None
        except (Urllib3Error, OSError) as exc:
            raise ScopedTokenError(
                f"{self.where} is unreachable ({self._redact(exc)}): check INFLUXDB_URL and that InfluxDB runs"
            ) from None

    def _redact(self, text: object) -> str:
        message = str(text)
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message


def _find_bucket(client: InfluxDBClient, org: str, bucket: str) -> Any:
    by = {"org_id" if _ORG_ID.fullmatch(org) else "org": org}
    found = client.buckets_api().find_buckets(name=bucket, **by).buckets or []  # type: ignore[no-untyped-call]
    return next((b for b in found if b.name == bucket), None)


def _permissions(bucket_id: str, org_id: str) -> list[Permission]:
    resource = PermissionResource(type="buckets", id=bucket_id, org_id=org_id)  # type: ignore[no-untyped-call]
    return [
        Permission(action=action, resource=resource)  # type: ignore[no-untyped-call]
        for action in ACTIONS
    ]


def _fits(auth: Authorization, bucket_id: str) -> bool:
    """Active, and exactly read and write on the one bucket: anything else is replaced."""
    granted = {(p.action, p.resource.type, p.resource.id) for p in auth.permissions or []}
    return auth.status == "active" and granted == {(a, "buckets", bucket_id) for a in ACTIONS}


# --- the Kubernetes Secret ---------------------------------------------------------------------


def read_secret_token(name: str, namespace: str) -> SecretStr | None:
    """The ``INFLUXDB_TOKEN`` the Secret holds; None while it is empty (before setup's first run)."""

    async def read() -> SecretStr | None:
        async with _core_v1() as api:
            secret = await _kube_call(api.read_namespaced_secret(name, namespace), "get", name, namespace)
        encoded = (secret.data or {}).get(SECRET_KEY) or ""
        value = base64.b64decode(encoded).decode() if encoded else ""
        return SecretStr(value) if value else None

    return asyncio.run(read())


def store_token_in_secret(name: str, namespace: str, token: SecretStr) -> None:
    """Set the Secret's ``INFLUXDB_TOKEN`` (a strategic merge patch: its other keys stay as they are)."""
    body = {"data": {SECRET_KEY: base64.b64encode(token.get_secret_value().encode()).decode()}}

    async def patch() -> None:
        async with _core_v1() as api:
            request = api.patch_namespaced_secret(name, namespace, body)
            await _kube_call(request, "patch", name, namespace)

    asyncio.run(patch())


def current_namespace() -> str | None:
    """The namespace of the pod this runs in, from its ServiceAccount mount; None outside a pod."""
    try:
        return NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None


@asynccontextmanager
async def _core_v1() -> AsyncIterator[CoreV1Api]:
    """In a pod its ServiceAccount; elsewhere the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    configuration = Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            # KUBECONFIG read now, not when the library was imported
            await kube_config.load_kube_config(os.environ.get("KUBECONFIG"), client_configuration=configuration)
    except (ConfigException, OSError) as exc:
        raise ScopedTokenError(
            f"no Kubernetes API to store the scoped token with ({exc}): run in the cluster with a ServiceAccount "
            "token mounted (the chart's setup Job) or set KUBECONFIG"
        ) from None
    async with ApiClient(configuration) as client:
        yield CoreV1Api(client)


async def _kube_call(request: Any, verb: str, name: str, namespace: str) -> Any:
    what = f"Secret {namespace}/{name}"
    try:
        return await request
    except KubeApiException as exc:
        status = int(exc.status or 0)
        if status in (401, 403):
            raise ScopedTokenError(
                f"the Kubernetes API refused to {verb} {what} ({status} {exc.reason}): the setup Job's "
                f"ServiceAccount needs a Role allowing get and patch on {what} (the chart's setup Role)"
            ) from None
        if status == 404:
            raise ScopedTokenError(
                f"{what} does not exist: the chart creates it with the release, so check --scoped-token-secret "
                "and --scoped-token-namespace"
            ) from None
        raise ScopedTokenError(f"the Kubernetes API could not {verb} {what} ({status} {exc.reason})") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise ScopedTokenError(
            f"the Kubernetes API is unreachable to {verb} {what} ({type(exc).__name__}: {exc})"
        ) from None
