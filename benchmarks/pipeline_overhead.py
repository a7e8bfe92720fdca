"""`kubetrain run` wall time with the defaults, and each KFP task's overhead.

    python benchmarks/pipeline_overhead.py [--rounds 2] [--before DIR]

Per-task overhead is the time from the task process's start (the kernel's start time of the
`python -m kfp.dsl.executor_main` process) to the step's first line of work: kfp's executor,
the component's imports, and the lazy imports at the top of the step function. It is measured by
a probe (`sitecustomize.py` on PYTHONPATH, this benchmark only) that, in task processes, wraps
each `kubetrain.pipeline.steps` function and notes when the last `import` made directly by the step
function's body returns. With `--before DIR` (a worktree of an older commit with its own .venv),
its `kubetrain run` runs too, interleaved with this one's, one of each per round.

Prints the CPU, every round, and per task: start -> step call -> first line of work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE_ENV = "PIPELINE_OVERHEAD_PROBE"  # read by the probe below, never by kubetrain

PROBE = r"""
import os, sys, time

def _probe():
    out = os.environ.get("PIPELINE_OVERHEAD_PROBE")
    if not out:
        return
    try:
        cmd = open("/proc/self/cmdline", "rb").read().split(b"\0")
    except OSError:
        return
    if b"kfp.dsl.executor_main" not in cmd or b"--function_to_execute" not in cmd:
        return
    task = cmd[cmd.index(b"--function_to_execute") + 1].decode()
    # The process's start: its age from /proc (clock ticks since boot vs uptime).
    stat = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    age = float(open("/proc/uptime").read().split()[0]) - int(stat[19]) / os.sysconf("SC_CLK_TCK")
    record = {"task": task, "pid": os.getpid(), "start": time.time() - age}
    import builtins, functools, importlib.abc, json

    def save():
        with open(os.path.join(out, f"{task}-{os.getpid()}.json"), "w") as f:
            json.dump(record, f)

    def wrap(fn):
        code = fn.__code__

        @functools.wraps(fn)
        def step(*args, **kwargs):
            record["step"] = fn.__name__
            record["enter"] = record["work"] = time.time()
            real = builtins.__import__

            def imported(*a, **k):
                try:
                    return real(*a, **k)
                finally:
                    if sys._getframe(1).f_code is code:  # an import in the step's own body
                        record["work"] = time.time()

            builtins.__import__ = imported
            try:
                return fn(*args, **kwargs)
            finally:
                builtins.__import__ = real
                save()
        return step

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "kubetrain.pipeline.steps":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = spec.loader
            run = loader.exec_module

            def exec_module(module):
                run(module)
                for attr in ("preprocess", "tune", "train", "quantize", "evaluate"):
                    setattr(module, attr, wrap(getattr(module, attr)))
            loader.exec_module = exec_module
            return spec

    import importlib.util
    sys.meta_path.insert(0, Finder())
    save()  # tasks that call no step (the gates) still get their start

_probe()
"""


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_TASK_LINE = re.compile(
    r"^(\d\d):(\d\d):(\d\d\.\d+) - INFO - (?:Executing task '([\w-]+)'|Task '([\w-]+)' finished)"
)


def task_seconds(kfp_log: str) -> dict[str, float]:
    """Each KFP task's wall time, from kfp.local's "Executing task" / "finished" lines."""
    began: dict[str, float] = {}
    took: dict[str, float] = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", kfp_log).splitlines():
        m = _TASK_LINE.match(line.strip())
        if m:
            t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
            if m[4]:
                began[m[4]] = t
            elif m[5] in began:
                took[m[5]] = (t - began[m[5]]) % 86400
    return took


def run_once(tree: Path, out: Path, probe_dir: Path, probe_out: Path) -> tuple[float, str]:
    """One `kubetrain run --no-cache` of ``tree``'s venv into ``out``: its wall time and
    kfp.local's output (printed by older versions, in ``out/logs`` since the task view)."""
    env = dict(os.environ, PYTHONPATH=str(probe_dir), **{PROBE_ENV: str(probe_out)})
    env.pop("PYTHONSTARTUP", None)
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(tree / ".venv" / "bin" / "kubetrain"), "run", "--no-cache", "--output", str(out)],
        cwd=tree, env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{tree}: kubetrain run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    combined = out / "logs" / "pipeline.log"
    return wall, done.stdout + done.stderr + (combined.read_text() if combined.is_file() else "")


def task_overheads(probe_out: Path) -> dict[str, dict[str, float]]:
    """Per task: seconds from process start to the step call, and to its first line of work."""
    found: dict[str, dict[str, float]] = {}
    for f in probe_out.glob("*.json"):
        r = json.loads(f.read_text())
        if "enter" in r:
            found[r["task"]] = {
                "to_call": r["enter"] - r["start"],
                "to_work": r["work"] - r["start"],
            }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", type=Path, help="worktree of the older commit (with .venv)")
    args = parser.parse_args()
    trees = {"after": REPO}
    if args.before:
        trees = {"before": args.before.resolve(), **trees}
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    walls: dict[str, list[float]] = {name: [] for name in trees}
    tasks: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in trees}
    with tempfile.TemporaryDirectory(prefix="pipeline-overhead-") as tmp:
        work = Path(tmp)
        probe_dir = work / "probe"
        probe_dir.mkdir()
        (probe_dir / "sitecustomize.py").write_text(PROBE)
        for r in range(args.rounds):
            for name, tree in trees.items():
                probe_out = work / f"probe-{name}-{r}"
                probe_out.mkdir()
                wall, kfp_log = run_once(tree, work / f"run-{name}-{r}", probe_dir, probe_out)
                walls[name].append(wall)
                took = " ".join(f"{t} {s:.1f}" for t, s in task_seconds(kfp_log).items())
                print(f"round {r + 1} {name:<6} kubetrain run: {wall:.1f} s  tasks (s): {took}",
                      flush=True)  # fmt: skip
                for task, o in task_overheads(probe_out).items():
                    tasks[name].setdefault(task, []).append((o["to_call"], o["to_work"]))
    print()
    for name, w in walls.items():
        print(f"{name:<6} wall: median {statistics.median(w):.1f} s "
              f"({', '.join(f'{x:.1f}' for x in w)})")  # fmt: skip
    print("\nper-task overhead, process start -> step call -> step's first line of work (s):")
    for name, by_task in tasks.items():
        for task, pairs in by_task.items():
            calls = ", ".join(f"{c:.2f}->{w:.2f}" for c, w in pairs)
            print(f"  {name:<6} {task:<11} {calls}")


if __name__ == "__main__":
    main()
