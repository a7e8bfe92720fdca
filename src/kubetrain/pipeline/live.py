"""What ``kubetrain run`` shows while kfp.local runs the pipeline, and where its output goes.

kfp.local prints everything to this process's stdout: its own lines ("Executing task ...",
"Task ... finished ...") and each task's streamed output, echoing every executor input as JSON
(hundreds of lines for a small run). ``TaskLog`` takes that stream instead of the terminal: it
writes it all to ``<run>/logs/pipeline.log`` and each task's part to ``<run>/logs/<task>.log``,
and follows each task's state (waiting / running / queued / cached / done / failed / skipped) and
its key figure, read from the lines the steps log anyway: a step whose cluster job a queue
(Kueue) holds suspended is ``queued``, ``waiting in queue <name>``, until it is admitted. ``LiveView`` draws one line per task with
``rich`` on a terminal; elsewhere (CI, pipes) ``PlainView`` prints one line per task event.

A task that runs several times (the convert tasks of a fanned-out preprocess, iterations of a
``dsl.ParallelFor`` that kfp.local runs two at once and names alike) is one line: running while
any of its runs is, done when all are, with how many have finished as its figure.

A step that fails with a ``KubetrainError`` prints a machine-readable line (``ERROR_MARKER``,
see ``kubetrain.core.logs``); the task's state keeps it, so ``kubetrain run`` can say what the step
alone would have said, with the right exit code.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from kubetrain.core.logs import ERROR_MARKER

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's lines about tasks (task names are quoted in some and not in others).
_EXECUTING = re.compile(r"Executing task '?([\w-]+)'?")
_FINISHED = re.compile(r"Task '?([\w-]+)'? finished with status (\w+)")
_CACHE_HIT = re.compile(r"Task '?([\w-]+)'? cache hit")
_SKIPPED = re.compile(r"Skipping task '?([\w-]+)'?: upstream")
# Key figures, from the lines the steps log.
_TRIAL = re.compile(r"trial (\d+)/(\d+) \w+ (\w+)=\S+ best=(\S+)")
_EPOCH = re.compile(
    r"epoch (\d+)/(\d+) loss (\S+) val_loss \S+ (val_\w+) (\S+) lr \S+ (\d+) samples/s"
)
_QUANTIZED = re.compile(r"kubetrain\.pipeline\.steps: (\S+): (\d+) -> (\d+) bytes")
_DATASET = re.compile(r"kubetrain\.pipeline\.steps: dataset (\w+): (\{.*?\}) samples")
_EVALUATED = re.compile(r"test (\w+) fp32 (\S+) int8 (\S+);")  # the primary metric
# The cluster lifecycle's lines about a job a queue holds (kubetrain.launch.cluster._Queue).
_QUEUED = re.compile(r": (waiting in (?:queue \S+|a queue))")
_ADMITTED = re.compile(r": admitted from ")

# kfp.local's own lines and the executor's JSON echo: not what a step said.
_KFP_OWN = re.compile(r"\d\d:\d\d:\d\d\.\d+ - \w+ - |\[KFP Executor |[{}\[\]\"]")

STATES = ("waiting", "running", "queued", "cached", "done", "failed", "skipped")
_STYLE = {"waiting": "dim", "running": "yellow", "queued": "magenta", "cached": "cyan",
          "done": "green", "failed": "bold red", "skipped": "dim"}  # fmt: skip
_TAIL_LINES = 12


@dataclass
class TaskState:
    """One pipeline task as ``kubetrain run`` shows it."""

    name: str
    state: str = "waiting"
    started: float | None = None
    ended: float | None = None
    figure: str = ""
    error: dict[str, Any] | None = None  # the step's ERROR_MARKER record, if it failed with one
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=_TAIL_LINES))
    log_file: Path | None = None
    instances: int = 1  # runs of it (a ParallelFor's iterations)
    active: int = 0  # of those, running now
    succeeded: int = 0
    cached: int = 0

    def seconds(self, now: float | None = None) -> float | None:
        """How long the task ran (so far, while it runs); None before it starts."""
        if self.started is None:
            return None
        return (self.ended or now or time.monotonic()) - self.started


class View(Protocol):
    def event(self, task: TaskState) -> None: ...

    def refresh(self) -> None: ...


class TaskLog(io.TextIOBase):
    """A text stream (what kfp.local prints to) that files each line under its task.

    Args:
        log_dir: where ``pipeline.log`` and ``<task>.log`` go (created).
        tasks: the pipeline's task names in order (the view shows them all from the start).
        echo: also pass every line on (``-v``: kfp.local's output as before), or None.
        instances: how many times a task runs, where more than once (a ParallelFor's tasks).
    """

    def __init__(
        self,
        log_dir: Path,
        tasks: list[str],
        echo: IO[str] | None = None,
        instances: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.tasks = {
            name: TaskState(name, instances=(instances or {}).get(name, 1)) for name in tasks
        }
        self.views: list[View] = []
        self.echo = echo
        self.combined = (log_dir / "pipeline.log").open("a", encoding="utf-8")
        self._files: dict[str, IO[str]] = {}
        self._current: str | None = None
        self._partial = ""
        self._lock = threading.Lock()

    @property
    def combined_path(self) -> Path:
        return self.log_dir / "pipeline.log"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._lock:
            if self.echo is not None:
                self.echo.write(text)
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                self._line(ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self.echo is not None:
                self.echo.flush()
            for f in (self.combined, *self._files.values()):
                if not f.closed:
                    f.flush()

    def close(self) -> None:
        if self.closed:
            return
        if self._partial:
            self.write("\n")
        self.flush()
        for f in (self.combined, *self._files.values()):
            f.close()
        super().close()

    def failed(self) -> TaskState | None:
        """The first task that failed, if any."""
        return next((t for t in self.tasks.values() if t.state == "failed"), None)

    def finish(self) -> None:
        """Mark tasks that never ran as skipped (a branch not taken, or after a failure)."""
        for task in self.tasks.values():
            if task.state == "waiting":
                self._set(task, "skipped")

    # -- one line of kfp.local's output -----------------------------------------------------
    def _line(self, line: str) -> None:
        self.combined.write(line + "\n")
        text = line.strip()
        if m := _EXECUTING.search(text):
            task = self._task(m[1])
            self._current = task.name
            if not task.active and task.state not in ("running", "queued"):
                task.started, task.ended = time.monotonic(), None
            task.active += 1
            if task.state not in ("running", "queued"):
                self._set(task, "running")
        elif m := _CACHE_HIT.search(text):
            task = self._task(m[1])
            task.cached += 1
            if task.started is None:
                task.started = time.monotonic()
            task.ended = time.monotonic()
            self._count(task)
            if task.cached >= task.instances:
                self._set(task, "cached")
            elif task.cached + task.succeeded >= task.instances and not task.active:
                self._set(task, "done")
        elif (m := _SKIPPED.search(text)) and m[1] in self.tasks:  # not a condition's group
            self._set(self.tasks[m[1]], "skipped")
        if self._current is not None:
            task = self.tasks[self._current]
            self._file(task).write(line + "\n")
            self._read_step_line(task, text)
        if m := _FINISHED.search(text):
            task = self._task(m[1])
            task.active = max(0, task.active - 1)
            task.succeeded += m[2] == "SUCCESS"
            if not task.active:
                self._current = None
            self._count(task)
            if m[2] != "SUCCESS":
                task.ended = time.monotonic()
                self._set(task, "failed")  # a retry that follows runs it again
            elif task.succeeded + task.cached >= task.instances and not task.active:
                task.ended = time.monotonic()
                self._set(task, "done")

    def _count(self, task: TaskState) -> None:
        """A task that runs several times shows how many runs have finished."""
        if task.instances > 1:
            task.figure = f"{task.succeeded + task.cached}/{task.instances} done"
            for view in self.views:
                view.refresh()

    def _task(self, name: str) -> TaskState:
        if name not in self.tasks:
            self.tasks[name] = TaskState(name)
        return self.tasks[name]

    def _file(self, task: TaskState) -> IO[str]:
        if task.name not in self._files:
            task.log_file = self.log_dir / f"{task.name}.log"
            self._files[task.name] = task.log_file.open("a", encoding="utf-8")
        return self._files[task.name]

    def _set(self, task: TaskState, state: str) -> None:
        task.state = state
        for view in self.views:
            view.event(task)

    def _read_step_line(self, task: TaskState, text: str) -> None:
        """Keep the task's last lines, its error record and its key figure."""
        if text.startswith(ERROR_MARKER):
            with contextlib.suppress(json.JSONDecodeError):  # a cut-off line: the tail says why
                task.error = json.loads(text[len(ERROR_MARKER) :])
            return
        if text and not _KFP_OWN.match(text):
            task.tail.append(text)
        if task.state in ("running", "queued"):
            if m := _QUEUED.search(text):
                task.figure = m[1]
                self._set(task, "queued")
                return
            if task.state == "queued" and _ADMITTED.search(text):
                task.figure = ""
                self._set(task, "running")
                return
        figure = key_figure(task.name, text) if task.instances == 1 else ""
        if figure:
            task.figure = figure
            for view in self.views:
                view.refresh()


def key_figure(task: str, line: str) -> str:
    """The short figure the view shows for ``task``, if ``line`` carries one, else ""."""
    if task == "tune" and (m := _TRIAL.search(line)):
        return f"trials {m[1]}/{m[2]}, best {m[3]} {m[4]}"
    if task == "train" and (m := _EPOCH.search(line)):
        return f"epoch {m[1]}/{m[2]}, loss {m[3]}, {m[4]} {m[5]}, {m[6]} samples/s"
    if task == "quantize" and (m := _QUANTIZED.search(line)):
        return f"{m[1]}, {m[2]} -> {m[3]} bytes"
    if task in ("preprocess", "preprocess-merge") and (m := _DATASET.search(line)):
        return f"dataset {m[1]} {m[2]}"
    if task == "evaluate" and (m := _EVALUATED.search(line)):
        return f"test {m[1]} fp32 {m[2]}, int8 {m[3]}"
    return ""


def _duration(task: TaskState) -> str:
    seconds = task.seconds()
    if seconds is None or task.state == "cached":
        return ""
    return f"{seconds:.1f} s"


class PlainView:
    """One line per task event, for logs and pipes (no terminal codes); task names padded to
    ``width``."""

    def __init__(self, out: IO[str], width: int = 15) -> None:
        self.out = out
        self.width = width

    def event(self, task: TaskState) -> None:
        parts = [f"{task.name:<{self.width}} {task.state}"]
        if task.state in ("done", "failed") and _duration(task):
            parts.append(_duration(task))
        if task.state in ("done", "failed", "queued") and task.figure:
            parts.append(task.figure)
        self.out.write("  ".join(parts) + "\n")
        self.out.flush()

    def refresh(self) -> None:
        pass


class LiveView:
    """One line per task, redrawn in place with rich while the pipeline runs."""

    def __init__(self, log: TaskLog, out: IO[str]) -> None:
        from rich.console import Console
        from rich.live import Live

        self.log = log
        self.console = Console(file=out, force_terminal=True, highlight=False)
        self.live = Live(
            self.render(), console=self.console, refresh_per_second=4, get_renderable=self.render
        )

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 2))
        for _ in range(4):
            table.add_column()
        for task in self.log.tasks.values():
            mark = Text(f"{task.state:<8}", style=_STYLE[task.state])
            table.add_row(mark, Text(task.name), Text(_duration(task), justify="right"),
                          Text(task.figure))  # fmt: skip
        return table

    def event(self, task: TaskState) -> None:
        pass  # the table is redrawn from the states

    def refresh(self) -> None:
        pass
