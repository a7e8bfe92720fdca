"""A real Kubernetes control plane without nodes, as controller-runtime's envtest gives Go projects.

etcd (Debian's ``etcd-server``) and the ``kube-apiserver`` of ``../shared/k8s`` (v1.36, its
README says how it was built) on free 127.0.0.1 ports, with RBAC, a service-account issuer
(TokenRequest works), an admin token, an audit log (who called what), and the Kubeflow CRDs
(Training Operator v1, Trainer v2 with JobSet, Katib) and Trainer's ``torch-distributed``
runtime installed. The same flags as ``shared/k8s/envtest.sh``; done here in Python so that a test can
kill and restart the API server on the same port and etcd (its data stays).

Nothing reconciles: the tests play the Training Operator, Katib and the kubelet by writing
status. Namespaces cannot finish deleting (no namespace controller): each test takes a fresh one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import urllib3

# The API server's certificate is self-signed (as envtest's): tests skip verification, quietly.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

ROOT = Path(__file__).resolve().parents[2]
# The shared tools sit beside the checkout (../shared/k8s); KUBETRAIN_K8S_DIR points elsewhere.
K8S_DIR = Path(os.environ.get("KUBETRAIN_K8S_DIR") or ROOT.parent / "shared" / "k8s")
# The CRDs of ../shared/k8s (see its README for their sources): Training Operator v1.9.4's
# PyTorchJob, Kubeflow Trainer v2.3.0's TrainJob and runtimes, JobSet v0.12.0, Katib v0.19.0's
# Experiment, Trial and Suggestion.
SHARED_CRDS = (
    "kubeflow.org_pytorchjobs.yaml", "kubeflow.org_experiments.yaml", "kubeflow.org_trials.yaml",
    "kubeflow.org_suggestions.yaml", "trainer.kubeflow.org_trainjobs.yaml",
    "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "trainer.kubeflow.org_trainingruntimes.yaml", "jobset.x-k8s.io_jobsets.yaml",
)  # fmt: skip
CRDS = [K8S_DIR / "crds" / name for name in SHARED_CRDS]
# Trainer's default ClusterTrainingRuntime, which kubetrain's TrainJobs name (cluster.runtime).
RUNTIMES = [K8S_DIR / "runtimes" / "torch_distributed.yaml"]
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
  - level: Metadata
"""


def missing() -> str | None:
    """Why the control plane cannot start here, or None."""
    if not (K8S_DIR / "bin" / "kube-apiserver").is_file():
        return (
            f"no kube-apiserver at {K8S_DIR}/bin (the shared/k8s tools; set KUBETRAIN_K8S_DIR): "
            "on a machine with a cluster use `make kind-e2e`"
        )
    absent = [p.name for p in [*CRDS, *RUNTIMES] if not p.is_file()]
    if absent:
        return f"no {', '.join(absent)} in {K8S_DIR} (the shared/k8s tools)"
    if not etcd_binary():
        return "no etcd: install Debian's etcd-server (apt-get install etcd-server) or set ETCD"
    if shutil.which("kubectl") is None:
        return "kubectl is not installed (it applies the CRDs and the manifests)"
    if shutil.which("openssl") is None:
        return "openssl is not installed (it makes the service-account signing key)"
    return None


