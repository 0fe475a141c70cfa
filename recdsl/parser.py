"""Text -> AST. lark (LALR, contextual lexer) parses with grammar/rec.lark; this module
turns lark's tree into recdsl.ast nodes with spans, and lark's exceptions into RecError."""
from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.indenter import Indenter

from . import ast as A
from .errors import RecError, Source, Span

GRAMMAR_FILE = Path(__file__).resolve().parent / "grammar" / "rec.lark"

# Human names for terminals, used in "expected ..." messages.
TOKEN_NAMES = {
    "NAME": "a name", "PRIMED": "a primed name (s')", "NUMBER": "a number", "_NL": "end of line",
    "_INDENT": "an indented block", "_DEDENT": "end of block", "LPAR": "'('", "RPAR": "')'",
    "LSQB": "'['", "RSQB": "']'", "COLON": "':'", "COMMA": "','", "EQUAL": "'='", "SEMICOLON": "';'",
    "DOT": "'.'", "TILDE": "'~'", "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/' or '@'", "POW": "'**'",
    "COMP_OP": "a comparison", "DOCSTRING": "a docstring", "EDGE": "'edge'", "HEADS": "'heads'",
    "OVER": "'over'", "$END": "end of file",
}


def _grammar_text() -> str:
    if GRAMMAR_FILE.exists():
        return GRAMMAR_FILE.read_text()
    # Running from a source checkout: the grammar lives at the top level (grammar/).
    return (Path(__file__).resolve().parent.parent / "grammar" / "rec.lark").read_text()


