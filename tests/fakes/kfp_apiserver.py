"""A fake Kubeflow Pipelines API server (v2beta1 REST) on 127.0.0.1, for ``kfp.Client``.

Served: healthz; list/create experiments; create and get runs; list/create/delete recurring runs.
Everything above HTTP (``kfp.Client``, ``kfp_server_api``, our submit module) is real.
``fail[(method, path)] = (code, message)`` answers a call with an error.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class FakeKfpApiServer:
    def __init__(self, multi_user: bool = False):
        self.multi_user = multi_user
        self.experiments: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.recurring: dict[str, dict[str, Any]] = {}
        self.fail: dict[tuple[str, str], tuple[int, str]] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self._ids = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
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
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                fake.requests.append((method, url.path, query))
                if (method, url.path) in fake.fail:
                    code, message = fake.fail[(method, url.path)]
                    return self._send(code, {"error": message, "code": code, "message": message})
                return self._send(*fake._dispatch(method, url.path, query, body))

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler

    def _dispatch(self, method, path, query, body) -> tuple[int, Any]:
        match (method, path):
            case ("GET", "/apis/v2beta1/healthz"):
                return 200, {"multi_user": self.multi_user}
            case ("GET", "/apis/v2beta1/experiments"):
                name = _equals(query.get("filter"))
                return 200, {"experiments": [e for e in self.experiments
                                             if e["display_name"] == name]}  # fmt: skip
            case ("POST", "/apis/v2beta1/experiments"):
                exp = {**body, "experiment_id": self._id("exp")}
                self.experiments.append(exp)
                return 200, exp
            case ("POST", "/apis/v2beta1/runs"):
                # (the kfp CLI prints a created run with its creation time)
                run = {**body, "run_id": self._id("run"), "created_at": "2026-11-30T03:00:00Z"}
                self.runs.append(run)
                return 200, run
            case ("GET", p) if p.startswith("/apis/v2beta1/runs/"):
                found = [r for r in self.runs if r["run_id"] == p.rsplit("/", 1)[1]]
                if found:
                    return 200, {**found[0], "state": "PENDING"}
            case ("GET", "/apis/v2beta1/recurringruns"):
                name = _equals(query.get("filter"))
                found = [r for r in self.recurring.values() if r["display_name"] == name
                         and r["experiment_id"] == query.get("experiment_id")]  # fmt: skip
                return 200, {"recurringRuns": found, "total_size": len(found)}
            case ("POST", "/apis/v2beta1/recurringruns"):
                rec = {**body, "recurring_run_id": self._id("rec")}
                self.recurring[rec["recurring_run_id"]] = rec
                return 200, rec
            case ("DELETE", p) if p.startswith("/apis/v2beta1/recurringruns/"):
                self.recurring.pop(p.rsplit("/", 1)[1], None)
                return 200, {}
        return 404, {"error": f"no route {method} {path}", "code": 5}


def _equals(flt: str | None) -> str | None:
    if not flt:
        return None
    for pred in json.loads(flt).get("predicates", []):
        if pred.get("key") == "display_name":
            return pred.get("stringValue") or pred.get("string_value")
    return None
