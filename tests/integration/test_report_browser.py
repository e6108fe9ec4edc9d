"""Render the report in headless Chromium (when installed): the page loads from disk with its
figures decoded, and the screenshot shows curves and coloured heat-map tokens."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.test_report import write_runs
from weighted_mtp.report import build_report
from weighted_mtp.report.heatmap import SELECTED

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
    ),
]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    return build_report(write_runs(root), root / "report")


def test_dom_has_heat_maps_and_loaded_figures(page: Path, tmp_path: Path) -> None:
    dom = chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    images = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert images is not None, "the page's load handler did not run"
    loaded, total = map(int, images.groups())
    assert total == page.read_text().count("<img ") >= 5 and loaded == total
    assert dom.count('class="t w"') > 50
    assert 'class="cbar"' in dom and "head 4" in dom


def test_head_tabs_switch_in_the_browser(page: Path, tmp_path: Path) -> None:
    """The tab script runs in the page: ``#head=3`` opens head 3 of every heat map."""
    views = re.compile(r'<div class="headview" data-head="(\w+)"( hidden(?:="")?)?>')
    default = views.findall(chromium(tmp_path, "--dump-dom", page.as_uri()).stdout)
    chosen = views.findall(chromium(tmp_path, "--dump-dom", page.as_uri() + "#head=3").stdout)
    shown = lambda found: {head for head, hidden in found if not hidden}  # noqa: E731
    assert default and shown(default) == {"1"}
    assert shown(chosen) == {"3"} and len(chosen) == len(default)


def test_screenshot_shows_curves_and_coloured_tokens(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1400,8000", f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape[:2] == (8000, 1400)
    packed = pixels[..., 0] * 65536 + pixels[..., 1] * 256 + pixels[..., 2]
    assert len(np.unique(packed)) > 500, "the page looks blank"
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    red = (r - np.maximum(g, b) > 80).sum()  # up-weighted tokens (and rho-1 curves)
    blue = (b - np.maximum(r, g) > 60).sum()  # down-weighted tokens (and baseline curves)
    green = (g - np.maximum(r, b) > 25).sum()  # rho-1 selections, verifiable curves
    assert red > 2000 and blue > 2000 and green > 2000, (red, blue, green)
    selected = int(SELECTED[1:], 16)  # the background of tokens Rho-1 kept, exactly
    assert (packed == selected).sum() > 1000