def etcd_binary() -> str | None:
    return os.environ.get("ETCD") or shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlane:
    """etcd + kube-apiserver in ``workdir``; ``start()``, ``stop()``, ``restart_apiserver()``."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.api_port = free_port()
        self.etcd_port = free_port()
        self.peer_port = free_port()
        self.url = f"https://127.0.0.1:{self.api_port}"
        self.admin_token = secrets.token_hex(16)
        self.kubeconfig = self.dir / "kubeconfig"
        self.audit_log = self.dir / "audit.log"
        self.procs: dict[str, subprocess.Popen] = {}

    # -- processes ---------------------------------------------------------------------

    def start(self) -> ControlPlane:
        pki = self.dir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        subprocess.run(
            ["openssl", "genrsa", "-out", str(pki / "sa.key"), "2048"], check=True,
            capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["openssl", "rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")],
            check=True, capture_output=True,
        )  # fmt: skip
        (pki / "tokens.csv").write_text(f"{self.admin_token},admin,admin-uid,system:masters\n")
        (self.dir / "audit-policy.yaml").write_text(AUDIT_POLICY)
        ec, ep = self.etcd_port, self.peer_port
        self._spawn(
            "etcd",
            [
                etcd_binary(), "--name", "envtest", "--data-dir", str(self.dir / "etcd-data"),
                "--listen-client-urls", f"http://127.0.0.1:{ec}",
                "--advertise-client-urls", f"http://127.0.0.1:{ec}",
                "--listen-peer-urls", f"http://127.0.0.1:{ep}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{ep}",
                "--initial-cluster", f"envtest=http://127.0.0.1:{ep}", "--unsafe-no-fsync",
            ],
        )  # fmt: skip
        self.start_apiserver()
        self._write_kubeconfig(self.kubeconfig, self.admin_token)
        self.kubectl("apply", "--server-side", *[a for p in CRDS for a in ("-f", str(p))])
        self.wait_established()
        self.kubectl("apply", "--server-side", *[a for p in RUNTIMES for a in ("-f", str(p))])
        return self

    def wait_established(self, timeout: float = 60.0) -> None:
        """Until every CRD serves (``kubectl wait`` fails on a CRD that has no status yet)."""
        from kubernetes import client

        ext = client.ApiextensionsV1Api(self.admin_client())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            crds = ext.list_custom_resource_definition().items
            if crds and all(
                any(
                    c.type == "Established" and c.status == "True"
                    for c in crd.status.conditions or []
                )
                for crd in crds
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the CRDs were not Established within {timeout:.0f} s")

    def start_apiserver(self) -> None:
        pki = self.dir / "pki"
        self._spawn(
            "kube-apiserver",
            [
                str(K8S_DIR / "bin" / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}", f"--cert-dir={self.dir / 'certs'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--token-auth-file={pki / 'tokens.csv'}", "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none",
                f"--audit-policy-file={self.dir / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log}", "--audit-log-mode=blocking",
            ],
        )  # fmt: skip
        self.wait_ready()

    def kill_apiserver(self) -> None:
        """SIGKILL, as a crash: no graceful shutdown of the open watches."""
        proc = self.procs.pop("kube-apiserver")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def restart_apiserver(self) -> None:
        self.kill_apiserver()
        self.start_apiserver()

    def stop(self) -> None:
        for name in ("kube-apiserver", "etcd"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def _spawn(self, name: str, argv: list[Any]) -> None:
        # The child gets its own copy of the file descriptor: ours is closed at once, so that
        # restarts do not pile up open files.
        with open(self.dir / "logs" / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [str(a) for a in argv],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs["kube-apiserver"]
            if proc.poll() is not None:
                tail = (self.dir / "logs" / "kube-apiserver.log").read_text()[-2000:]
                raise RuntimeError(f"kube-apiserver exited ({proc.returncode}):\n{tail}")
            try:
                # ready, and its watch cache filled: until then watches get 429 "storage is
                # (re)initializing" (the launchers ride that out; tests want a settled server)
                if self.raw("/readyz") == "ok":
                    self.raw("/apis/kubeflow.org/v1/pytorchjobs?watch=1&timeoutSeconds=1")
                    return
            except urllib.error.HTTPError as err:
                if err.code == 404:  # the CRDs are not installed yet (first start)
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready in {timeout:.0f} s")

    # -- access ------------------------------------------------------------------------

    def raw(self, path: str, token: str | None = None) -> str:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {token or self.admin_token}"}
        )
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.read().decode()

    def _write_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "envtest",
                    "cluster": {"server": self.url, "insecure-skip-tls-verify": True},
                }
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "envtest",
                    "context": {"cluster": "envtest", "user": "user", "namespace": namespace},
                }
            ],
            "current-context": "envtest",
        }
        path.write_text(json.dumps(config))
        return path

    def kubeconfig_for(self, token: str, name: str) -> Path:
        """A kubeconfig that authenticates with ``token``."""
        return self._write_kubeconfig(self.dir / f"kubeconfig-{name}", token)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True):
        done = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done

    def admin_client(self) -> Any:
        """A ``kubernetes`` ApiClient with the admin token."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        configuration.verify_ssl = False
        configuration.api_key = {"authorization": f"Bearer {self.admin_token}"}
        return client.ApiClient(configuration)

    def audit(self, username: str) -> list[dict[str, Any]]:
        """Audit events (ResponseComplete) of requests made by ``username``."""
        events = []
        lines = self.audit_log.read_text().splitlines()
        for i, line in enumerate(lines):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # the server is still writing it
                    continue
                raise
            if event.get("user", {}).get("username") == username:
                events.append(event)
        return events
