"""Rendering an HTML report in headless Chromium, for the report tests.

Chromium is a system package (`.ci/run` installs Debian's ``chromium``). Without it a test
fails when ``CI`` is set and is skipped otherwise, saying how to install it.
"""

from __future__ import annotations

import html.parser
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = "install it with `apt-get install chromium` (as .ci/run does)"


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def img_srcs(page: str) -> list[str]:
    parser = _Images()
    parser.feed(page)
    return parser.srcs


def chromium(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but chromium is not installed; {INSTALL}")
        pytest.skip(f"chromium is not installed; {INSTALL}")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_renders(html_path: pathlib.Path, tmp_path: pathlib.Path) -> int:
    """Screenshot the page (it must not be blank) and check that every image loads;
    returns the number of images."""
    page = html_path.read_text()
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", html_path.as_uri())
    with Image.open(shot) as image:
        rgb = np.asarray(image.convert("RGB"))
    assert rgb.std() > 10
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1

    # the report forbids scripts; only the probe copy lets its one script in
    probe = page.replace("script-src 'none'", "script-src 'unsafe-inline'", 1)
    assert probe != page
    script = (
        "<script>addEventListener('load', () => { const imgs = [...document.images];"
        " const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;"
        " document.title = `images=${imgs.length} broken=${broken}`; });</script>"
    )
    probe_path = html_path.with_name("probe.html")
    probe_path.write_text(probe.replace("</head>", script + "</head>", 1))
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe_path.as_uri())
    probe_path.unlink()
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    assert title is not None, dom.stdout[:2000]
    images = len(img_srcs(page))
    assert title.group(1) == f"images={images} broken=0"
    return images