class RecIndenter(Indenter):
    """lark's Indenter, but a bad dedent is a located RecError instead of a bare exception."""
    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR", "LSQB"]
    CLOSE_PAREN_types = ["RPAR", "RSQB"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8
    source: Source | None = None

    def handle_NL(self, token):
        if self.paren_level > 0:
            return
        yield token
        indent_str = token.rsplit("\n", 1)[1]
        indent = indent_str.count(" ") + indent_str.count("\t") * self.tab_len
        if indent > self.indent_level[-1]:
            self.indent_level.append(indent)
            yield Token.new_borrow_pos(self.INDENT_type, indent_str, token)
        else:
            while indent < self.indent_level[-1]:
                self.indent_level.pop()
                yield Token.new_borrow_pos(self.DEDENT_type, indent_str, token)
            if indent != self.indent_level[-1]:
                line = token.end_line
                raise RecError(
                    f"this line is indented to column {indent + 1}, which matches no enclosing block",
                    Span(line, 1, line, indent + 1, self.source),
                    hint=f"indent it like the lines around it (column {self.indent_level[-1] + 1})")


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(_grammar_text(), parser="lalr", lexer="contextual", propagate_positions=True,
                maybe_placeholders=True, postlex=RecIndenter(), cache=False)


def parse(text: str, filename: str = "<string>") -> A.Module:
    """Parse .rec source into an AST. Raises RecError on any syntax error."""
    source = Source(filename, text)
    if not text.endswith("\n"):
        text += "\n"
    parser = _lark()
    parser.options.postlex.source = source
    try:
        tree = parser.parse(text)
    except RecError:
        raise
    except UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    return _Builder(source).build(tree)


def _syntax_error(e: UnexpectedInput, source: Source) -> RecError:
    line, col = max(getattr(e, "line", 1) or 1, 1), max(getattr(e, "column", 1) or 1, 1)
    if isinstance(e, UnexpectedCharacters):
        ch = source.text[e.pos_in_stream] if e.pos_in_stream < len(source.text) else "?"
        span = Span(line, col, line, col + 1, source)
        if ch == '"':
            return RecError("unexpected '\"'", span,
                            hint='the only string is a docstring: """text""" right under the cell line')
        if ch == "'":
            return RecError("a prime (') must directly follow a state name", span,
                            hint="write s' = ... with no space between the name and the prime")
        if not ch.isascii():
            return RecError(f"unexpected character {ch!r} (U+{ord(ch):04X})", span,
                            hint="names are ASCII letters, digits and _; operators are + - * / @ **")
        return RecError(f"unexpected character {ch!r}", span, hint=_expected_hint(e.allowed))
    if isinstance(e, UnexpectedEOF):
        last = len(source.text.splitlines()) or 1
        return RecError("unexpected end of file", Span(last, 1, last, 2, source),
                        hint=_expected_hint(e.expected))
    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            last = len(source.text.rstrip("\n").splitlines()) or 1
            return RecError("unexpected end of file", Span(last, 1, last, 2, source),
                            hint=_unclosed_hint(e) or _expected_hint(e.expected))
        span = Span(tok.line, tok.column, tok.end_line or tok.line,
                    tok.end_column or tok.column + max(len(tok), 1), source)
        return RecError(_describe(tok, e), span, hint=_token_hint(tok, e, source))
    return RecError(str(e).splitlines()[0], Span(line, col, line, col + 1, source))


def _describe(tok: Token, e: UnexpectedToken) -> str:
    if tok.type == "_INDENT":
        return "unexpected indent"
    if tok.type == "_DEDENT":
        return "unexpected end of block"
    if tok.type == "_NL":
        return "unexpected end of line"
    return f"unexpected {tok.value!r}"


def _expected_hint(expected) -> str | None:
    names = sorted({TOKEN_NAMES.get(t, repr(_literal(t))) for t in expected or ()})
    if not names:
        return None
    if len(names) > 6:
        names = names[:6] + ["..."]
    return "expected " + ", ".join(names)


def _literal(terminal: str) -> str:
    """Anonymous terminals are named by lark (e.g. 'CELL', 'RPAR'); show their text."""
    try:
        t = _lark().get_terminal(terminal)
        return t.pattern.value if t.pattern.type == "str" else terminal
    except Exception:
        return terminal


def _unclosed_hint(e: UnexpectedToken) -> str | None:
    if "RPAR" in e.expected:
        return "a '(' is not closed"
    if "RSQB" in e.expected:
        return "a '[' is not closed"
    return None


def _token_hint(tok: Token, e: UnexpectedToken, source: Source) -> str | None:
    expected = set(e.expected)
    prev = getattr(e, "token_history", None)
    prev = prev[-1] if prev else None
    if prev is not None and prev.type == "NUMBER" and prev.end_pos == tok.start_pos \
            and tok.type in ("NAME", "NUMBER", "DOT"):
        return f"{prev.value + tok.value!r} is not a number; write 2*x for a product, 1.5e-3 for a float"
    if tok.type == "_INDENT":
        return "only the lines of a cell or a for body are indented, all by the same amount"
    if tok.type == "_NL" and ("RPAR" in expected or "RSQB" in expected):
        return _unclosed_hint(e)
    if tok.type == "_NL" and "COLON" in expected:
        return "a cell or for line ends with ':'"
    if tok.type == "EQUAL" and prev is not None and prev.type == "EQUAL":
        return "comparison is '=='"
    if tok.type == "NAME" and "_NL" in expected and prev is not None:
        return "two expressions in a row: is an operator or a ',' missing?"
    if tok.type == "NAME":
        keywords = ["cell", "input", "param", "state", "edge", "pair", "output", "heads", "over", "for"]
        close = difflib.get_close_matches(tok.value, keywords, n=1, cutoff=0.75)
        if close and close[0] != tok.value:
            return f"did you mean '{close[0]}'?"
    if tok.type == "RPAR" and "RPAR" not in expected:
        return "this ')' closes nothing"
    if tok.type == "RSQB" and "RSQB" not in expected:
        return "this ']' closes nothing"
    return _expected_hint(expected)


class _Builder:
    """lark Tree -> recdsl.ast, attaching a Span to every node."""

    def __init__(self, source: Source):
        self.source = source

    def span(self, item) -> Span:
        if isinstance(item, Token):
            return Span(item.line, item.column, item.end_line, item.end_column, self.source)
        m = item.meta
        if getattr(m, "empty", True):
            return Span(1, 1, 1, 1, self.source)
        return Span(m.line, m.column, m.end_line, m.end_column, self.source)

    def build(self, tree: Tree) -> A.Module:
        cells = [self.cell(c) for c in tree.children if isinstance(c, Tree)]
        return A.Module(cells, span=self.span(tree))

    # --- structure ---
    def cell(self, t: Tree) -> A.Cell:
        name, args, doc, *items = t.children
        arglist = [] if args is None else [
            A.CellArg(str(a.children[0]), self.expr(a.children[1]) if a.children[1] is not None else None,
                      span=self.span(a)) for a in args.children]
        docstring = None if doc is None else _docstring_text(str(doc.children[0]))
        out = []
        for item in items:
            out.extend(self.item(item))
        return A.Cell(str(name), arglist, docstring, out, span=self.span(t))

    def item(self, t: Tree) -> list:
        kind = t.data
        if kind == "clause":
            kw, value = t.children
            if kw.type == "HEADS":
                return [A.Heads(self.expr(value), span=self.span(t))]
            return [A.Over(str(value), span=self.span(t))]
        if kind == "decl":
            kind_tree, *vars_ = t.children
            return [A.Decl(str(kind_tree.children[0]), [self.decl_var(v) for v in vars_], span=self.span(t))]
        if kind == "simple_line":
            return [self.small_stmt(s) for s in t.children]
        if kind == "for_stmt":
            var, func, args, *body = t.children
            stmts = []
            for b in body:
                stmts.extend(self.item(b))
            return [A.For(str(var), str(func), self.args(args)[0], stmts, span=self.span(t))]
        raise AssertionError(kind)

    def decl_var(self, t: Tree) -> A.DeclVar:
        name, shape, on_edge, init = t.children
        dims = [] if shape is None else [self.expr(e) for e in shape.children]
        node = None
        if init is not None:
            if init.data == "random_init":
                dist, args = init.children
                pos, kw = self.args(args)
                node = A.RandomInit(str(dist), pos + kw, span=self.span(init))
            else:
                node = A.ValueInit(self.expr(init.children[0]), span=self.span(init))
        return A.DeclVar(str(name), dims, on_edge is not None, node, span=self.span(t))

    def small_stmt(self, t: Tree):
        if t.data == "assign":
            *targets, value = t.children
            return A.Assign([self.target(x) for x in targets], self.expr(value), span=self.span(t))
        name, value = t.children
        return A.Output(None if name is None else str(name), self.expr(value), span=self.span(t))

    def target(self, tok: Token):
        cls = A.Primed if tok.type == "PRIMED" else A.Name
        return cls(tok.value.rstrip("'"), span=self.span(tok))

    def args(self, t: Tree | None) -> tuple[list, list]:
        pos, kw = [], []
        for a in ([] if t is None else t.children):
            if isinstance(a, Tree) and a.data == "kwarg":
                kw.append(A.Keyword(str(a.children[0]), self.expr(a.children[1]), span=self.span(a)))
            else:
                pos.append(self.expr(a))
        return pos, kw

    # --- expressions ---
    def expr(self, t) -> A.Expr:
        sp = self.span(t)
        if isinstance(t, Token):  # only reached through ?-inlined single tokens
            raise AssertionError(f"bare token {t.type}")
        k, c = t.data, t.children
        if k == "name":
            return A.Name(str(c[0]), span=sp)
        if k == "primed":
            return A.Primed(c[0].value.rstrip("'"), span=sp)
        if k == "number":
            return A.Num(_number(c[0].value), c[0].value, span=sp)
        if k == "none":
            return A.NoneLit(span=sp)
        if k == "binop":
            return A.BinOp(str(c[1]), self.expr(c[0]), self.expr(c[2]), span=sp)
        if k == "compare":
            return A.Compare(str(c[1]), self.expr(c[0]), self.expr(c[2]), span=sp)
        if k == "unary":
            return A.UnaryOp(str(c[0]), self.expr(c[1]), span=sp)
        if k == "call":
            pos, kw = self.args(c[1])
            return A.Call(str(c[0]), pos, kw, span=sp)
        if k == "index":
            subs = [self.subscript(s) for s in c[1].children]
            return A.Index(self.expr(c[0]), subs, span=sp)
        if k == "attr":
            return A.Attr(self.expr(c[0]), str(c[1]), span=sp)
        if k == "list":
            items = [] if c[0] is None else [self.expr(e) for e in c[0].children]
            return A.ListExpr(items, span=sp)
        raise AssertionError(k)

    def subscript(self, t):
        if isinstance(t, Tree) and t.data == "slice":
            lo, hi = t.children
            return A.Slice(None if lo is None else self.expr(lo), None if hi is None else self.expr(hi),
                           span=self.span(t))
        return self.expr(t)


def _number(text: str) -> int | float:
    if all(ch.isdigit() for ch in text):
        return int(text)
    return float(text)


def _docstring_text(raw: str) -> str:
    body = raw[3:-3]
    lines = body.splitlines()
    if len(lines) > 1:  # strip the common indentation of continuation lines
        rest = [ln for ln in lines[1:] if ln.strip()]
        cut = min((len(ln) - len(ln.lstrip()) for ln in rest), default=0)
        lines = [lines[0]] + [ln[cut:] for ln in lines[1:]]
    return "\n".join(lines).strip()
