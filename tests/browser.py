"""Headless Chromium (Debian's `chromium`) for the pages marketpipe writes: a screenshot and the DOM
after the page's scripts ran, with every network lookup failing, as on a machine offline."""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]  # port 9: nobody listens


@dataclass(frozen=True)
class Rendered:
    screenshot: Image.Image
    dom: str

    def distinct_colors(self) -> int:
        """How many colours the screenshot holds: a blank page has one, a page of charts hundreds."""
        colors = self.screenshot.convert("RGB").getcolors(maxcolors=1 << 20)
        return len(colors) if colors is not None else 1 << 20


def chromium() -> str:
    """The browser; missing, it is an error naming the package (.ci/run installs it), not a skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise AssertionError("headless Chromium is needed: apt-get install chromium (.ci/run does)")
    return found


def render(page: Path, width: int = 1400, height: int = 3000, budget_ms: int = 15000) -> Rendered:
    """Open ``page`` from its file, offline; its screenshot and its DOM once scripts are done."""
    common = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--virtual-time-budget={budget_ms}",
        *OFFLINE,
    ]
    shot = page.with_suffix(".png")
    url = page.resolve().as_uri()
    subprocess.run([*common, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=180)
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=180)
    return Rendered(Image.open(io.BytesIO(shot.read_bytes())), dom.stdout)
