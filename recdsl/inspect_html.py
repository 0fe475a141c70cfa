"""`recdsl inspect FILE --html OUT`: one self-contained HTML page (inline CSS and JS, no
network) with the .rec source, the plan and every backend's selection (stages, classes,
reasons, candidates passed over), and each backend's generated code side by side with the
.rec. The generators end every line they emit for a part of the cell with a `file:LINE`
comment (recdsl.torch_expr.SourceNotes); each such line links to its .rec line, and
clicking a line (of the .rec or of any pane) highlights its counterparts in every pane.
With `aot=True` the Triton kernels are compiled ahead of time (no GPU needed) and their
registers, spills and shared memory are listed."""
from __future__ import annotations

import html
import re

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import RegexLexer, words
from pygments.lexers import CLexer, PythonLexer
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Text, Whitespace

from .errors import RecError

REC_KEYWORDS = ("cell", "input", "param", "state", "output", "heads", "where", "over", "edge", "for", "in", "on",
                "pair")


def _rec_lexer():
    from .builtins import BUILTINS

    class RecLexer(RegexLexer):
        """The .rec language, enough to colour it: keywords, builtins, primed states."""
        name = "rec"
        tokens = {"root": [
            (r'"""[\s\S]*?"""', String.Doc),
            (r'"[^"\n]*"', String),
            (r"#.*?$", Comment.Single),
            (words(REC_KEYWORDS, suffix=r"\b"), Keyword),
            (words(tuple(BUILTINS) + ("normal", "uniform"), suffix=r"\b"), Name.Builtin),
            (r"[A-Za-z_]\w*'", Name.Variable),
            (r"[A-Za-z_]\w*", Name),
            (r"(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", Number),
            (r"\*\*|[-+*/@<>=!~%^&|]", Operator),
            (r"[\[\](),:;.]", Punctuation),
            (r"\s+", Whitespace),
            (r".", Text),
        ]}
    return RecLexer(stripnl=False, ensurenl=True)


def _lines(code: str, lexer) -> list[str]:
    """The code highlighted, one HTML fragment per source line (pygments closes its spans
    at every newline); escaped plain text if the counts ever disagree."""
    plain = code.split("\n")
    if plain and plain[-1] == "":
        plain.pop()
    out = highlight(code, lexer, HtmlFormatter(nowrap=True)).split("\n")
    if out and out[-1] == "":
        out.pop()
    return out if len(out) == len(plain) else [html.escape(x) for x in plain]


# ----------------------------------------------------------------------------- panes
class Page:
    def __init__(self, source: str, filename: str, note_file: str):
        self.source = source
        self.filename = filename
        self.rec_lines = len(source.split("\n")) - (1 if source.endswith("\n") else 0)
        # the generators' `file:LINE` comments (the name as SourceNotes reduces it)
        self.note = re.compile(r"(?<![\w.])" + re.escape(note_file) + r":(\d+)\b")

    def refs(self, line: str) -> list[int]:
        """The .rec lines a generated line names (existing lines only, in order, once)."""
        seen = []
        for m in self.note.finditer(line):
            n = int(m.group(1))
            if 1 <= n <= self.rec_lines and n not in seen:
                seen.append(n)
        return seen

    def rec_pane(self) -> str:
        rows = []
        for i, frag in enumerate(_lines(self.source, _rec_lexer()), 1):
            rows.append(f'<div class="l" id="rec-L{i}" data-rec="{i}"><a class="n" href="#rec-L{i}">{i}</a>'
                        f'<span class="t">{frag or " "}</span></div>')
        return "\n".join(rows)

    def code_pane(self, key: str, code: str, lexer) -> str:
        raw = code.split("\n")
        rows = []
        for i, frag in enumerate(_lines(code, lexer), 1):
            refs = self.refs(raw[i - 1]) if i <= len(raw) else []
            if refs:
                links = "".join(f'<a class="r" href="#rec-L{n}">{n}</a>' for n in refs)
                rows.append(f'<div class="l" id="{key}-L{i}" data-rec="{" ".join(map(str, refs))}">'
                            f'<span class="n">{i}</span>{links}<span class="t">{frag or " "}</span></div>')
            else:
                rows.append(f'<div class="l" id="{key}-L{i}"><span class="n">{i}</span><span class="r0"></span>'
                            f'<span class="t">{frag or " "}</span></div>')
        return "\n".join(rows)

    def linkify(self, text: str) -> str:
        """Escaped text whose `line N` mentions link to the .rec line."""
        out, last = [], 0
        for m in re.finditer(r"\blines? (\d+)\b", text):
            n = int(m.group(1))
            if not 1 <= n <= self.rec_lines:
                continue
            out.append(html.escape(text[last:m.start()]))
            out.append(f'<a class="go" href="#rec-L{n}" data-line="{n}">{html.escape(m.group(0))}</a>')
            last = m.end()
        out.append(html.escape(text[last:]))
        return "".join(out)


