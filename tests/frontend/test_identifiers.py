"""Identifiers reach generated Python code, so Python keywords and dunder names are refused
everywhere a name is introduced; docstrings and comments are text, never evaluated."""
from __future__ import annotations

import builtins
import contextlib

import pytest

from recdsl import RecError, parse_and_check
from recdsl.parser import parse
from recdsl.printer import to_source

# A cell with one slot, {N}, for a name in each position where the user introduces one.
POSITIONS = {
    "cell": "cell {N}(D):\n    input x[D]\n    output x\n",
    "dim": "cell A({N}):\n    input x[{N}]\n    output x\n",
    "hyper": "cell A(D, {N}=2):\n    input x[D]\n    output x\n",
    "input": "cell A(D):\n    input {N}[D]\n    output y = {N} * 2\n",
    "param": "cell A(D):\n    param {N}[D] = 0\n    input x[D]\n    output y = {N} * x\n",
    "state": "cell A(D):\n    input x[D]\n    state {N}[D] = 0\n    {N}' = {N} + x\n    output y = {N}'\n",
    "edge": "cell A(D):\n    over dag\n    input x[D]\n    edge {N}[]\n    output x\n",
    "pair": "cell A(D):\n    over dag\n    input x[D]\n    pair {N}[]\n    output x\n",
    "local": "cell A(D):\n    input x[D]\n    {N} = 2 * x\n    output y = {N}\n",
    "unpacked local": "cell A(D):\n    input x[2*D]\n    a, {N} = split(x, 2)\n    output y = a\n",
    "output": "cell A(D):\n    input x[D]\n    output {N} = 2 * x\n",
    "loop var": "cell A(D):\n    input x[2, D]\n    a = x[0]\n    for {N} in range(2):\n        a = a + x[{N}]\n"
                "    output a\n",
}
CONTROL = "ok_name"

PYTHON_KEYWORDS = ["class", "lambda", "def", "import", "return", "yield", "not", "and", "while", "del", "True"]
DUNDERS = ["__import__", "__class__", "__builtins__", "__init__"]


@pytest.mark.parametrize("position", POSITIONS)
def test_control_name_is_accepted(position):
    # The templates are valid with an ordinary name, so a rejection below is about the name.
    parse_and_check(POSITIONS[position].replace("{N}", CONTROL if position != "cell" else "OkCell"), "t.rec")


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("name", PYTHON_KEYWORDS)
def test_python_keywords_are_rejected(position, name):
    src = POSITIONS[position].replace("{N}", name)
    with pytest.raises(RecError) as info:
        parse_and_check(src, "t.rec")
    err = info.value
    assert err.span is not None and err.span.file == "t.rec"
    assert name in str(err)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("name", DUNDERS)
def test_dunder_names_are_rejected(position, name):
    src = POSITIONS[position].replace("{N}", name)
    with pytest.raises(RecError) as info:
        parse_and_check(src, "t.rec")
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["class", "lambda", "def", "import"])
def test_keyword_message_names_the_problem(name):
    with pytest.raises(RecError) as info:
        parse_and_check(POSITIONS["local"].replace("{N}", name), "t.rec")
    err = info.value
    assert err.message == f"'{name}' is a Python keyword and cannot name a value"
    assert (err.line, err.col) == (3, 5)
    assert err.hint == f"choose another name, e.g. {name}_"


@pytest.mark.parametrize("position, expected_col", [("cell", 6), ("input", 11), ("output", 12), ("loop var", 9)])
def test_keyword_error_points_at_the_name(position, expected_col):
    src = POSITIONS[position].replace("{N}", "lambda")
    with pytest.raises(RecError) as info:
        parse_and_check(src, "t.rec")
    sp = info.value.span
    assert sp.col == expected_col
    assert sp.source.line(sp.line)[sp.col - 1:sp.end_col - 1] == "lambda"


@pytest.mark.parametrize("src", [
    "cell A(D):\n    input x[D]\n    output y = x.__class__\n",
    "cell A(D):\n    input x[D]\n    output y = __import__(x)\n",
    "cell A(D):\n    input x[D]\n    output y = sum(x, __class__=0)\n",
    "cell A(D):\n    over __class__\n    input x[D]\n    output x\n",
    "cell A(D):\n    param w[D] ~ __import__(0, 1)\n    input x[D]\n    output y = w * x\n",
    "cell A(D):\n    input x[D]\n    for j in __import__(2):\n        a = x\n    output x\n",
    "cell A(D):\n    input x[D]\n    output y = __builtins__\n",
])
def test_dunders_elsewhere_are_rejected(src):
    with pytest.raises(RecError):
        parse_and_check(src, "t.rec")


