"""A fake Kubernetes API server on 127.0.0.1: the REST paths the ``kubernetes`` client calls.

It is the only stand-in in the cluster tests: everything above the HTTP boundary (the real
``kubernetes`` client, kubeconfig loading, our launcher and Katib client) runs unmodified.

Served: ``GET /api/v1/namespaces/{ns}``; create/get/list/delete of namespaced custom objects
(``/apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]``); ``GET .../pods`` (list) and
``GET .../pods/{name}/log``. Tests script what it answers:

- ``statuses[plural]``: the ``status`` a custom object shows on successive GETs (the last one
  repeats), e.g. Created -> Running -> Succeeded;
- ``pods``: the pod list (dicts) on successive list calls (the last repeats);
- ``logs[pod]``: the text a pod's log stream sends;
- ``fail[(method, plural)] = (code, message)``: answer that call with a Kubernetes Status error;
- ``on_create(plural, body)``: a hook standing in for the operator (e.g. write the model).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

CUSTOM = re.compile(r"^/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
NAMESPACE = re.compile(r"^/api/v1/namespaces/([^/]+)$")


def status_body(code: int, message: str, reason: str = "") -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def condition(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def pod(
    name: str,
    replica_type: str = "master",
    job: str = "",
    phase: str = "Running",
    waiting: tuple[str, str] | None = None,
    terminated: str | None = None,
    last_terminated: str | None = None,
    unschedulable: str | None = None,
) -> dict[str, Any]:
    """A pod as the API returns it, with the fields the client's models require."""
    state: dict[str, Any] = {"running": {"startedAt": "2025-01-01T00:00:00Z"}}
    if waiting:
        state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    if terminated:
        state = {"terminated": {"reason": terminated, "exitCode": 137}}
    last = {"terminated": {"reason": last_terminated, "exitCode": 137}} if last_terminated else {}
    status: dict[str, Any] = {
        "phase": phase,
        "containerStatuses": [
            {
                "name": "pytorch",
                "image": "registry.example/kubetrain:test",
                "imageID": "",
                "ready": phase == "Running",
                "restartCount": 1 if last_terminated else 0,
                "state": state,
                "lastState": last,
            }
        ],
    }
    if unschedulable:
        status["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
        ]
        del status["containerStatuses"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "training.kubeflow.org/job-name": job,
                "training.kubeflow.org/replica-type": replica_type,
            },
        },
        "status": status,
    }


class FakeKubeApiServer:
    """See the module docstring. ``url`` is where it listens; ``requests`` logs every call."""

    def __init__(self, namespaces: tuple[str, ...] = ("team-a",)):
        self.namespaces = set(namespaces)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.statuses: dict[str, list[dict[str, Any]]] = {}
        self.pods: list[list[dict[str, Any]]] = [[]]
        self.logs: dict[str, str] = {}
        self.fail: dict[tuple[str, str], tuple[int, str]] = {}
        self.on_create: Callable[[str, dict[str, Any]], None] | None = None
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self._gets: dict[tuple[str, str], int] = {}
        self._pod_lists = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeKubeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go away: the port refuses connections from now on."""
        self._server.shutdown()
        self._server.server_close()

    def stop_after(self, seconds: float) -> None:
        threading.Timer(seconds, self.stop).start()

    def write_kubeconfig(self, path: Path, namespace: str = "team-a") -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {
                                "cluster": "fake",
                                "user": "tester",
                                "namespace": namespace,
                            },
                        }
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    @property
    def live_objects(self) -> list[str]:
        """``plural/name`` of every custom object that exists now (nothing left behind?)."""
        return sorted(f"{plural}/{name}" for plural, name in self.objects)

    # -- the handler -----------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                with fake._lock:
                    fake.requests.append((method, url.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with contextlib.suppress(BrokenPipeError):
                    fake._dispatch(self, method, url.path, query, body)

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler

    def _dispatch(self, h, method: str, path: str, query: dict, body: Any) -> None:
        if m := NAMESPACE.match(path):
            ns = m.group(1)
            if ("GET", "namespaces") in self.fail:
                return h._send(*self._error("GET", "namespaces"))
            if ns in self.namespaces:
                return h._send(200, {"kind": "Namespace", "metadata": {"name": ns}})
            return h._send(404, status_body(404, f'namespaces "{ns}" not found', "NotFound"))
        if m := POD_LOG.match(path):
            text = self.logs.get(m.group(2), "")
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.end_headers()
            for line in text.splitlines(keepends=True):
                h.wfile.write(line.encode())
                h.wfile.flush()
            return None
        if PODS.match(path):
            with self._lock:
                items = self.pods[min(self._pod_lists, len(self.pods) - 1)]
                self._pod_lists += 1
            selector = (query.get("labelSelector") or [""])[0]
            return h._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                 "items": [p for p in items if _selects(selector, p)]})  # fmt: skip
        if m := CUSTOM.match(path):
            _group, _version, ns, plural, name = m.groups()
            if (method, plural) in self.fail:
                return h._send(*self._error(method, plural))
            if ns not in self.namespaces:
                return h._send(404, status_body(404, f'namespaces "{ns}" not found', "NotFound"))
            return self._custom(h, method, plural, name, query, body)
        return h._send(404, status_body(404, "the server could not find the requested resource"))

    def _error(self, method: str, plural: str) -> tuple[int, dict[str, Any]]:
        code, message = self.fail[(method, plural)]
        return code, status_body(code, message)

    def _custom(self, h, method: str, plural: str, name: str | None, query, body) -> None:
        key = (plural, name or "")
        if method == "POST":
            key = (plural, body["metadata"]["name"])
            if key in self.objects:
                msg = f'{plural}.kubeflow.org "{key[1]}" already exists'
                return h._send(409, status_body(409, msg, "AlreadyExists"))
            obj = {**body, "metadata": {**body["metadata"], "uid": "u-1"}}
            with self._lock:
                self.objects[key] = obj
                self.created.append(body)
            if self.on_create:
                self.on_create(plural, body)
            return h._send(201, obj)
        if method == "GET" and name is None:
            selector = (query.get("labelSelector") or [""])[0]
            items = [
                o for (p, _), o in self.objects.items() if p == plural and _selects(selector, o)
            ]
            return h._send(200, {"items": items, "metadata": {}})
        if key not in self.objects:
            return h._send(404, status_body(404, f'{plural} "{name}" not found', "NotFound"))
        if method == "DELETE":
            with self._lock:
                del self.objects[key]
                self.deleted.append(name)
            return h._send(200, {"kind": "Status", "status": "Success"})
        script = self.statuses.get(plural) or [{}]
        with self._lock:
            n = self._gets.get(key, 0)
            self._gets[key] = n + 1
        obj = {**self.objects[key], "status": script[min(n, len(script) - 1)]}
        return h._send(200, obj)


def _selects(selector: str, obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


@contextmanager
def running(tmp_path: Path, monkeypatch, namespaces: tuple[str, ...] = ("team-a",)):
    """A started fake whose kubeconfig is $KUBECONFIG (and no in-cluster settings)."""
    fake = FakeKubeApiServer(namespaces).start()
    monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        yield fake
    finally:
        with contextlib.suppress(OSError):
            fake.stop()
