"""Mirror this host's pip settings into an image build, without baking them into a layer.

Reads ``pip config list`` (files and PIP_* environment alike) and writes, into ``--out``:
``pip_conf`` (a pip.conf for inside the build), ``pip_cert`` (the CA bundle pip trusts here, e.g.
a TLS-re-signing proxy's) and ``pip_constraint``; images/build.sh passes them as build secrets.
Wheels of local ``find-links`` folders are linked into ``--wheels`` (bind-mounted at /wheels).
``file://`` indexes are host paths and are left out; PyPI (or the configured index) serves instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

IN_BUILD = {"cert": "/run/secrets/pip_cert", "constraint": "/run/secrets/pip_constraint"}
PASS_THROUGH = ("index-url", "extra-index-url", "default-timeout", "retries", "trusted-host")


def host_settings() -> dict[str, str]:
    """``{"cert": ..., "find-links": ...}`` from ``pip config list`` (later entries win)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    if done.returncode != 0:  # no pip here: nothing to mirror, the build uses pip's defaults
        return {}
    out = done.stdout
    settings: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        name = key.rsplit(".", 1)[-1]
        settings[name] = value.strip().strip("'\"")
    return settings


def link_wheels(find_links: str, wheels: Path) -> int:
    wheels.mkdir(parents=True, exist_ok=True)
    count = 0
    for entry in find_links.split():
        folder = Path(entry.removeprefix("file://"))
        if "://" in entry.removeprefix("file://") or not folder.is_dir():
            continue
        for whl in folder.glob("*.whl"):
            target = wheels / whl.name
            if target.exists():
                count += 1
                continue
            try:
                os.link(whl, target)  # same filesystem: instant, no extra space
            except OSError:
                shutil.copy2(whl, target)
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the secret files")
    parser.add_argument("--wheels", type=Path, required=True, help="folder for local wheels")
    args = parser.parse_args()
    settings = host_settings()
    conf = ["[global]", "find-links = /wheels"]
    for name, target in IN_BUILD.items():
        src = Path(settings.get(name, ""))
        if settings.get(name) and src.is_file():
            shutil.copyfile(src, args.out / f"pip_{name}")
            conf.append(f"{name} = {target}")
    for name in PASS_THROUGH:
        if name not in settings:
            continue
        kept = [u for u in settings[name].split() if not u.startswith("file:")]
        if kept:
            conf.append(f"{name} = {' '.join(kept)}")
    (args.out / "pip_conf").write_text("\n".join(conf) + "\n")
    n = link_wheels(settings.get("find-links", ""), args.wheels)
    print(f"[images] pip settings mirrored: {', '.join(conf[1:])}; {n} local wheel(s)",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