# ----------------------------------------------------------------------------- the plan
def _plan_html(pg: Page, plan, trace: dict) -> str:
    from .plan import render
    e, L = html.escape, pg.linkify
    dims = ", ".join(f"{k}={v}" for k, v in plan.dims.items())
    out = [f'<p class="sum">plan <b>{e(plan.cell)}</b> ({e(dims)})'
           + (f", over {e(plan.over)}" if plan.over != "seq" else "")
           + (", checks verified" if plan.verified else "") + f", analysed in {plan.seconds:.2f} s</p>"]
    if plan.hoisted:
        out.append("<h4>hoisted (all steps at once)</h4><ul>"
                   + "".join(f"<li>{L(h)}</li>" for h in plan.hoisted) + "</ul>")
    out.append('<h4>stages</h4><table class="stages"><tr><th>stage</th><th>states</th><th>line</th><th>class</th>'
               "<th>detail</th><th>why</th><th>coefficients, jacobian, checks</th></tr>")
    for s in plan.stages:
        line = f'<a class="go" href="#rec-L{s.line}" data-line="{s.line}">{s.line}</a>' if s.line else ""
        more = [f"{e(k)} = {e(v)}" for k, v in s.coefficients.items()]
        if s.decay_range:
            more.append(f"decay range: {L(s.decay_range)}")
        if s.jacobian:
            more.append(f"jacobian: {e(s.jacobian)}" + (f" ({L(s.jacobian_reason)})" if s.jacobian_reason else ""))
        if s.transition:
            more.append(f"transition: {e(s.transition)}")
        more += [f"checked: {e(c)}" for c in s.checks]
        out.append(f"<tr><td>{s.index}</td><td>{e(', '.join(s.states))}</td><td>{line}</td>"
                   f'<td><span class="cls">{e(s.cls)}</span></td><td>{e(s.detail)}</td><td>{L(s.reason)}</td>'
                   f"<td>{'<br>'.join(more)}</td></tr>")
    out.append("</table>")
    if plan.outputs:
        out.append("<h4>outputs</h4><ul>" + "".join(
            f"<li>{e(o.name)}: {e(o.kind)}" + (f" of stage {', '.join(map(str, o.stages))}" if o.stages else "")
            + (f" ({L(o.detail)})" if o.detail else "") + "</li>" for o in plan.outputs) + "</ul>")
    out.append("<h4>selection per backend</h4>")
    for b, sel in plan.selections.items():
        if sel.cannot:
            out.append(f'<div class="sel"><h5>{e(b)}</h5><p class="cannot">cannot run it: {L(sel.cannot)}</p></div>')
            continue
        flags = ("reverse and cu_seqlens in its kernels" if sel.native and not sel.oracle else
                 "runs every stage as written (the oracle)" if sel.oracle else "")
        out.append(f'<div class="sel"><h5>{e(b)}</h5>' + (f'<p class="flags">{e(flags)}</p>' if flags else "")
                   + "<table><tr><th>stage</th><th>form</th><th>kernel</th><th>how</th><th>passed over</th></tr>")
        for c in sel.stages:
            by = f" (fallback: {e(c.kernel.borrowed)} code)" if c.kernel.borrowed else ""
            passed = "" if sel.oracle else "<ul>" + "".join(
                f'<li class="rej"><b>{L(p.title)}</b>: {L(p.reason)}</li>' for p in c.passed) + "</ul>"
            out.append(f"<tr><td>{c.stage} ({e(', '.join(c.states))})</td><td>{L(c.form.summary())}</td>"
                       f"<td><code>{e(c.kernel.name)}</code>{by}</td><td>{L(c.note or c.kernel.does)}</td>"
                       f"<td>{passed if c.passed else ''}</td></tr>")
        out.append("</table></div>")
    for w in plan.warnings:
        out.append(f'<p class="warn">warning: {L(w)}</p>')
    out.append(f"<details><summary>the plan as text (recdsl inspect --stage plan)</summary>"
               f"<pre>{e(render(plan))}</pre></details>")
    if trace:
        out.append("<details><summary>analysis passes (recdsl inspect --stage passes)</summary><pre>"
                   + "".join(f"== {e(k)}\n{e(str(v))}\n" for k, v in trace.items()) + "</pre></details>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- generated code
def _generated(ir, plan) -> list[tuple[str, str, str, str | None, object]]:
    """(key, title, code or reason, language, emitted) per pane, every built backend."""
    from .pipeline import BUILT, emit_cell
    panes = []
    for b in BUILT:
        sel = plan.selections[b]
        if sel.cannot:
            panes.append((b, b, f"{b} cannot run this cell: {sel.cannot}", None, None))
            continue
        try:
            em = emit_cell(ir, b)
        except RecError as err:
            panes.append((b, b, f"{b}: {err.message}", None, None))
            continue
        kernels = ", ".join(dict.fromkeys(c.kernel.name for c in em.selection.stages)) or "hoisted only"
        if b == "reference":
            panes.append((b, f"reference: one step ({kernels})", em.source, "python", em))
        elif b == "torch":
            panes.append((b, f"torch: forward ({kernels})", em.source, "python", em))
            for i, fl in enumerate(getattr(em.emitter, "fused", None) or []):
                panes.append((f"torch-c{i}", f"torch: generated C, fused loop of {', '.join(fl.states)}",
                              fl.source, "c", em))
        else:
            panes.append((f"{b}-kernels", f"{b}: kernels ({kernels})", em.kernels or "", "python", em))
            panes.append((f"{b}-driver", f"{b}: driver (launches the kernels)", em.source, "python", em))
    return panes


def _aot_html(emitted, arch: int) -> str:
    from .backends import triton as triton_backend
    try:
        _, compiled = triton_backend.compile_cell(emitted, arch)
    except RecError as err:
        return f'<p class="cannot">ahead-of-time compile for sm_{arch} failed: {html.escape(err.message)}</p>'
    rows = "".join(f"<tr><td><code>{html.escape(c.name)}</code></td><td>sm_{c.arch}</td><td>{c.registers}</td>"
                   f"<td>{c.spill_stores}/{c.spill_loads}</td><td>{c.shared}</td><td>{c.num_warps}</td></tr>"
                   for c in compiled)
    return (f'<table class="aot"><tr><th>kernel</th><th>arch</th><th>registers</th><th>spills st/ld (B)</th>'
            f"<th>shared (B)</th><th>warps</th></tr>{rows}</table>")


# ----------------------------------------------------------------------------- the page
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{padding:10px 16px;background:#20232a;color:#eee}header h1{margin:0;font-size:18px}
header p{margin:2px 0 0;color:#bbb;font-size:12px}
.layout{display:flex;align-items:flex-start;gap:12px;padding:12px}
.left{position:sticky;top:8px;flex:0 0 36%;max-width:36%}
.right{flex:1;min-width:0}
.pane{background:#fff;border:1px solid #ddd;border-radius:4px;margin-bottom:12px;min-width:0}
.pane h3{margin:0;padding:6px 10px;font-size:13px;background:#f0f0f3;border-bottom:1px solid #ddd}
.scroll{position:relative;overflow:auto;max-height:70vh;font:12px/1.45 ui-monospace,Menlo,Consolas,monospace}
.left .scroll{max-height:calc(100vh - 60px)}
.panes{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
/* child selectors below: a pygments Name token is a span of class "n" too */
.l{display:flex;white-space:pre;cursor:default}.l[data-rec]{cursor:pointer}
.l>.n{flex:0 0 3.2em;text-align:right;padding-right:8px;color:#999;user-select:none;text-decoration:none}
.l>.r,.l>.r0{flex:0 0 auto;min-width:2.2em;margin-right:6px;color:#6a5acd;text-decoration:none;font-size:11px}
.l>.r+.r{min-width:0;margin-left:-4px}
.l>.t{flex:1}
.l:hover{background:#f3f6ff}.l.hit{background:#fff3b0}.l.hit>.n{color:#b8860b;font-weight:bold}
.cell{margin-bottom:24px}.cell>h2{font-size:16px;margin:4px 0 8px}
.plan{background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px 12px;margin-bottom:12px}
.plan h4{margin:10px 0 4px}.plan h5{margin:8px 0 2px;font-size:13px}
table{border-collapse:collapse;font-size:12px;margin:2px 0}td,th{border:1px solid #e3e3e3;padding:3px 6px;
vertical-align:top;text-align:left}th{background:#f6f6f8}
.cls{background:#e7f0ff;border-radius:3px;padding:0 4px;white-space:nowrap}
.rej{color:#8a4b00}.cannot,.warn{color:#a40000}.flags{margin:0;color:#555}
a.go{color:#6a5acd}
pre{white-space:pre-wrap;font-size:12px}
"""

JS = """
(function(){
  function mark(nums, from){
    document.querySelectorAll('.l.hit').forEach(function(e){e.classList.remove('hit');});
    var hits = [];
    nums.forEach(function(n){
      document.querySelectorAll('.l[data-rec~="'+n+'"]').forEach(function(e){e.classList.add('hit');hits.push(e);});
    });
    document.querySelectorAll('.scroll').forEach(function(p){
      if (p.contains(from)) return;
      var f = p.querySelector('.l.hit');
      if (f) p.scrollTop = f.offsetTop - p.clientHeight / 3;
    });
    return hits;
  }
  document.addEventListener('click', function(ev){
    var go = ev.target.closest('a.go, a.r, a.n');
    if (go) { ev.preventDefault(); var n = go.getAttribute('href').replace('#rec-L','');
      mark([n], null);
      try { history.replaceState(null, '', '#rec-L'+n); } catch (e) {}  /* file:// pages may refuse */
      return; }
    var l = ev.target.closest('.l[data-rec]');
    if (l) { mark(l.getAttribute('data-rec').split(' '), l); }
  });
  var m = /^#rec-L(\\d+)$/.exec(location.hash);
  if (m) mark([m[1]], null);
})();
"""


def page(specs, given: dict, aot: bool = False, arch: int = 90) -> str:
    """The page for every cell of one file (`specs`: recdsl.spec.load_all's result)."""
    from . import __version__
    from .torch_expr import SourceNotes
    first = specs[0]
    irs = []
    for s in specs:
        mine = {k: v for k, v in given.items() if k in s.cell.dims or k in s.cell.hypers}
        irs.append((s, s.lower(**s.analysis_dims(**mine)), mine))
    pg = Page(first.source_text, first.filename, SourceNotes(irs[0][1]).file)
    e = html.escape
    cells = []
    for s, ir, mine in irs:
        trace: dict = {}
        plan = s.plan(trace, **mine)
        dims = ", ".join(f"{k}={v}" for k, v in ir.dims.items())
        panes = []
        for key, title, code, lang, em in _generated(ir, plan):
            if lang is None:
                panes.append(f'<section class="pane gen" id="pane-{key}"><h3>{e(title)}</h3>'
                             f'<p class="cannot" style="padding:0 10px">{pg.linkify(code)}</p></section>')
                continue
            lexer = CLexer(stripnl=False, ensurenl=True) if lang == "c" else PythonLexer(stripnl=False, ensurenl=True)
            extra = ""
            if aot and key.endswith("-kernels"):
                extra = f"<div style='padding:4px 10px'>{_aot_html(em, arch)}</div>"
            panes.append(f'<section class="pane gen" id="pane-{key}"><h3>{e(title)}</h3>{extra}'
                         f'<div class="scroll code">{pg.code_pane(f"{s.name}-{key}", code, lexer)}</div></section>')
        cells.append(f'<section class="cell" id="cell-{e(s.name)}"><h2>cell {e(s.name)} ({e(dims)})</h2>'
                     f'<div class="plan">{_plan_html(pg, plan, trace)}</div>'
                     f'<div class="panes">{"".join(panes)}</div></section>')
    style = HtmlFormatter(style="default").get_style_defs(".code")
    name = first.filename.rsplit("/", 1)[-1]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>recdsl inspect: {e(', '.join(s.name for s in specs))} ({e(name)})</title>
<style>{CSS}
{style}</style></head>
<body>
<header><h1>recdsl inspect: {e(', '.join(s.name for s in specs))}</h1>
<p>{e(first.filename)} &middot; recdsl {e(__version__)} &middot; click a line to see where it went (or came from)
{" &middot; Triton kernels compiled ahead of time for sm_" + str(arch) if aot else ""}</p></header>
<div class="layout">
<div class="left"><section class="pane" id="pane-rec"><h3>{e(name)}</h3>
<div class="scroll code">{pg.rec_pane()}</div></section></div>
<div class="right">{"".join(cells)}</div>
</div>
<script>{JS}</script>
</body></html>
"""
