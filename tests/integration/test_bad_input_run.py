"""The catalogue's cases that need whole processes: signals (one or two, to the CLI or its whole
group), errors inside ``kubetrain run``, object storage that cannot be read (moto's S3 server on
127.0.0.1, a closed port), a tracking server that is down.

Each case runs ``kubetrain`` as a subprocess with its own temporary directory (``TMPDIR``), so
what a killed process leaves behind is visible and nothing else's is touched. The checks are the
catalogue's (tests/unit/test_bad_input.py): exit code, one last line naming what and where, no
traceback, no ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kubetrain.launch.local import cpu_cores

KUBETRAIN = [sys.executable, "-m", "kubetrain.cli"]
LONG_TRAIN = ["--set", "train.nproc=2", "--set", "train.epochs=100000", "--set",
              "train.checkpoint_every_steps=0"]  # fmt: skip


def start(args: list[str], tmp: Path, **kwargs) -> tuple[subprocess.Popen, Path, Path]:
    """``kubetrain ARGS`` in its own session with TMPDIR=tmp/tmp; its stdout and stderr files."""
    (tmp / "tmp").mkdir(exist_ok=True)
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    env = dict(os.environ, TMPDIR=str(tmp / "tmp"), PYTHONUNBUFFERED="1")
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([*KUBETRAIN, *args], stdout=o, stderr=e, env=env, cwd=tmp,
                                start_new_session=True, **kwargs)  # fmt: skip
    return proc, out, err


def wait_for(predicate, proc: subprocess.Popen, what: str, limit: float = 240.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"no {what} after {limit:.0f} s"
        time.sleep(0.2)


def training_started(tmp: Path, err: Path, out: Path):
    """True once a worker has finished an epoch (the workers' log lines: on the terminal for a
    step, in ``<run>/logs/pipeline.log`` under ``kubetrain run``)."""
    pipeline_log = tmp / "run" / "logs" / "pipeline.log"

    def started() -> bool:
        text = err.read_text() + out.read_text()
        if pipeline_log.is_file():
            text += pipeline_log.read_text(errors="replace")
        return "epoch 1/" in text

    return started


def kubetrain_temp_dirs(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "tmp").glob("kubetrain-*"))


def assert_one_line(code: int, err: str, want_code: int, names: str, root: Path) -> None:
    assert code == want_code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("kubetrain") and names in lines[-1], lines[-3:]
    assert not list(root.rglob("metrics.json"))


def still_running(tree: list[psutil.Process], limit: float = 90.0) -> list[str]:
    """Wait until every process of ``tree`` has ended (a zombie has); the ones left, named."""
    deadline = time.monotonic() + limit

    def running(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while (left := [p for p in tree if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [" ".join(p.cmdline()[:4]) for p in left if running(p)]


def kill_tree(proc: subprocess.Popen, sig: int) -> list[psutil.Process]:
    """Send ``sig`` to ``proc`` and to every process below it; returns them."""
    tree = [psutil.Process(proc.pid)]
    tree += tree[0].children(recursive=True)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    return tree


@pytest.mark.integration
@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [(signal.SIGTERM, 143, "kubetrain: terminated (SIGTERM)"),
     (signal.SIGINT, 130, "kubetrain: interrupted")],
    ids=["sigterm", "sigint"],
)  # fmt: skip
def test_a_signal_stops_training_with_one_line_and_leaves_nothing(
    sig, code, line, tmp_path, digits_dir
):
    args = ["train", "--dataset", str(digits_dir), "--output", str(tmp_path / "m"), *LONG_TRAIN]
    proc, out, err = start(args, tmp_path)
    try:
        wait_for(training_started(tmp_path, err, out), proc, "training")
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, sig)  # only the kubetrain process, as `kill` or a container stop
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc, signal.SIGKILL)
    assert_one_line(proc.returncode, err.read_text(), code, line, tmp_path)
    assert kubetrain_temp_dirs(tmp_path) == []  # torchrun's log directory went with it
    assert still_running(tree, limit=5) == []  # torchrun and its workers too


def _signal_twice(proc: subprocess.Popen, how: str) -> None:
    """Two SIGTERMs milliseconds apart: both to the CLI, or to the CLI and then to its whole
    process group (what GNU ``timeout`` does)."""
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.01)
    if how == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)


def _checkpoints(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("ckpt-*"))


@pytest.mark.integration
@pytest.mark.parametrize("how", ["cli", "group"], ids=["twice-to-the-cli", "cli-then-group"])
def test_two_sigterms_stop_training_with_one_line_and_nothing_runs_after(how, tmp_path, digits_dir):
    args = ["train", "--dataset", str(digits_dir), "--output", str(tmp_path / "m"), *LONG_TRAIN,
            "--set", "train.checkpoint_every_steps=5", "--set", f"train.checkpoint_dir={tmp_path / 'ck'}"]  # fmt: skip
    proc, out, err = start(args, tmp_path)
    try:
        wait_for(training_started(tmp_path, err, out), proc, "training")
        tree = psutil.Process(proc.pid).children(recursive=True)
        _signal_twice(proc, how)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc, signal.SIGKILL)
    assert_one_line(proc.returncode, err.read_text(), 143, "terminated (SIGTERM)", tmp_path)
    assert still_running(tree, limit=1) == []  # torchrun and its workers went before the CLI
    written = _checkpoints(tmp_path / "ck")
    time.sleep(2)
    assert _checkpoints(tmp_path / "ck") == written  # nobody writes after the CLI has gone
    assert kubetrain_temp_dirs(tmp_path) == []


@pytest.mark.integration
def test_after_sigkill_the_next_start_removes_the_stale_temporary_dirs(tmp_path, digits_dir):
    args = ["train", "--dataset", str(digits_dir), "--output", str(tmp_path / "m"), *LONG_TRAIN]
    proc, out, err = start(args, tmp_path)
    try:
        wait_for(training_started(tmp_path, err, out), proc, "training")
        left = kubetrain_temp_dirs(tmp_path)
        assert [d for d in left if d.startswith(f"kubetrain-torchrun-{proc.pid}-")], left
    finally:
        tree = kill_tree(proc, signal.SIGKILL)  # nothing runs its clean-up
        psutil.wait_procs(tree, timeout=30)
    assert kubetrain_temp_dirs(tmp_path) == left  # still there: nobody cleaned up
    nxt, _, nxt_err = start(["config", "show"], tmp_path)
    assert nxt.wait(timeout=120) == 0, nxt_err.read_text()
    assert kubetrain_temp_dirs(tmp_path) == []


# -- `kubetrain run`: the same line when a step fails inside the pipeline ---------------------
FAST_RUN = ["--set", "tune.enabled=false", "--set", "train.epochs=1", "--set", "train.nproc=1"]


def run_case(tmp: Path, *args: str, timeout: float = 400) -> tuple[int, str]:
    proc, _, err = start(["run", "--output", str(tmp / "run"), *FAST_RUN, *args], tmp)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc, signal.SIGKILL)
    return proc.returncode, err.read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_stops_a_whole_run_with_one_line(tmp_path):
    proc, out, err = start(["run", "--output", str(tmp_path / "run"), "--set",
                            "tune.enabled=false", *LONG_TRAIN], tmp_path)  # fmt: skip
    try:
        wait_for(training_started(tmp_path, err, out), proc, "training", limit=400)
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc, signal.SIGKILL)
    assert_one_line(proc.returncode, err.read_text(), 143, "terminated (SIGTERM)", tmp_path)
    assert still_running(tree) == []  # the KFP task, the step server, its step, torchrun
    # what the killed step left (its torchrun log directory) goes at the next start
    nxt, _, _ = start(["config", "show"], tmp_path)
    assert nxt.wait(timeout=120) == 0
    assert kubetrain_temp_dirs(tmp_path) == []


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("how", ["cli", "group"], ids=["twice-to-the-cli", "cli-then-group"])
def test_two_sigterms_stop_a_whole_run_and_nothing_runs_after(how, tmp_path):
    """The KFP task runs under ``sh -ec`` (kfp.local), which passes no signal on: the task, its
    torchrun agent and workers must still stop before the CLI exits, whichever way the
    signals come, and leave no temporary folder (kfp.local's ``mktemp -d`` per task included)."""
    proc, out, err = start(["run", "--output", str(tmp_path / "run"), "--set",
                            "tune.enabled=false", *LONG_TRAIN, "--set",
                            "train.checkpoint_every_steps=5"], tmp_path)  # fmt: skip
    try:
        wait_for(training_started(tmp_path, err, out), proc, "training", limit=400)
        tree = psutil.Process(proc.pid).children(recursive=True)
        _signal_twice(proc, how)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc, signal.SIGKILL)
    assert_one_line(proc.returncode, err.read_text(), 143, "terminated (SIGTERM)", tmp_path)
    assert still_running(tree, limit=1) == []
    written = _checkpoints(tmp_path / "run")
    time.sleep(2)
    assert _checkpoints(tmp_path / "run") == written
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("tmp.")] == []
    assert kubetrain_temp_dirs(tmp_path) == []