# --------------------------------------------------------------------------- text is text

TEXTS = [
    'He said "hi" and left',
    "it's a prime ' and a \\ backslash and \\n and \\\"\\\"\\\"",
    "__import__('os').system('rm -rf /')",
    "eval(compile('1/0', 's', 'exec')); exec('raise SystemExit')",
    '""quoted start',
    "quoted end\"\"",
    "f'{__import__(\"os\").getcwd()}'",
    "# not a comment, {braces} and %s %(x)s",
    "λ → ∑ unicode is fine here",
    "",
]


@contextlib.contextmanager
def refusing_eval():
    """Within the block, anything that would run text as Python (eval, exec, compile) fails and
    is recorded. Restored before assertions, so that pytest can report failures."""
    calls: list = []
    saved = {n: getattr(builtins, n) for n in ("eval", "exec", "compile")}

    def refuse(name):
        def f(*args, **kwargs):
            calls.append((name, args[:1]))
            raise AssertionError(f"{name} called on {args[:1]!r}")
        return f
    for n in saved:
        setattr(builtins, n, refuse(n))
    try:
        yield calls
    finally:
        for n, f in saved.items():
            setattr(builtins, n, f)


def _frontend(src: str):
    """Parse, check, summarise and print back, with evaluation refused."""
    with refusing_eval() as calls:
        cells = parse_and_check(src, "t.rec")
        summaries = [c.summary() for c in cells]
        printed = to_source(parse(src))
    assert calls == []
    return cells, summaries, printed


@pytest.mark.parametrize("text", TEXTS)
def test_docstrings_are_text_never_evaluated(text):
    # A docstring ending in a quote needs a space before the closing quotes.
    closing = ' """' if text.endswith('"') else '"""'
    src = f'cell A(D):\n    """{text}{closing}\n    input x[D]\n    output x\n'
    (cell,), (summary,), printed = _frontend(src)
    assert cell.doc == text.strip()
    assert summary.startswith("cell A")
    assert parse(printed) == parse(src)


@pytest.mark.parametrize("text", TEXTS + ['"""', '""" not a docstring """', "'''"])
def test_comments_are_text_never_evaluated(text):
    src = f"# {text}\ncell A(D):  # {text}\n    # {text}\n    input x[D]  # {text}\n    output x # {text}\n# {text}"
    (cell,), _, printed = _frontend(src)
    assert cell.doc is None
    assert list(cell.inputs) == ["x"] and [o.name for o in cell.outputs] == ["x"]
    assert printed == "cell A(D):\n    input  x[D]\n    output x\n"


def test_multiline_docstring_with_python_code():
    src = ('cell A(D):\n    """Example:\n\n        import os; os.system("echo pwned")\n        def f(): return 1\n'
           '    """\n    input x[D]\n    output x\n')
    (cell,), _, _ = _frontend(src)
    assert cell.doc == 'Example:\n\nimport os; os.system("echo pwned")\ndef f(): return 1'


def test_strings_outside_docstrings_are_rejected():
    for src in ["cell A(D):\n    input x[D]\n    output y = 'os'\n",
                'cell A(D):\n    input x[D]\n    output y = "os"\n',
                'cell A(D):\n    input x[D]\n    """late docstring"""\n    output x\n']:
        with pytest.raises(RecError):
            parse_and_check(src, "t.rec")


def test_the_eval_guard_works():
    with refusing_eval() as calls:
        with pytest.raises(AssertionError):
            eval("1")
    assert calls == [("eval", ("1",))]
    assert eval("1") == 1


def test_a_file_name_cannot_break_out_of_generated_comments(tmp_path):
    """Generated code carries `# file:line` comments; a hostile file name stays a comment."""
    import ast as pyast

    import recdsl
    from recdsl.backends import reference
    from recdsl.pipeline import emit_cell
    name = "evil\nimport os; os.system('echo pwned')\n.rec"
    path = tmp_path / name
    path.write_text("cell E(H):\n    input x[H]\n    state h[H] = 0\n    h' = h + x\n    output h'\n")
    spec = recdsl.load(path)
    ir = spec.lower(H=2)
    for code in (reference.emit_step(ir), emit_cell(ir, "torch").source):
        tree = pyast.parse(code)
        assert not any(isinstance(n, (pyast.Import, pyast.ImportFrom)) for n in pyast.walk(tree))
        assert "os.system" not in "".join(ln.split("#")[0] for ln in code.splitlines())
