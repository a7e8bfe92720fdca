"""Real servers that tests start on 127.0.0.1 (not fakes): an S3 endpoint (moto's server)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Endpoint:
    url: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "eu-west-1"

    @property
    def storage_options(self) -> dict:
        """What a user puts in ``data.storage_options`` for this endpoint (s3fs options)."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.url, "region_name": self.region},
        }

    def make_bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(**self.storage_options).mkdir(name)
        return f"s3://{name}"


@contextmanager
def s3_server() -> Iterator[S3Endpoint]:
    """moto's S3 server in its own process on a free loopback port, until the block ends."""
    pytest.importorskip("moto", reason="moto[server] is not installed (pip install -e '.[dev]')")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    exe = shutil.which("moto_server", path=str(__import__("pathlib").Path(sys.executable).parent))
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}") from None
                time.sleep(0.1)
        yield S3Endpoint(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
