"""Headless Chromium (Debian's package, installed by scripts/setup.sh) for the tests and scripts that look at
pages as a person's browser renders them."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# Without the background-networking flags Chromium keeps trying to reach Google's hosts, which this machine's
# closed network refuses; --no-sandbox because CI runs as root.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--hide-scrollbars"]  # fmt: skip


def chromium() -> str:
    """The Chromium binary; a clear error when it is missing (scripts/setup.sh installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no Chromium on PATH: run scripts/setup.sh (it installs Debian's chromium package)")


def _run(url: str, *extra: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="hivegen-chromium-") as profile:
        return subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, url],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


def rendered_dom(url: str) -> str:
    """The page's DOM after Chromium loaded and rendered it (scripts, had any run, would have changed it)."""
    done = _run(url, "--dump-dom")
    if done.returncode != 0 or "<html" not in done.stdout:
        raise RuntimeError(f"chromium could not render {url}: {done.stderr[-2000:]}")
    return done.stdout


def screenshot(url: str, path: Path, width: int = 1280, height: int = 900) -> Path:
    """Save a PNG of the page as Chromium renders it."""
    done = _run(url, f"--screenshot={path}", f"--window-size={width},{height}")
    if not path.exists():
        raise RuntimeError(f"chromium made no screenshot of {url}: {done.stderr[-2000:]}")
    return path
