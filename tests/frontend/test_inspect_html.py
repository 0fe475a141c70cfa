"""`recdsl inspect FILE --html OUT`: the page's DOM (parsed with html.parser). A rendered
screenshot in headless Chromium: test_inspect_chromium.py."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

import recdsl
from recdsl.cli import main


class Dom(HTMLParser):
    """ids, link targets, the .rec lines and every generated line with its .rec links."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.lines: list[dict] = []          # every <div class="l">: id, data-rec, hrefs inside
        self.tags: list[str] = []
        self.text: list[str] = []
        self.external: list[str] = []
        self._line = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            assert a["id"] not in self.ids, f"duplicate id {a['id']}"
            self.ids.add(a["id"])
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
            if self._line is not None:
                self._line["links"].append(a["href"])
        for key in ("src", "href"):
            if key in a and a[key] and not a[key].startswith("#"):
                self.external.append(a[key])
        if tag == "link":
            self.external.append(str(a))
        if tag == "div" and "l" in (a.get("class") or "").split():
            self._line = {"id": a.get("id"), "rec": a.get("data-rec"), "links": [], "classes": a["class"].split()}
            self.lines.append(self._line)

    def handle_endtag(self, tag):
        if tag == "div":
            self._line = None

    def handle_data(self, data):
        self.text.append(data)


def _page(name: str, tmp_path, *extra) -> tuple[Dom, str]:
    out = tmp_path / f"{name}.html"
    res = CliRunner().invoke(main, ["inspect", name, "--html", str(out), *extra])
    assert res.exit_code == 0, res.output
    text = out.read_text(encoding="utf-8")
    dom = Dom()
    dom.feed(text)
    dom.close()
    return dom, text


@pytest.fixture(scope="module", params=["gla", "lstm"])
def page(request, tmp_path_factory):
    dom, text = _page(request.param, tmp_path_factory.mktemp("html"))
    return request.param, dom, text


def test_page_is_self_contained(page):
    _, dom, text = page
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text and "<script>" in text
    assert dom.external == []                         # no network: no src=, no http links, no <link>
    assert "http://" not in text.split("<script>")[1] and "https://" not in text.split("<script>")[1]


def test_every_rec_line_is_a_link_target(page):
    name, dom, _ = page
    spec = recdsl.load(name)
    n = len(spec.source_text.splitlines())
    for i in range(1, n + 1):
        assert f"rec-L{i}" in dom.ids, i
        assert f"#rec-L{i}" in dom.hrefs, i
    rec_lines = [ln for ln in dom.lines if (ln["id"] or "").startswith("rec-L")]
    assert len(rec_lines) == n


def test_every_annotated_generated_line_links_to_its_rec_line(page):
    name, dom, _ = page
    spec = recdsl.load(name)
    generated = [ln for ln in dom.lines if not (ln["id"] or "").startswith("rec-L")]
    annotated = [ln for ln in generated if ln["rec"]]
    assert annotated, "no generated line carries its .rec line"
    for ln in annotated:
        for n in ln["rec"].split():
            assert f"rec-L{n}" in dom.ids, ln
            assert f"#rec-L{n}" in ln["links"], ln
    # every backend's pane has annotated lines, and the update lines of the cell are reached
    for backend in ("reference", "torch", "triton"):
        assert any(ln["id"].startswith(f"{spec.name}-{backend}") for ln in annotated), backend
    plan = spec.plan()
    reached = {int(n) for ln in annotated for n in ln["rec"].split()}
    assert {s.line for s in plan.stages if s.line} <= reached


def test_plan_and_selections_appear(page):
    name, dom, text = page
    spec = recdsl.load(name)
    plan = spec.plan()
    words = "".join(dom.text)
    for s in plan.stages:
        assert s.cls in words
    for b, sel in plan.selections.items():
        assert f"pane-{b}" in dom.ids or f"pane-{b}-kernels" in dom.ids
        for c in sel.stages:
            assert c.kernel.name in words
            for p in ([] if sel.oracle else c.passed):   # rejected candidates with their reasons
                assert p.reason.split(" (line")[0][:40] in words
    assert "passed over" in words


def test_page_shows_the_rejected_candidate(tmp_path):
    # hmm_forward on triton: the streamed semiring kernel is passed over with its reason
    # (the generated sequential kernel holds the small transition in registers), which runs
    dom, _ = _page("hmm_forward", tmp_path)
    words = "".join(dom.text)
    assert "triton.dense_semiring" in words and "holds the [3, 3] transition" in words
    assert "triton.sequential" in words


def test_aot_figures(tmp_path):
    pytest.importorskip("triton")
    dom, text = _page("lstm", tmp_path, "--dims", "D=4,H=4", "--aot", "--arch", "sm_80")
    words = "".join(dom.text)
    assert "registers" in words and "lstm_stage0_h_c_fwd" in words and "sm_80" in words


def test_html_errors(tmp_path):
    res = CliRunner().invoke(main, ["inspect", "lstm", "--aot"])
    assert res.exit_code == 1 and "--aot goes with --html" in res.output and "hint:" in res.output
    res = CliRunner().invoke(main, ["inspect", "lstm", "--html", str(tmp_path / "no" / "x.html")])
    assert res.exit_code == 1 and "--html: no folder" in res.output and "Traceback" not in res.output
