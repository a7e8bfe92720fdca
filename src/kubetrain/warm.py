"""Warm step processes for ``kubetrain run`` with the subprocess runner.

Every KFP task is a fresh interpreter. On a cluster that is a pod; on one machine it means each
step pays again for importing torch, torchao, optuna, scikit-learn and matplotlib (2-6 s each on
a small CPU) and for tearing them down at exit: most of ``kubetrain run``'s overhead. So
``kubetrain run`` starts one *step server* that imports all of that once, while the first tasks
run. A component's step call (``run_step``) finds the server through ``KUBETRAIN_STEP_SERVER``,
hands it the task's stdin/stdout/stderr, working directory and environment, and the server
forks a child that runs the step in the task's place -- logging into the task's own log -- and
exits without the interpreter teardown. The component still does its KFP part itself (inputs,
outputs, metrics); only the step's work moves. If the task goes away (killed, timed out) the
server kills the step's whole process group.

Without the variable (a pod, the docker runner, ``kubetrain run --cold``, ``KUBETRAIN_WARM=0``),
or when the server cannot be reached, the step runs in the task's own process as before.

    python -m kubetrain.warm --socket PATH --parent PID     (started by ``StepServer``)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger(__name__)

ENV = "KUBETRAIN_STEP_SERVER"
OFF = "KUBETRAIN_WARM"  # "0": never use the step server
STEPS = ("preprocess", "tune", "train", "quantize", "evaluate")
# What the steps import, in the order they need it. A request waits until its step's last module
# (NEEDS) is in, so the server and the step never import the same thing at once on a small CPU.
PRELOAD = (
    # preprocess (numpy: its split does not import scikit-learn)
    "numpy",
    "kubetrain.steps",
    "kubetrain.data",
    # tune: the trials fork from the step, so what they import comes first (building any torch
    # optimizer imports torch._dynamo); the step imports what its results need (fANOVA:
    # scikit-learn; plots: matplotlib) itself while the trials run
    "optuna",
    "optuna.storages.journal",
    "torch",
    "torch._dynamo",
    "kubetrain.train.loop",
    "kubetrain.tune.local",
    # train: the step launches torchrun; the rest comes in while it trains
    "kubetrain.launch.local",
    # quantize: torchao, and the inductor compile of the PT2E methods
    "kubetrain.evaluate.measure",
    "kubetrain.quantize",
    "torchao.quantization",
    "torchao.quantization.pt2e.quantize_pt2e",
    "torchao.quantization.qat",
    "kubetrain.quantize.methods",
    "torch._inductor.compile_fx",
    "torch._inductor.codegen.cpp",
    "torch._inductor.cpp_builder",
    "torch._inductor.fx_passes.post_grad",
    "torch._inductor.freezing",
    "torch.export._trace",
    "functorch.compile",
    # evaluate: the report's plots
    "kubetrain.evaluate.report",
    "matplotlib.backends.backend_agg",
    "PIL.PngImagePlugin",
)
NEEDS = {
    "preprocess": PRELOAD.index("kubetrain.data") + 1,
    "tune": PRELOAD.index("kubetrain.tune.local") + 1,
    "train": PRELOAD.index("kubetrain.launch.local") + 1,
    "quantize": PRELOAD.index("functorch.compile") + 1,
    "evaluate": len(PRELOAD),
}
_IN_STEP = False  # True in a step forked from the server (see in_step())
_HEADER = struct.Struct("!I")
KILL_GRACE_S = 40.0  # torchrun gives its workers 30 s to stop after a SIGTERM


# -- the task side ----------------------------------------------------------------------------
def enabled() -> bool:
    """False when ``KUBETRAIN_WARM=0`` asks for every step in its own task process."""
    return os.environ.get(OFF, "1") != "0"


def in_step() -> bool:
    """True in a step forked from the step server: a process that imported torch but never
    ran it (no thread pools started), so it may fork processes of its own."""
    return _IN_STEP


def run_step(name: str, config_json: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``kubetrain.steps.<name>(config, **kwargs)`` in a warm child if a step server is
    announced, else here; the result is the step's JSON-safe dict either way. Arguments named
    ``*_dir`` or ``*_file`` are paths; the others must be JSON values."""
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}")
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}
    address = os.environ.get(ENV)
    if address and enabled():
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(address)
        except OSError as err:
            log.warning("step server %s not reachable (%s); running the step here", address, err)
        else:
            with conn:
                return _remote(conn, name, config_json, args)
    return _local(name, config_json, args)


