"""The ``kubetrain`` command line.

User mistakes (config, data, arguments) print one line and exit non-zero: 2 for an invalid
config or arguments, 1 for anything else that went wrong. SIGTERM ends a command as Ctrl-C does
(what it started is stopped, one line, exit 143 instead of 130). The catalogue of bad inputs and
faults in tests/unit/test_bad_input.py holds every command to that.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import psutil  # not in the signal handler: a second signal would re-enter a half-done import

from kubetrain import __version__
from kubetrain.core import artifacts
from kubetrain.core.errors import KubetrainError, UsageError

log = logging.getLogger("kubetrain")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        help="YAML config file, or the name of a bundled recipe (smoke, vision, translation, ...: "
        "src/kubetrain/pipeline/recipes/; default: the bundled defaults)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=0.01 (repeatable; values are YAML)",
    )


def _host_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default=os.environ.get("KF_PIPELINES_ENDPOINT"),
        help="Kubeflow Pipelines API URL, e.g. http://localhost:8080 (default: "
        "$KF_PIPELINES_ENDPOINT)",
    )
    p.add_argument("--experiment", default="kubetrain", help="KFP experiment (created if missing)")


_Subparsers = argparse._SubParsersAction  # argparse's subcommand registry (a private name)


def build_parser() -> argparse.ArgumentParser:
    """The ``kubetrain`` parser: global options, then each subcommand group in help order.

    Returns:
        The parser; ``args.command`` names the chosen subcommand.
    """
    parser = argparse.ArgumentParser(
        prog="kubetrain", description="Tune, train, quantize and evaluate with one pipeline."
    )
    parser.add_argument("--version", action="version", version=f"kubetrain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_command(sub)
    _add_cluster_commands(sub)
    _add_history_commands(sub)
    _add_config_commands(sub)
    _add_step_commands(sub)
    return parser


def _add_run_command(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    """``run``: the whole pipeline locally."""
    p = sub.add_parser("run", help="run the whole pipeline locally under kfp.local")
    _config_args(p)
    p.add_argument("--output", type=Path, help="run directory (default: runs/<timestamp>)")
    p.add_argument("--no-cache", action="store_true", help="re-run every step")
    p.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess: each step in this Python (default); docker: each step in a container "
        "of the runtime image (`make images`; KUBETRAIN_IMAGE overrides), as on a cluster",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="stream kfp.local's whole output (default: one line per task; the output goes to "
        "<run>/logs/ either way)",
    )


def _add_cluster_commands(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    """``compile``, ``manifests``, ``submit``, ``schedule``: the pipeline for a cluster."""
    p = sub.add_parser("compile", help="write the pipeline as KFP IR YAML")
    _config_args(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="YAML file to write")

    p = sub.add_parser(
        "manifests",
        help="print, as multi-document YAML, the TrainJob or PyTorchJob (cluster.training_api; "
        "offline, auto shows a TrainJob) and the Katib Experiment a cluster run creates (a dry "
        "run: nothing is sent)",
    )
    _config_args(p)

    p = sub.add_parser(
        "submit",
        help="compile the pipeline and start a run on a KFP server (--set items go as the run's "
        "parameters; see docs/cluster.md: run-time parameters)",
    )
    _config_args(p)
    _host_args(p)
    p.add_argument("--run-name", help="display name of the run")

    p = sub.add_parser(
        "schedule",
        help="compile the pipeline and create a recurring run on a KFP server (one of the same "
        "name is replaced; --set items go as its parameters, {date} in data.source is the "
        "scheduled day)",
    )
    _config_args(p)
    _host_args(p)
    p.add_argument(
        "--cron", required=True, help="six fields, seconds first: '0 0 3 * * *' = 03:00 daily"
    )
    p.add_argument("--name", required=True, help="name of the recurring run")


def _add_history_commands(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    """``runs`` and ``compare``: the local runs already made."""
    p = sub.add_parser("runs", help="list the local runs: time, data, results, promoted")
    p.add_argument("--root", type=Path, default=Path("runs"), help="where runs are (default: runs)")

    p = sub.add_parser(
        "compare",
        help="runs side by side: config differences and results, and an HTML page with their "
        "training curves overlaid",
    )
    p.add_argument(
        "run_dirs", nargs="+", metavar="RUN", help="run directory, or a name under --root"
    )
    p.add_argument("--root", type=Path, default=Path("runs"), help="where runs are (default: runs)")
    p.add_argument(
        "-o", "--output", type=Path, help="HTML page to write (default: <root>/compare.html)"
    )


def _add_config_commands(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    """``config show`` and ``config docs``."""
    p = sub.add_parser("config", help="configuration commands")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = csub.add_parser("show", help="print the effective, validated config as YAML")
    _config_args(show)
    docs = csub.add_parser(
        "docs",
        help="write the configuration reference (every section and field, from the models' "
        "descriptions) as Markdown: docs/configuration.md",
    )
    docs.add_argument(
        "-o", "--output", type=Path, help="the Markdown file to write (default: standard output)"
    )


def _add_step_commands(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    """The pipeline's steps one at a time: preprocess, tune, train, quantize, evaluate."""
    p = sub.add_parser("preprocess", help="step: data source -> dataset artifact")
    _config_args(p)
    p.add_argument("--output", type=Path, required=True, help="dataset artifact directory")

    p = sub.add_parser("tune", help="step: hyperparameter search on a dataset artifact")
    _config_args(p)
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="search artifact directory")

    p = sub.add_parser("train", help="step: train on a dataset artifact")
    _config_args(p)
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--params", type=Path, help="best_params.json of a tune step")
    p.add_argument("--output", type=Path, required=True, help="model artifact directory")

    p = sub.add_parser("quantize", help="step: fp32 model artifact -> int8 artifact")
    _config_args(p)
    p.add_argument("--dataset", type=Path, required=True, help="calibration and gate data")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="quantized artifact directory")

    p = sub.add_parser("evaluate", help="step: metrics and report of fp32 vs int8")
    _config_args(p)
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--quantized", type=Path, required=True)
    p.add_argument("--tune", type=Path, help="tune artifact directory (for the report)")
    p.add_argument("--output", type=Path, required=True, help="evaluation directory")


