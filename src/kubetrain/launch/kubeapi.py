"""The one thin client that talks to the Kubernetes API (through the ``kubernetes`` package).

Everything else in ``kubetrain.launch`` and ``kubetrain.tune.katib`` builds plain dicts; this
module sends them, reads and watches them, and turns every API failure into one
``KubeApiError`` line that names the object (``pytorchjob kubeflow/kubetrain-train-1a2b3c``)
and says what to do. The calls it makes are what the pipeline's Role in
``manifests/base/rbac.yaml`` grants, except the namespace check (``get namespaces``), which the
Role refuses by design and a 403 lets pass (tests/cluster proves both directions).
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubetrain.core.errors import KubetrainError

log = logging.getLogger(__name__)

# Seconds to connect / to read one API answer; log streams read without a limit.
REQUEST_TIMEOUT = (10, 60)


class KubeApiError(KubetrainError):
    """An API call failed; ``status`` is the HTTP status (0: the server could not be reached)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Resource:
    """A custom resource type: ``kubeflow.org/v1`` ``pytorchjobs`` (kind PyTorchJob)."""

    group: str
    version: str
    plural: str
    kind: str

    def describe(self, namespace: str, name: str) -> str:
        return f"{self.kind.lower()} {namespace}/{name}"


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


class KubeApi:
    """Custom objects, pods and logs in one namespace; every failure is a ``KubeApiError``."""

    def __init__(self, namespace: str, api_client: Any | None = None):
        from kubernetes import client

        self.namespace = namespace
        self.api_client = api_client or self._connect()
        self.host = self.api_client.configuration.host
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    @staticmethod
    def _connect() -> Any:
        """An ApiClient from the in-cluster service account or the kubeconfig (KUBECONFIG)."""
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        configuration = client.Configuration()
        try:
            if _in_cluster():
                config.load_incluster_config(client_configuration=configuration)
            else:
                # Read KUBECONFIG now: the kubernetes package reads it once, at import.
                config.load_kube_config(
                    config_file=os.environ.get("KUBECONFIG") or None,
                    client_configuration=configuration,
                )
        except ConfigException as err:
            where = os.environ.get("KUBECONFIG", "~/.kube/config")
            raise KubeApiError(
                f"cluster.backend 'kubernetes': no usable Kubernetes configuration ({where}: "
                f"{str(err).strip().splitlines()[0]}); point KUBECONFIG at your cluster's "
                "kubeconfig or run inside the cluster"
            ) from None
        # No silent urllib3 retries: the lifecycle's wait rides out outages and says so.
        configuration.retries = 0
        return client.ApiClient(configuration)

    # -- error mapping ---------------------------------------------------------------------

    def error(self, err: Exception, action: str, what: str) -> KubeApiError:
        """One line for a failed ``action`` ("create", "get", ...) on ``what`` ("pytorchjob ns/n")."""
        from kubernetes.client.exceptions import ApiException

        if not isinstance(err, ApiException):
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return KubeApiError(
                f"cannot reach the Kubernetes API at {self.host} to {action} {what}: "
                f"{type(err).__name__}: {reason[:300]}",
                status=0,
            )
        message = _status_message(err)
        match err.status:
            case 401:
                text = f"the Kubernetes API at {self.host} rejected the credentials ({message})"
            case 403:
                text = f"not allowed to {action} {what}: {message}"
            case 404:
                text = f"cannot {action} {what}: not found ({message})"
            case 409:
                text = f"cannot {action} {what}: it already exists ({message})"
            case 422 | 400:
                text = f"the API server rejected {what}: {message}"
            case _:
                text = f"cannot {action} {what}: HTTP {err.status} {err.reason}: {message}"
        return KubeApiError(text, status=err.status or 0)

    def _call(self, action: str, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except KubetrainError:
            raise
        except Exception as err:  # ApiException, urllib3 connection errors
            raise self.error(err, action, what) from None

    # -- namespace -------------------------------------------------------------------------

    def check_namespace(self) -> None:
        """Raise if the namespace does not exist; a 403 (no right to read namespaces) passes."""
        try:
            self.core.read_namespace(self.namespace, _request_timeout=REQUEST_TIMEOUT)
        except Exception as err:
            mapped = self.error(err, "read", f"namespace {self.namespace}")
            if mapped.status == 404:
                raise KubeApiError(
                    f"namespace '{self.namespace}' does not exist on the cluster at {self.host}; "
                    "create it or set cluster.namespace",
                    status=404,
                ) from None
            if mapped.status != 403:  # namespaced RBAC cannot read namespaces: let create tell
                raise mapped from None

    # -- discovery -------------------------------------------------------------------------

    def served(self, group: str, version: str) -> set[str]:
        """The resources (plurals) the API server serves in ``group/version``; empty if it
        serves no such group version. Discovery (``GET /apis/GROUP/VERSION``) is open to every
        authenticated account (the ``system:discovery`` ClusterRole): no Role rule needed.

        Raises:
            KubeApiError: the server cannot be reached or refuses the credentials.
        """
        try:
            found = self.custom.get_api_resources(group, version, _request_timeout=REQUEST_TIMEOUT)
        except Exception as err:
            mapped = self.error(err, "discover", f"{group}/{version}")
            if mapped.status == 404:
                return set()
            raise mapped from None
        return {r.name for r in found.resources or [] if "/" not in r.name}

    # -- custom objects --------------------------------------------------------------------

    def create(self, res: Resource, body: dict[str, Any]) -> dict[str, Any]:
        """Create ``body``; the server refuses unknown or duplicate fields (Strict validation)
        instead of dropping them. Raises KubeApiError (409: the name is taken, 422: invalid)."""
        name = body["metadata"]["name"]
        what = res.describe(self.namespace, name)
        try:
            return self.custom.create_namespaced_custom_object(
                res.group, res.version, self.namespace, res.plural, body,
                field_validation="Strict", _request_timeout=REQUEST_TIMEOUT,
            )  # fmt: skip
        except Exception as err:
            mapped = self.error(err, "create", what)
            # A 404 is either "no such resource" (the kind is not served) or "no such
            # namespace"; the Status says which in details.kind, whatever the names contain.
            if mapped.status == 404 and _status_details(err).get("kind") != "namespaces":
                raise KubeApiError(
                    f"cannot create {what}: the API server at {self.host} has no "
                    f"{res.plural}.{res.group}/{res.version} resource (is the operator that "
                    f"serves {res.kind} installed?)",
                    status=404,
                ) from None
            raise mapped from None

    def read(self, res: Resource, name: str) -> tuple[dict[str, Any] | None, str]:
        """(the object or None if it is gone, the list's resourceVersion to watch from).

        A list with a name selector rather than a GET: its resourceVersion is where a watch
        resumes without missing a change (the informer pattern), and RBAC needs no ``get``.
        """
        found = self._call(
            "read", res.describe(self.namespace, name), self.custom.list_namespaced_custom_object,
            res.group, res.version, self.namespace, res.plural,
            field_selector=f"metadata.name={name}", _request_timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
        items = found.get("items") or []
        return (items[0] if items else None), found["metadata"]["resourceVersion"]

    def watch(
        self, res: Resource, name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event type, object) for one object from ``resource_version`` on.

        The server ends the stream after ``timeout_seconds`` (the caller lists again and
        resumes). Raises KubeApiError with status 410 when ``resource_version`` is too old
        (resume from a fresh ``read``), status 0 when the connection drops.
        """
        import json

        what = res.describe(self.namespace, name)
        resp = self._call(
            "watch", what, self.custom.list_namespaced_custom_object,
            res.group, res.version, self.namespace, res.plural,
            field_selector=f"metadata.name={name}", watch=True, allow_watch_bookmarks=True,
            resource_version=resource_version, timeout_seconds=timeout_seconds,
            _preload_content=False, _request_timeout=(REQUEST_TIMEOUT[0], timeout_seconds + 30),
        )  # fmt: skip
        try:
            for line in _lines(resp, what, self):
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":  # a Status: 410 Gone when the version expired
                    raise KubeApiError(
                        f"watch of {what} ended: {obj.get('message') or obj.get('reason')}",
                        status=int(obj.get("code") or 500),
                    )
                yield event["type"], obj
        finally:
            resp.release_conn()

    def list(self, res: Resource, label_selector: str) -> list[dict[str, Any]]:
        """The objects of ``res`` in the namespace that match ``label_selector``."""
        found = self._call(
            "list", f"{res.plural} in namespace {self.namespace}",
            self.custom.list_namespaced_custom_object,
            res.group, res.version, self.namespace, res.plural,
            label_selector=label_selector, _request_timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
        return list(found.get("items") or [])

    def delete(self, res: Resource, name: str) -> bool:
        """Delete (pods go with it); False if it was already gone."""
        try:
            self.custom.delete_namespaced_custom_object(
                res.group, res.version, self.namespace, res.plural, name,
                propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT,
            )  # fmt: skip
        except Exception as err:
            mapped = self.error(err, "delete", res.describe(self.namespace, name))
            if mapped.status == 404:
                return False
            raise mapped from None
        return True

    # -- pods and logs ---------------------------------------------------------------------

    def pods(self, label_selector: str) -> builtins.list[Any]:
        found = self._call(
            "list", f"pods in namespace {self.namespace}", self.core.list_namespaced_pod,
            self.namespace, label_selector=label_selector, _request_timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
        return list(found.items or [])

    def follow_log(self, pod: str, container: str) -> Iterator[str]:
        """Yield the container's log lines as they come, until the container ends.

        Raises KubeApiError when there is no log to read: HTTP 204, the API server's answer for
        a pod that no kubelet runs (not scheduled yet, or a control plane without nodes).
        """
        resp = self._call(
            "read the log of", f"pod {self.namespace}/{pod}", self.core.read_namespaced_pod_log,
            pod, self.namespace, container=container, follow=True, _preload_content=False,
            _request_timeout=(REQUEST_TIMEOUT[0], None),
        )  # fmt: skip
        try:
            if resp.status == 204:
                raise KubeApiError(
                    f"no log of pod {self.namespace}/{pod}: no kubelet serves it (HTTP 204; "
                    "the pod has no node)",
                    status=204,
                )
            yield from _lines(resp, f"pod {self.namespace}/{pod}", self)
        finally:
            resp.release_conn()


def _lines(resp: Any, what: str, api: KubeApi) -> Iterator[str]:
    """The lines of a streamed answer; a dropped connection is a KubeApiError (status 0)."""
    pending = b""
    try:
        for chunk in resp.stream(4096, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
    except KubetrainError:
        raise
    except Exception as err:  # urllib3 ProtocolError / ReadTimeoutError: the server went away
        raise api.error(err, "stream", what) from None
    if pending.strip():
        yield pending.decode("utf-8", "replace")


def _status_body(err: Any) -> dict[str, Any]:
    """The Kubernetes Status an ApiException carries, or {}."""
    import json

    try:
        body = json.loads(getattr(err, "body", None) or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _status_details(err: Any) -> dict[str, Any]:
    """The Status's ``details`` (``{"name": "team-a", "kind": "namespaces"}``), or {}."""
    details = _status_body(err).get("details")
    return details if isinstance(details, dict) else {}


def _status_message(err: Any) -> str:
    """The ``message`` of a Kubernetes Status body, else the HTTP reason."""
    body = _status_body(err)
    if body.get("message"):
        # One line, whatever the server sends (validation lists causes on several lines).
        return " ".join(str(body["message"]).split())[:600]
    return str(err.reason or "no message")


class LogFollower:
    """Streams one pod's container log to ``emit`` in a background thread."""

    def __init__(self, api: KubeApi, pod: str, container: str, emit: Callable[[str], None]):
        self.pod = pod
        self._thread = threading.Thread(
            target=self._run, args=(api, container, emit), name=f"log-{pod}", daemon=True
        )
        self._thread.start()

    def _run(self, api: KubeApi, container: str, emit: Callable[[str], None]) -> None:
        try:
            for line in api.follow_log(self.pod, container):
                emit(f"[{self.pod}] {line}")
        except KubetrainError as err:  # the job's status decides the outcome, not the log
            log.warning("log of pod %s not shown: %s", self.pod, err)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