@pytest.mark.integration
@pytest.mark.slow
def test_run_with_one_class_is_the_data_line(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,label\n" + "".join(f"{i},{i},x\n" for i in range(30)))
    code, err = run_case(tmp_path, "--set", f"data.source={tmp_path / 'd.csv'}")
    assert_one_line(code, err, 1, "d.csv: needs at least 2 classes", tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_run_more_workers_than_cores_is_a_config_error(tmp_path):
    n = cpu_cores() + 1
    if n > 64:
        pytest.skip("more than 63 cores")
    code, err = run_case(
        tmp_path, "--set", f"train.nproc={n}", "--set", f"train.batch_size={8 * n}"
    )
    assert_one_line(code, err, 2, "train.nproc", tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_run_batch_larger_than_the_training_set_is_a_config_error(tmp_path):
    code, err = run_case(tmp_path, "--set", "train.batch_size=4096")
    assert_one_line(code, err, 2, "train.batch_size", tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_run_on_a_full_disk_says_no_space_left(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        proc, _, err = start(["run", "--output", str(disk / "run"), *FAST_RUN], tmp_path)
        try:
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                kill_tree(proc, signal.SIGKILL)
        assert_one_line(proc.returncode, err.read_text(), 1, "no space left on device", tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# -- object storage that cannot be read: against moto's S3 server on 127.0.0.1 -----------------
@pytest.fixture(scope="module")
def bucket():
    """moto's S3 server with bucket ``bkt``: an image folder ``images/`` and a table ``d.csv``."""
    import io

    from PIL import Image

    from servers import s3_server

    with s3_server() as s3:
        import s3fs

        fs = s3fs.S3FileSystem(**s3.storage_options)
        fs.mkdir("bkt")
        for i in range(24):
            png = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(png, format="PNG")
            fs.pipe(f"bkt/images/{'ab'[i % 2]}/{i}.png", png.getvalue())
        rows = "".join(f"{i},{i % 3},{i % 2}\n" for i in range(60))
        fs.pipe("bkt/d.csv", ("a,b,label\n" + rows).encode())
        yield s3


def _no_aws_env() -> dict[str, str]:
    """This environment without AWS credentials (nor files or an instance to find them in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return dict(env, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent",
                AWS_SHARED_CREDENTIALS_FILE="/nonexistent")  # fmt: skip


def _closed_port() -> str:
    from servers import free_port

    return f"http://127.0.0.1:{free_port()}"


S3_CASES = {
    # (command, source, credentials?, endpoint ("moto" or "closed"), exit code, the line says)
    "preprocess-images-no-credentials": ("preprocess", "s3://bkt/images/", False, "moto", 2,
                                         "s3://bkt/images/: no credentials for s3://"),
    "preprocess-csv-no-credentials": ("preprocess", "s3://bkt/d.csv", False, "moto", 2,
                                      "s3://bkt/d.csv: no credentials for s3://"),
    "run-images-no-credentials": ("run", "s3://bkt/images/", False, "moto", 2,
                                  "s3://bkt/images/: no credentials for s3://"),
    "preprocess-images-endpoint-closed": ("preprocess", "s3://bkt/images/", True, "closed", 1,
                                          "s3://bkt/images/: cannot reach the storage endpoint"),
    "run-csv-endpoint-closed": ("run", "s3://bkt/d.csv", True, "closed", 1,
                                "s3://bkt/d.csv: cannot reach the storage endpoint"),
    "preprocess-no-bucket": ("preprocess", "s3://nobkt/images/", True, "moto", 1,
                             "s3://nobkt/images/: no such bucket 'nobkt'"),
    "run-csv-no-bucket": ("run", "s3://nobkt/d.csv", True, "moto", 1,
                          "s3://nobkt/d.csv: no such bucket 'nobkt'"),
}  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("case", list(S3_CASES.values()), ids=list(S3_CASES))
def test_object_storage_that_cannot_be_read_is_one_line(case, bucket, tmp_path):
    command, source, credentials, endpoint, code, line = case
    env = _no_aws_env()
    if credentials:
        env.update(AWS_ACCESS_KEY_ID=bucket.key, AWS_SECRET_ACCESS_KEY=bucket.secret)
    url = bucket.url if endpoint == "moto" else _closed_port()
    options = f"{{client_kwargs: {{endpoint_url: '{url}', region_name: {bucket.region}}}}}"
    out = tmp_path / ("run" if command == "run" else "ds")
    args = [command, "--output", str(out), "--set", f"data.source={source}",
            "--set", f"data.storage_options={options}", *(FAST_RUN if command == "run" else [])]  # fmt: skip
    proc = subprocess.run([*KUBETRAIN, *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert_one_line(proc.returncode, proc.stderr, code, line, tmp_path)
    if endpoint == "closed":
        assert url in proc.stderr.splitlines()[-1]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.integration
def test_compiling_a_recipe_on_object_storage_needs_neither_credentials_nor_the_endpoint(
    tmp_path,
):
    """``vision-gpu`` reads an ``s3://`` bucket of the cluster's MinIO: compiling it here, with no
    credentials and its endpoint unreachable, writes the pipeline (it never touches data)."""
    out = tmp_path / "p.yaml"
    args = ["compile", "--config", "vision-gpu", "-o", str(out),
            "--set", f"data.storage_options.endpoint_url={_closed_port()}"]  # fmt: skip
    proc = subprocess.run([*KUBETRAIN, *args], env=_no_aws_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 0 and "Traceback" not in proc.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_a_tracking_server_that_is_down_costs_the_run_nothing_but_its_line(tmp_path):
    """MLflow at a closed port: the track task fails (in seconds, no hang), and the run's
    results are still written and listed as done; the last line names the URI (exit 1: an
    outside service failed)."""
    url = _closed_port()
    code, err = run_case(tmp_path, "--set", f"tracking.mlflow_uri={url}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("kubetrain: track:") and url in lines[-1], lines[-3:]
    run = tmp_path / "run"
    assert (run / "metrics.json").is_file() and (run / "report.html").is_file()
    listed = subprocess.run([*KUBETRAIN, "runs", "--root", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert "done" in listed.stdout and "incomplete" not in listed.stdout, listed.stdout
    # kfp.local's `mktemp -d` of each task went with the run
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("tmp.")] == []
    assert kubetrain_temp_dirs(tmp_path) == []


@pytest.mark.integration
@pytest.mark.slow
def test_rows_preprocess_drops_reach_the_terminal_and_the_report(tmp_path):
    """Dropped rows were said only in the preprocess step's log; the run exited 0 in silence."""
    rows = "".join(f"{'' if i % 20 == 0 else i % 7},{i % 3},{i % 2}\n" for i in range(200))
    (tmp_path / "d.csv").write_text("a,b,label\n" + rows)
    code, err = run_case(tmp_path, "--set", f"data.source={tmp_path / 'd.csv'}",
                         "--set", "evaluate.min_accuracy=0")  # fmt: skip
    assert code == 0, err[-3000:]
    said = f"dropped 10 of 200 rows from {tmp_path / 'd.csv'}: 10 with missing values"
    out = (tmp_path / "stdout.txt").read_text()
    assert f"data:               {said}" in out, out[-2000:]
    assert said in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.vision
def test_run_on_a_full_disk_while_writing_image_shards_names_the_step_and_the_shard(tmp_path):
    pytest.importorskip("torchvision", reason="the image kind needs torchvision")
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(16):  # noise: PNG cannot compress it, so the shards fill the disk
            pixels = np.random.default_rng([i, ord(c)]).integers(0, 255, (96, 96, 3), np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        proc, _, err = start(["run", "--output", str(disk / "run"), *FAST_RUN,
                              "--set", f"data.source={root}", "--set", "data.shard_samples=4",
                              "--set", "model.name=cnn"], tmp_path)  # fmt: skip
        try:
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                kill_tree(proc, signal.SIGKILL)
        text = err.read_text()
        assert_one_line(proc.returncode, text, 1, "preprocess: no space left on device", tmp_path)
        assert "while writing " in text.splitlines()[-1] and ".parquet" in text.splitlines()[-1]
        assert not list(disk.rglob("*.parquet")) and not list(disk.rglob(".*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