def _require_dir(path: Path, what: str, marker: str) -> Path:
    if not path.exists():
        raise KubetrainError(f"{path}: no such directory (expected a {what} artifact)")
    if not path.is_dir():
        raise KubetrainError(f"{path}: is a file, not a {what} artifact directory")
    if not (path / marker).is_file():
        raise KubetrainError(f"{path}: not a {what} artifact (no {marker})")
    return path


def _print_table(header: list[str], rows: list[list[str]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=240)  # a pipe or a file: never wrap a row
    table = Table(*header, title=title, title_justify="left", header_style="bold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _runs_command(args: argparse.Namespace) -> int:
    from kubetrain.core.io import atomic_write, check_writable_dir
    from kubetrain.pipeline import runs

    if args.command == "runs":
        found = runs.find_runs(args.root)
        if not found:
            print(f"no runs under {args.root}")
            return 0
        _print_table(*runs.list_rows(found))
        return 0
    if len(args.run_dirs) < 2:
        raise UsageError("compare: give at least two runs")
    out = args.output or args.root / "compare.html"
    if out.is_dir():
        raise UsageError(f"--output {out}: is a directory; give the HTML file to write")
    chosen = [runs.resolve_run(text, args.root) for text in args.run_dirs]
    check_writable_dir(out.parent, "--output" if args.output else "--root")
    names, diffs, results = runs.compare_tables(chosen)
    _print_table(["", *names], [[k, *v] for k, v in results], title="results")
    if diffs:
        _print_table(["config", *names], [[k, *v] for k, v in diffs], title="config differences")
    else:
        print("config: no differences")
    page = runs.render_html(chosen)
    atomic_write(out, lambda tmp: Path(tmp).write_text(page))
    print(f"wrote {out}")
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse unusable path arguments before any work: one line naming the path (exit 2)."""
    from kubetrain.core.io import check_writable_dir

    output = getattr(args, "output", None)
    if output is None:
        return
    if args.command == "compile":  # -o is a file
        if output.is_dir():
            raise UsageError(f"--output {output}: is a directory; give the YAML file to write")
        check_writable_dir(output.parent, "--output")
    else:
        check_writable_dir(output, "--output")


def _compile(cfg, args: argparse.Namespace) -> None:
    """``compile``: write the pipeline YAML to ``--output``."""
    from kubetrain.pipeline.submit import compile_pipeline

    args.output.parent.mkdir(parents=True, exist_ok=True)
    compile_pipeline(cfg, args.output)
    print(f"wrote {args.output}")


def _run(cfg, args: argparse.Namespace) -> None:
    """``run``: the whole pipeline locally, then a summary of its result (also when only the
    tracking server failed: the results are written, its line comes last)."""
    from kubetrain.pipeline.run import TrackingFailed, run_local

    try:
        result = run_local(
            cfg, args.output, cache=not args.no_cache, runner=args.runner, verbose=args.verbose
        )
    except TrackingFailed as err:
        _summary(err.result)
        raise
    _summary(result)


def _summary(result) -> None:
    from kubetrain.core.artifacts import primary_values

    if not result.retrained:
        print(f"run directory:      {result.run_dir}")
        print(f"nothing trained:    {result.reason}")
        print(f"pipeline time:      {result.seconds:.1f} s")
        return
    m = result.metrics
    metric, fp32, int8 = primary_values(m)
    print(f"run directory:      {result.run_dir}")
    print(f"test {metric} fp32:".ljust(20) + f"{fp32:.4f}")
    print(f"test {metric} int8:".ljust(20) + f"{int8:.4f} ({m['quantize_method']})")
    print(f"model size:         {m['model_size_bytes_fp32']} -> {m['model_size_bytes_int8']} bytes")
    print(f"train samples/s:    {m['train_samples_per_second']:.0f}")
    verdict = f"yes -> {result.promoted_model}" if m["promoted"] else "no (below the bar)"
    print(f"promoted:           {verdict}")
    for note in result.data_notes:  # what preprocess left out: said here, not only in its log
        print(f"data:               {note}")
    print(f"report:             {result.report}")
    print(f"logs:               {result.run_dir / 'logs'}")
    print(f"pipeline time:      {result.seconds:.1f} s")


def _submit(args: argparse.Namespace) -> None:
    """``submit`` / ``schedule``: create a run (or a recurring one) on a KFP host."""
    from kubetrain.pipeline import submit

    if not args.host:
        raise KubetrainError(f"{args.command}: give --host URL (or set KF_PIPELINES_ENDPOINT)")
    req = submit.request(args.config, args.overrides)
    if args.command == "submit":
        done = submit.submit_run(req, args.host, args.experiment, args.run_name)
    else:
        done = submit.schedule_run(req, args.host, args.name, args.cron, args.experiment)
    replaced = f" (replaced {', '.join(done.replaced)})" if done.replaced else ""
    print(f"created {done.kind} '{done.name}' id {done.id}{replaced}")


def _train(cfg, args: argparse.Namespace) -> None:
    """``train``: one training run on a dataset, with tuned parameters if given."""
    from kubetrain.pipeline import steps

    _require_dir(args.dataset, "dataset", artifacts.DATASET_META)
    if args.params is not None and not args.params.is_file():
        what = "is a directory, not a best_params.json file"
        raise KubetrainError(f"{args.params}: {what if args.params.is_dir() else 'no such file'}")
    steps.train(cfg, args.dataset, args.output, params_file=args.params)


def _quantize(cfg, args: argparse.Namespace) -> None:
    """``quantize``: an int8 model from a trained one."""
    from kubetrain.pipeline import steps

    _require_dir(args.dataset, "dataset", artifacts.DATASET_META)
    _require_dir(args.model, "model", artifacts.MODEL_SPEC)
    steps.quantize(cfg, args.dataset, args.model, args.output)


def _evaluate(cfg, args: argparse.Namespace) -> None:
    """``evaluate``: both models on the test split, the report and the promotion verdict."""
    from kubetrain.pipeline import steps

    _require_dir(args.dataset, "dataset", artifacts.DATASET_META)
    _require_dir(args.model, "model", artifacts.MODEL_SPEC)
    _require_dir(args.quantized, "quantized model", artifacts.QUANT_INFO)
    if args.tune is not None:
        _require_dir(args.tune, "tune", artifacts.SEARCH_RESULT)
    steps.evaluate(cfg, args.dataset, args.model, args.quantized, args.output, args.tune)


def _config_docs(args: argparse.Namespace) -> int:
    """``config docs``: the configuration reference, to ``--output`` or standard output."""
    from kubetrain.pipeline.docs import render

    page = render()
    if args.output is None:
        sys.stdout.write(page)
        return 0
    if args.output.is_dir():
        raise UsageError(f"--output {args.output}: is a directory; give the Markdown file to write")
    from kubetrain.core.io import atomic_write, check_writable_dir

    check_writable_dir(args.output.parent, "--output")
    atomic_write(args.output, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    print(f"wrote {args.output}")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """Run the subcommand of parsed ``args``; returns the exit status (errors raise)."""
    from kubetrain.pipeline import steps
    from kubetrain.pipeline.config import load_config

    if args.command in ("runs", "compare"):
        return _runs_command(args)
    if args.command == "config" and args.config_command == "docs":
        return _config_docs(args)
    _check_paths(args)
    cfg = load_config(args.config, args.overrides)
    match args.command:
        case "config":
            sys.stdout.write(cfg.to_yaml())
        case "compile":
            _compile(cfg, args)
        case "run":
            _run(cfg, args)
        case "manifests":
            from kubetrain.pipeline.manifests import cluster_manifests, header, to_yaml

            sys.stdout.write(to_yaml(cluster_manifests(cfg), header(cfg)))
        case "submit" | "schedule":
            _submit(args)
        case "preprocess":
            steps.preprocess(cfg, args.output)
        case "tune":
            _require_dir(args.dataset, "dataset", artifacts.DATASET_META)
            steps.tune(cfg, args.dataset, args.output)
        case "train":
            _train(cfg, args)
        case "quantize":
            _quantize(cfg, args)
        case "evaluate":
            _evaluate(cfg, args)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so it unwinds exactly as Ctrl-C does."""


def _stop(signum: int) -> None:
    """The first SIGTERM or SIGINT (later ones are ignored: ``kubetrain.core.processes``).

    What runs below is noted first: ``main`` waits for all of it before it exits. Ctrl-C
    reaches every process of the terminal's foreground group, a SIGTERM (kill, a container
    stop) only this one: pass it on as the SIGINT they would have had to every process below
    (a KFP task's Python under its ``sh``, a search's trial processes: each stops what it
    runs), except torchrun agents and what runs under them, which their launcher stops quietly
    (a signalled torchrun prints a traceback per process it runs). Then unwind here.
    """
    from kubetrain.core.processes import descendants

    global _BELOW
    _BELOW = descendants()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    for proc in _not_under_torchrun(_BELOW):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGINT)
    raise Terminated()


def _not_under_torchrun(tree: list) -> list:
    """The processes of ``tree`` that are neither a torchrun agent nor below one."""
    local = sys.modules.get("kubetrain.launch.local")
    agents = set(local.OWN_STOP) if local else set()
    parents = {}
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            parents[proc.pid] = proc.ppid()
            if "torch.distributed.run" in proc.cmdline():
                agents.add(proc.pid)

    def under_agent(pid: int) -> bool:
        while pid in parents:
            if pid in agents:
                return True
            pid = parents[pid]
        return pid in agents

    return [proc for proc in tree if not under_agent(proc.pid)]


# The processes below this one when the first signal came (``_stop``).
_BELOW: list = []


def _reap() -> None:
    """After a signal: wait for every process that was below us, and what is below us now, to
    end (they were told to stop); kill what is still there after the grace period."""
    from kubetrain.core.processes import descendants, reap

    by_pid = {p.pid: p for p in [*_BELOW, *descendants()]}
    killed = reap(list(by_pid.values()), grace=STOP_GRACE_SECONDS)
    if killed:
        log.debug("killed %s: still running %.0f s after the stop", killed, STOP_GRACE_SECONDS)


# How long the processes below the CLI have to stop after a signal before they are killed
# (torchrun's launcher gives its workers 30 s; the rest is the KFP task's own unwinding).
STOP_GRACE_SECONDS = 45.0


def main(argv: list[str] | None = None) -> int:
    """Run one ``kubetrain`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 done, 1 failed, 2 bad config or arguments, 130 Ctrl-C, 143 SIGTERM.
    """
    args = build_parser().parse_args(argv)

    from kubetrain.core.io import clean_stale_temp_dirs
    from kubetrain.core.logs import setup_logging
    from kubetrain.core.processes import stop_once

    setup_logging(args.verbose)
    with stop_once((signal.SIGTERM, signal.SIGINT), _stop):
        try:
            for stale in clean_stale_temp_dirs():
                log.debug("removed %s (left by a process that is gone)", stale)
            return dispatch(args)
        except KubetrainError as err:
            print(f"kubetrain: {err}", file=sys.stderr)
            return err.exit_code
        except Terminated:
            _reap()
            print("kubetrain: terminated (SIGTERM); stopped what was running", file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            _reap()
            print("kubetrain: interrupted", file=sys.stderr)
            return 130
        except OSError as err:
            # A file-system failure outside kubetrain's own writes (which say which file and why).
            log.debug("file system error", exc_info=True)
            where = f": {err.filename}" if err.filename else ""
            print(f"kubetrain: {err.strerror or err}{where}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