def _local(name: str, config_json: str, args: dict[str, str | None]) -> dict[str, Any]:
    from kubetrain import steps
    from kubetrain.config import config_from_json

    kwargs = {k: (Path(v) if v is not None and k.endswith(("_dir", "_file")) else v)
              for k, v in args.items()}  # fmt: skip
    result = getattr(steps, name)(config_from_json(config_json), **kwargs)
    return json.loads(json.dumps(result, default=_jsonable))


def _remote(conn: socket.socket, name: str, config_json: str, args: dict) -> dict[str, Any]:
    request = {
        "step": name,
        "config_json": config_json,
        "args": args,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "sent": time.time(),  # for the server's log: how long the step waited to start
    }
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with _std_fds() as fds:
        body = json.dumps(request).encode()
        socket.send_fds(conn, [_HEADER.pack(len(body)) + body], fds)
    reply = _recv_message(conn)
    if reply is None:
        raise RuntimeError(
            f"step {name}: its process ended without a result (killed? see the log above)"
        )
    if reply["ok"]:
        return reply["result"]
    from kubetrain import errors

    kind = getattr(errors, reply["type"], None)
    if isinstance(kind, type) and issubclass(kind, errors.KubetrainError):
        raise kind(reply["error"])
    raise RuntimeError(f"step {name} failed: {reply['type']}: {reply['error']}")


@contextlib.contextmanager
def _std_fds() -> Iterator[list[int]]:
    """This process's fds 0, 1, 2 (``/dev/null`` for any that is closed)."""
    opened = []
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            opened.append(os.open(os.devnull, os.O_RDWR))
            fds.append(opened[-1])
    try:
        yield fds
    finally:
        for fd in opened:
            os.close(fd)


def _send_message(conn: socket.socket, data: dict[str, Any]) -> None:
    body = json.dumps(data, default=_jsonable).encode()
    conn.sendall(_HEADER.pack(len(body)) + body)


def _recv_exact(conn: socket.socket, n: int, buf: bytes = b"") -> bytes | None:
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv_message(conn: socket.socket) -> dict[str, Any] | None:
    head = _recv_exact(conn, _HEADER.size)
    if head is None:
        return None
    body = _recv_exact(conn, _HEADER.unpack(head)[0])
    return None if body is None else json.loads(body)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    return float(value)


