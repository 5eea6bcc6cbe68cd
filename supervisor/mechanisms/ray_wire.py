"""Talking to a Ray cluster without importing Ray: the dashboard's HTTP state API, and the GCS's gRPC services
through the message types the installed Ray generated.

The supervisor is a client of its clusters, never a Ray driver, and what it asks is small: a few list queries
and four GCS calls. ``import ray`` alone costs a process about 52 MB resident (Ray's C++ core library, requests,
protobuf) and ``ray.util.state`` 11 MB more (pydantic): more than everything else the supervisor holds. So it
speaks to the cluster as Ray's own clients do, from Ray 2.60's code:

- The state API: ``GET /api/v0/<resource>`` with the query parameters ``StateApiClient._make_param`` builds
  (``ray/util/state/api.py:154``), answered as ``_make_http_get_request`` reads it (``api.py:237-244``).
- The GCS: the installed Ray's ``ray/core/generated/gcs_service_pb2*.py``, loaded under a private package name so
  that ``ray/__init__`` never runs; they import each other relatively (``from . import common_pb2``). Loading
  them beside a process's own ``import ray`` is fine: protobuf accepts the same file registered twice.
- Token authentication: ``authorization: Bearer <token>`` on HTTP requests and as gRPC metadata
  (``ray/_private/authentication/authentication_constants.py``, ``http_token_authentication.py:85``,
  ``grpc_authentication_client_interceptor.py``), with the token where Ray's loader looks: ``$RAY_AUTH_TOKEN``,
  else the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.
- TLS: ``RAY_USE_TLS`` with ``RAY_TLS_SERVER_CERT``, ``RAY_TLS_SERVER_KEY`` and ``RAY_TLS_CA_CERT``, as
  ``ray/_private/grpc_utils.py:67`` and ``ray/_common/tls_utils.py:85`` read them.

The Jobs SDK (``ray.mode=jobs``) and the node sweep's probe process still use Ray itself.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import sys
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

AUTHORIZATION = "authorization"
_PROTOS_PACKAGE = "_supervisor_ray_protos"


_K8S_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def _token(environ: Mapping[str, str]) -> str | None:
    """Where Ray's token loader looks, in its order: ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, the
    pod's service-account token when ``$RAY_ENABLE_K8S_TOKEN_AUTH`` is set, ``~/.ray/auth_token``. Of a file,
    the first line, as Ray reads it."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    files = [Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()] if environ.get("RAY_AUTH_TOKEN_PATH") else []
    if environ.get("RAY_ENABLE_K8S_TOKEN_AUTH", "").lower() in ("1", "true"):
        files.append(_K8S_TOKEN)
    files.append(Path(environ.get("HOME") or Path.home()) / ".ray" / "auth_token")
    for file in files:
        try:
            with file.open() as lines:
                token = lines.readline().strip()
        except OSError:
            continue
        if token:
            return token
    return None


def auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The header a cluster with ``RAY_AUTH_MODE=token`` wants; empty otherwise, or when no token is found (the
    cluster then refuses, and the caller's message says what to set)."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = _token(environ)
    return {AUTHORIZATION: f"Bearer {token}"} if token else {}


class StateApiError(RuntimeError):
    """The dashboard answered with an error: an HTTP status (``status``; 401 or 403 for a missing or wrong
    token) or the state API's own failure, with the message it gave."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def list_state(
    dashboard_url: str,
    resource: str,
    filters: Sequence[tuple[str, str, str]] = (),
    *,
    timeout_s: float,
    limit: int,
    detail: bool = False,
) -> list[dict[str, Any]]:
    """The entries of ``resource`` (actors, placement_groups, nodes, jobs) that pass every (key, predicate,
    value) filter, as the state API's JSON gives them. Raises ``StateApiError`` when the dashboard answers with
    an error, ``OSError`` (``urllib.error.URLError``, a timeout) when it does not answer."""
    params: list[tuple[str, Any]] = [("limit", limit), ("timeout", max(1, int(timeout_s))), ("detail", detail)]
    for key, predicate, value in filters:
        params += [("filter_keys", key), ("filter_predicates", predicate), ("filter_values", value)]
    body = get(dashboard_url, f"/api/v0/{resource}", params, timeout_s)
    if body.get("result") is False:
        raise StateApiError(f"the state API failed to list {resource}: {body.get('msg')}")
    return list(body["data"]["result"]["result"])


def get(dashboard_url: str, path: str, params: Sequence[tuple[str, Any]], timeout_s: float) -> dict[str, Any]:
    """GET a JSON document from the cluster's dashboard, authenticated as the cluster wants."""
    base = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
    query = urllib.parse.urlencode([(k, str(v)) for k, v in params])
    request = urllib.request.Request(f"{base.rstrip('/')}{path}?{query}", headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # the cluster's own dashboard
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise StateApiError(f"HTTP {exc.code} {exc.reason} from {path}: {_said(exc)}", exc.code) from None


def _said(error: urllib.error.HTTPError) -> str:
    """What the dashboard said with an error status: the state API's JSON ``msg``, else the body's start."""
    body = error.read(65536).decode(errors="replace")
    try:
        said = json.loads(body).get("msg")
    except (ValueError, AttributeError):
        said = None
    return str(said or body.strip() or "no message")[:500]


def ray_module_path(*parts: str) -> Path:
    """A file or folder inside the installed Ray package, found without importing it."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Ray is not installed")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def generated(name: str) -> types.ModuleType:
    """A module of the installed Ray's ``ray/core/generated`` (``autoscaler_pb2``), without running
    ``ray/__init__``."""
    if _PROTOS_PACKAGE not in sys.modules:
        package = types.ModuleType(_PROTOS_PACKAGE)
        package.__path__ = [str(ray_module_path("core", "generated"))]
        package.__package__ = _PROTOS_PACKAGE
        sys.modules[_PROTOS_PACKAGE] = package
    return importlib.import_module(f"{_PROTOS_PACKAGE}.{name}")


@functools.cache
def gcs_protos() -> tuple[types.ModuleType, types.ModuleType]:
    """(``gcs_service_pb2``, ``gcs_service_pb2_grpc``) of the installed Ray."""
    return generated("gcs_service_pb2"), generated("gcs_service_pb2_grpc")


TLS_FILES = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def tls_files(environ: Mapping[str, str] | None = None) -> tuple[Path, Path, Path] | None:
    """The certificate chain, key and CA a cluster with ``RAY_USE_TLS`` wants from its clients, as Ray's own
    clients find them: in the variables every process of the cluster shares (None: no TLS)."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        return None
    missing = [name for name in TLS_FILES if name not in environ]
    if missing:
        raise RuntimeError(f"RAY_USE_TLS is set, but not {', '.join(missing)}")
    chain, key, ca = (Path(environ[name]) for name in TLS_FILES)
    return chain, key, ca


def gcs_channel(address: str, environ: Mapping[str, str] | None = None) -> grpc.Channel:
    """A gRPC channel to the GCS at ``address`` (host:port), with TLS and the token as the cluster wants."""
    tls = tls_files(environ)
    if tls is not None:
        chain, key, ca = (path.read_bytes() for path in tls)
        credentials = grpc.ssl_channel_credentials(certificate_chain=chain, private_key=key, root_certificates=ca)
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    metadata = tuple(auth_headers(environ).items())
    return grpc.intercept_channel(channel, _AddMetadata(metadata)) if metadata else channel


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _AddMetadata(grpc.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (the token) to every unary call, as Ray's own client interceptor does."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        added = _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self._metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        return continuation(added, request)
