"""The inspection page in a real browser: headless Chromium (Debian's `chromium`, which
`make setup` installs) renders `recdsl inspect --html` for a chunkwise cell (gla) and a
nonlinear one (lstm): the screenshot is not blank, the DOM after the page's script ran has a
link target and a link for every `.rec` line, and opening the page at `#rec-L<n>` (what a
click on that line does) highlights the lines that line produced in every backend's pane."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from click.testing import CliRunner

import recdsl
from recdsl.cli import main

from .test_inspect_html import Dom

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no headless Chromium found: `make setup` installs Debian's chromium "
                "(apt-get install --no-install-recommends chromium)")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: the tests may run as root (CI containers); --disable-gpu: no display
    cmd = [_browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module", params=["gla", "lstm"])
def page(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("chromium") / f"{request.param}.html"
    res = CliRunner().invoke(main, ["inspect", request.param, "--html", str(out)])
    assert res.exit_code == 0, res.output
    return request.param, out


def _dom(url: str) -> Dom:
    done = _chromium("--virtual-time-budget=5000", "--dump-dom", url)
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    dom = Dom()
    dom.feed(done.stdout)
    dom.close()
    return dom


def test_screenshot_is_not_blank(page):
    from PIL import Image
    name, html = page
    png = html.with_suffix(".png")
    done = _chromium("--window-size=1400,1800", f"--screenshot={png}", html.as_uri())
    assert done.returncode == 0 and png.exists(), done.stderr[-2000:]
    img = Image.open(png).convert("L")
    assert img.size == (1400, 1800)
    lo, hi = img.getextrema()
    inked = sum(img.histogram()[:200])          # pixels clearly darker than the white page
    assert hi - lo > 100 and inked > 0.02 * img.size[0] * img.size[1], (name, lo, hi, inked)


def test_rendered_dom_links_every_rec_line(page):
    name, html = page
    dom = _dom(html.as_uri())
    n = len(recdsl.load(name).source_text.splitlines())
    for i in range(1, n + 1):
        assert f"rec-L{i}" in dom.ids and f"#rec-L{i}" in dom.hrefs, (name, i)


def test_a_rec_line_highlights_its_counterparts_in_every_pane(page):
    name, html = page
    spec = recdsl.load(name)
    line = max(s.line for s in spec.plan().stages if s.line)     # the state update's line
    dom = _dom(html.as_uri() + f"#rec-L{line}")
    hit = [ln for ln in dom.lines if "hit" in ln["classes"]]
    assert hit and all(str(line) in ln["rec"].split() for ln in hit)
    for backend in ("reference", "torch", "triton"):
        assert any(ln["id"].startswith(f"{spec.name}-{backend}") for ln in hit), backend