# -- the server side --------------------------------------------------------------------------
class StepServer:
    """Start a step server for this process's KFP tasks; ``with StepServer(log_file):`` sets
    ``KUBETRAIN_STEP_SERVER`` for the tasks and stops the server (and its steps) on exit."""

    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        from kubetrain.io import make_temp_dir

        self.dir = make_temp_dir("steps")  # 0700: ours alone
        self.address = str(self.dir / "socket")
        self.proc: subprocess.Popen | None = None
        self._saved: str | None = None

    def __enter__(self) -> StepServer:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetrain.warm", "--socket", self.address,
                 "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._saved = os.environ.get(ENV)
        os.environ[ENV] = self.address
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._saved
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=KILL_GRACE_S + 5)  # it ends its steps first
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class _Server:
    def __init__(self, address: str, parent: int) -> None:
        self.parent = parent
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address)  # before the imports: a task that comes early waits
        self.listener.listen(16)
        self.children: dict[int, socket.socket] = {}  # pid (= its process group) -> task conn
        self.ending: dict[int, float] = {}  # process group -> when to SIGKILL what is left
        self.loaded = 0  # how many of PRELOAD are imported
        self.waiting: list[tuple[socket.socket, list[int], dict[str, Any]]] = []

    def run(self) -> None:
        started = time.perf_counter()
        for module in PRELOAD:
            try:
                importlib.import_module(module)
            except Exception as err:  # the child imports (and fails) itself
                log.warning("preload %s: %s", module, err)
            self.loaded += 1
            self.poll(0)
        log.info("step server ready (%.1f s of imports)", time.perf_counter() - started)
        while os.getppid() == self.parent:
            self.poll(1.0)

    def poll(self, timeout: float, accept: bool = True) -> None:
        """Accept new tasks, start the waiting ones whose modules are in, notice tasks that
        went away, reap finished steps."""
        listen = [self.listener] if accept else []
        waiting = [w[0] for w in self.waiting]
        ready, _, _ = select.select([*listen, *waiting, *self.children.values()], [], [], timeout)
        for sock in ready:
            if sock is self.listener:
                conn, _ = self.listener.accept()
                self.start(conn)
            elif sock in waiting:  # the task went away before its step started
                self.forget(next(w for w in self.waiting if w[0] is sock))
            else:  # the task closed its end: it has its result, or it was killed
                pid = next(p for p, c in self.children.items() if c is sock)
                self.drop(pid, kill=True)
        for request in [w for w in self.waiting if self.loaded >= NEEDS[w[2]["step"]]]:
            self.waiting.remove(request)
            self.fork(*request)
        while True:  # reap every finished child, dropped ones too (else they stay zombies)
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self.drop(pid, kill=False)
        now = time.monotonic()
        for pgid, deadline in list(self.ending.items()):
            if not _signal_group(pgid, 0):
                del self.ending[pgid]
            elif now > deadline:
                _signal_group(pgid, signal.SIGKILL)
                del self.ending[pgid]

    def forget(self, request: tuple[socket.socket, list[int], dict[str, Any]]) -> None:
        """Drop a waiting request: its task is gone."""
        self.waiting.remove(request)
        request[0].close()
        for fd in request[1]:
            os.close(fd)

    def drop(self, pid: int, kill: bool) -> None:
        """Forget a step; with ``kill``, end its process group: SIGTERM first, so a torchrun
        in it stops its workers (they run in sessions of their own), SIGKILL after a grace."""
        conn = self.children.pop(pid, None)
        if conn is not None:
            conn.close()
        if kill and _signal_group(pid, signal.SIGTERM):
            self.ending[pid] = time.monotonic() + KILL_GRACE_S

    def start(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        task_pid, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d", uid)
            conn.close()
            return
        try:
            head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
            head = _recv_exact(conn, _HEADER.size, head)
            body = None if head is None else _recv_exact(conn, _HEADER.unpack(head)[0])
            request = json.loads(body) if body is not None else None
        except (OSError, ValueError) as err:
            log.warning("bad request: %s", err)
            conn.close()
            return
        if request is None or len(fds) != 3 or request.get("step") not in NEEDS:
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        request["task_pid"] = task_pid
        self.waiting.append((conn, fds, request))  # poll() starts it once its modules are in

    def fork(self, conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            for other in [*self.children.values(), *(w[0] for w in self.waiting)]:
                other.close()
            _child(conn, fds, request)  # never returns
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        # Waited: in the listen queue during an import, then for the step's own modules.
        log.info("step %s for task pid %d: pid %d (%.1f s after the task asked)", request["step"],
                 request["task_pid"], pid, time.time() - request.get("sent", time.time()))  # fmt: skip

    def stop(self) -> None:
        for request in list(self.waiting):
            self.forget(request)
        for pid in list(self.children):
            self.drop(pid, kill=True)
        self.listener.close()
        deadline = time.monotonic() + KILL_GRACE_S
        while self.ending and time.monotonic() < deadline:
            self.poll(0.2, accept=False)
        for pgid in self.ending:
            _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid`` (0: just look); False if the group is gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _child(conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
    code = 1
    try:
        # The server runs as __main__; the step's code asks the module it imports.
        importlib.import_module("kubetrain.warm")._IN_STEP = True
        os.setpgid(0, 0)  # one group: the server can end the step with everything it started
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        from kubetrain.logs import setup_logging

        setup_logging()
        try:
            result = _local(request["step"], request["config_json"], request["args"])
            reply: dict[str, Any] = {"ok": True, "result": result}
            code = 0
        except Exception as err:
            from kubetrain.errors import KubetrainError

            if not isinstance(err, KubetrainError):
                import traceback

                traceback.print_exc()
            reply = {"ok": False, "type": type(err).__name__, "error": str(err)}
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        _send_message(conn, reply)
    except BaseException:  # a forked child must never return into the server
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
    finally:
        os._exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    ap = argparse.ArgumentParser(description="kubetrain step server (started by kubetrain run)")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--parent", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s")
    server = _Server(args.socket, args.parent)

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    code = 0
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    except BaseException:
        log.exception("step server failed")
        code = 1
    finally:
        server.stop()
        # Without the interpreter's teardown of torch, torchao and scikit-learn (1-2 s), which
        # `kubetrain run` would wait for.
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
