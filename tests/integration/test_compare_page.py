"""The page of `kubetrain compare`, rendered in headless Chromium (.ci/run installs it; the test
skips without it): its tables in the DOM, both runs' curves in the screenshot."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from kubetrain.cli import main
from tests.unit.test_runs import runs_root  # noqa: F401 (a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)"
)


@needs_chromium
def test_compare_page_renders_in_headless_chromium(runs_root, tmp_path):  # noqa: F811
    out_html = tmp_path / "compare.html"
    assert main(["compare", "20261130-0300", "20261130-0400", "--root", str(runs_root),
                 "-o", str(out_html)]) == 0  # fmt: skip
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1400"]  # fmt: skip
    url = out_html.as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert "<h1>kubetrain compare</h1>" in dom
    assert "<th>model.hidden_sizes</th><td>[256, 128]</td><td>[64]</td>" in dom
    assert "<th>test fp32</th><td>0.9593</td><td>0.8370</td>" in dom
    assert "<th>promoted</th><td>yes</td><td>no</td>" in dom
    assert '<img id="curves"' in dom

    shot = tmp_path / "compare.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120,
                   check=True)  # fmt: skip
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    # Both runs' curves were drawn: matplotlib's first two line colours are on the page.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        near = (abs(pixels * 255 - rgb) < 12).all(axis=-1)
        assert near.sum() > 200, rgb
    keep = os.environ.get("KUBETRAIN_KEEP_SCREENSHOT")
    if keep:  # to look at it
        shutil.copyfile(shot, keep)
