"""Text -> AST. lark (LALR, contextual lexer) parses with grammar/rec.lark; this module
turns lark's tree into recdsl.ast nodes with spans, and lark's exceptions into RecError."""
from __future__ import annotations

import difflib
import re
import threading
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.indenter import Indenter

from . import ast as A
from .ast_lock import AST_LOCK
from .errors import RecError, Source, Span

GRAMMAR_FILE = Path(__file__).resolve().parent / "grammar" / "rec.lark"

# Human names for terminals, used in "expected ..." messages.
TOKEN_NAMES = {
    "NAME": "a name", "PRIMED": "a primed name (s')", "NUMBER": "a number", "_NL": "end of line",
    "_INDENT": "an indented block", "_DEDENT": "end of block", "LPAR": "'('", "RPAR": "')'",
    "LSQB": "'['", "RSQB": "']'", "COLON": "':'", "COMMA": "','", "EQUAL": "'='", "SEMICOLON": "';'",
    "DOT": "'.'", "TILDE": "'~'", "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/' or '@'", "POW": "'**'",
    "COMP_OP": "a comparison", "DOCSTRING": "a docstring", "EDGE": "'edge'", "HEADS": "'heads'",
    "OVER": "'over'", "WHERE": "'where'", "COMPLEX": "'complex'", "IMAG": "an imaginary number (1j)",
    "$END": "end of file",
}


def _grammar_text() -> str:
    if GRAMMAR_FILE.exists():
        return GRAMMAR_FILE.read_text()
    # Running from a source checkout: the grammar lives at the top level (grammar/).
    return (Path(__file__).resolve().parent.parent / "grammar" / "rec.lark").read_text()


TAB_NOTE = "; a tab counts as 8 spaces, so indent with spaces only"


class RecIndenter(Indenter):
    """lark's Indenter, but a bad dedent is a located RecError instead of a bare exception,
    and the open brackets are remembered (for "'(' is never closed")."""
    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR", "LSQB"]
    CLOSE_PAREN_types = ["RPAR", "RSQB"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8
    source: Source | None = None

    def __init__(self) -> None:
        super().__init__()
        self.brackets: list[Token] = []

    def process(self, stream):
        self.brackets = []
        self.indent_chars: tuple[str, int] | None = None  # the first indented line's character, and its line
        return super().process(stream)

    def _process(self, stream):
        # lark's Indenter._process, keeping the open bracket tokens instead of a bare count.
        token = None
        for token in stream:
            if token.type == self.NL_type:
                yield from self.handle_NL(token)
            else:
                yield token
            if token.type in self.OPEN_PAREN_types:
                self.brackets.append(token)
            elif token.type in self.CLOSE_PAREN_types and self.brackets:
                self.brackets.pop()
            self.paren_level = len(self.brackets)
        while len(self.indent_level) > 1:
            self.indent_level.pop()
            yield Token.new_borrow_pos(self.DEDENT_type, "", token) if token else \
                Token(self.DEDENT_type, "", 0, 1, 1, 1, 1, 0)

    def handle_NL(self, token):
        if self.paren_level > 0:
            return
        yield token
        indent_str = token.rsplit("\n", 1)[1]
        self._check_consistent(indent_str, token.end_line)
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
                    Span(line, 1, line, len(indent_str) + 1, self.source),
                    hint=f"indent it like the lines around it (column {self.indent_level[-1] + 1})"
                    + (TAB_NOTE if "\t" in indent_str else ""))


    def _check_consistent(self, indent_str: str, line: int) -> None:
        """Like Python's TabError: a file indents with spaces or with tabs, never both, since the
        width of a tab is a matter of the editor and mixing them reads differently to the user."""
        if not indent_str:
            return
        chars = set(indent_str)
        if len(chars) == 1 and self.indent_chars is None:
            self.indent_chars = (indent_str[0], line)
            return
        first = self.indent_chars
        if len(chars) > 1 or (first and first[0] not in chars):
            name = {" ": "spaces", "\t": "tabs"}
            what = ("this line mixes tabs and spaces in its indentation" if len(chars) > 1 else
                    f"this line indents with {name[indent_str[0]]}, but line {first[1]} indents with {name[first[0]]}")
            raise RecError(what,
                           Span(line, 1, line, len(indent_str) + 1, self.source),
                           hint="indent every line of the file the same way: with spaces (or with tabs), never both")


_per_thread = threading.local()


def _lark() -> Lark:
    """One parser per thread: the indenter keeps the state of the parse it is running (the
    indentation stack, the open brackets, the source), so threads must not share it."""
    parser = getattr(_per_thread, "parser", None)
    if parser is None:
        parser = _per_thread.parser = _new_lark()
    return parser


def _new_lark() -> Lark:
    with AST_LOCK:   # lark compiles the grammar's literals with ast.literal_eval
        return Lark(_grammar_text(), parser="lalr", lexer="contextual", propagate_positions=True,
                    maybe_placeholders=True, postlex=RecIndenter(), cache=False)


# Deeper expression (or for) nesting than this is refused with a RecError: the builder, the
# checker and the printer recurse over the tree, and no cell needs a tenth of it.
MAX_DEPTH = 200


def parse(text: str, filename: str = "<string>") -> A.Module:
    """Parse .rec source into an AST. Raises RecError on any syntax error."""
    source = Source(filename, text)
    if not text.endswith("\n"):
        text += "\n"
    parser = _lark()
    indenter = parser.options.postlex
    indenter.source = source
    try:
        tree = parser.parse(text)
    except RecError:
        raise
    except UnexpectedInput as e:
        raise _syntax_error(e, source, list(indenter.brackets)) from None
    _check_depth(tree, source)
    return _Builder(source).build(tree)


def _check_depth(tree: Tree, source: Source) -> None:
    """Refuse absurdly deep nesting before anything recurses over the tree (iteratively).
    The error points at the statement that holds the deep expression."""
    stack = [(tree, 1, tree)]
    while stack:
        t, depth, anchor = stack.pop()
        if t.data in ("assign", "output", "decl", "clause", "for_stmt", "cell_arg"):
            anchor = t
        if depth > MAX_DEPTH:
            m = anchor.meta
            line, col = (m.line, m.column) if not getattr(m, "empty", True) else (1, 1)
            end = m.end_column if not getattr(m, "empty", True) and m.end_line == line else col + 1
            raise RecError(f"an expression here is nested more than {MAX_DEPTH} levels deep",
                           Span(line, col, line, end, source),
                           hint="split it into several named values: a = ...; b = ...")
        stack.extend((c, depth + 1, anchor) for c in t.children if isinstance(c, Tree))


# --------------------------------------------------------------------------- syntax errors

STATEMENT_WORDS = ["cell", "input", "param", "state", "edge", "pair", "output", "heads", "over", "for"]
NOT_IN_LANGUAGE = {
    "if": "there is no 'if'; select values with where(mask, a, b)",
    "elif": "there is no 'if'; select values with where(mask, a, b)",
    "else": "there is no 'if'; select values with where(mask, a, b)",
    "while": "there is no 'while'; a loop is `for j in range(n):` with n a dimension or a literal",
    "def": "there are no functions to define; write the expression inline or name it with `name = expr`",
    "return": "a cell returns its outputs: `output y = expr`",
    "import": "there is nothing to import; the builtin functions are always available",
    "from": "there is nothing to import; the builtin functions are always available",
    "print": "there is no print; `recdsl inspect` shows what a cell computes",
}
OPENERS = {"(": ")", "[": "]"}
EXPR_START = {"NAME", "PRIMED", "NUMBER", "IMAG", "LPAR", "LSQB", "ADD_OP", "NONE"}
OPERATORS = {"ADD_OP", "MUL_OP", "POW", "COMP_OP"}
WORD_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.")


def _syntax_error(e: UnexpectedInput, source: Source, brackets: list[Token]) -> RecError:
    line, col = max(getattr(e, "line", 1) or 1, 1), max(getattr(e, "column", 1) or 1, 1)
    if isinstance(e, UnexpectedCharacters):
        return _bad_character(e, source, line, col)
    if isinstance(e, UnexpectedEOF):  # pragma: no cover - LALR reports the end as a $END token
        last = source.text.count("\n") or 1
        return RecError("unexpected end of file", Span(last, 1, last, 2, source),
                        hint=_expected_hint(_expected(e)))
    if isinstance(e, UnexpectedToken):
        return _bad_token(e, source, brackets)
    return RecError(str(e).splitlines()[0], Span(line, col, line, col + 1, source))  # pragma: no cover


def _bad_character(e: UnexpectedCharacters, source: Source, line: int, col: int) -> RecError:
    text = source.text
    pos = e.pos_in_stream
    ch = text[pos] if pos < len(text) else "?"
    span = Span(line, col, line, col + 1, source)
    if text.startswith('"""', pos) and '"""' not in text[pos + 3:]:
        return RecError("this docstring is never closed", Span(line, col, line, col + 3, source),
                        hint='end it with """ (a docstring may span several lines)')
    if ch == '"':
        return RecError("unexpected '\"'", span,
                        hint='the only string is a docstring: """text""" right under the cell line')
    if ch == "'":
        return RecError("a prime (') must directly follow a state name", span,
                        hint="write s' = ... with no space between the name and the prime")
    if ch == "\r":
        return RecError("a carriage return (\\r) that does not end a line", span,
                        hint="save the file with \\n (or \\r\\n) line endings")
    if not ch.isascii() or not ch.isprintable():
        if ch.isprintable():
            return RecError(f"unexpected character {ch!r} (U+{ord(ch):04X})", span,
                            hint="names are ASCII letters, digits and _; operators are + - * / @ **")
        return RecError(f"unexpected control character U+{ord(ch):04X}", span,
                        hint="remove it (the file should be plain text)")
    if ch == "\\":
        return RecError("a '\\' continues a line only at its very end", span,
                        hint="inside ( ) or [ ] a line may simply be broken, without '\\'")
    number = _bad_number(source, pos, pos + 1)
    if number is not None:
        return number
    return RecError(f"unexpected character {ch!r}", span,
                    hint="operators are + - * / @ ** and the comparisons < <= > >= == !=; comments start with #")


def _expected(e: UnexpectedInput) -> set[str]:
    """The terminals the parser could take here, read from the LALR table. (lark's own
    `expected` is the contextual lexer's set when the lexer refused the token, which always
    includes end of line.)"""
    state = getattr(e, "state", None)
    try:
        actions = state.parse_conf.parse_table.states[state.position]
        terminals = {t.name for t in _lark().terminals} | {"_INDENT", "_DEDENT", "$END"}
        return {k for k in actions if k in terminals}
    except Exception:
        return set(getattr(e, "expected", None) or ())


def _previous_token(e: UnexpectedToken) -> Token | None:
    """The token before the offending one: lark's history, else the last token on the parser's
    value stack."""
    history = getattr(e, "token_history", None)
    if history and history[-1] is not None:
        return history[-1]
    try:
        item = e.state.value_stack[-1]
    except Exception:
        return None
    while isinstance(item, Tree):
        kids = [c for c in item.children if c is not None]
        if not kids:
            return None
        item = kids[-1]
    return item if isinstance(item, Token) else None


def _first_on_line(tok: Token, source: Source) -> bool:
    return not source.line(tok.line)[: tok.column - 1].strip()


def _bad_token(e: UnexpectedToken, source: Source, brackets: list[Token]) -> RecError:
    tok = e.token
    expected = _expected(e)
    prev = _previous_token(e)
    at_end = tok.type == "$END" or (tok.type == "_DEDENT" and not tok.value and tok.end_pos is not None
                                    and not source.text[tok.end_pos:].strip())

    # An unclosed bracket swallows the line breaks after it; the error then shows up at the end
    # of the file or at the start of a later line. Report the bracket.
    if brackets and (at_end or tok.type in ("_DEDENT", "_INDENT")
                     or (tok.line is not None and tok.line > brackets[-1].line and _first_on_line(tok, source))):
        b = brackets[-1]
        close = OPENERS.get(b.value, ")")
        later = "" if at_end else f"; line breaks inside brackets are ignored, so line {tok.line} was read " \
                                  "as part of the same expression"
        return RecError(f"this '{b.value}' is never closed", Span(b.line, b.column, b.line, b.column + 1, source),
                        hint=f"close it with '{close}'" + later)

    if at_end:
        last = _last_line(source)
        text = source.line(last)
        span = Span(last, len(text) - len(text.lstrip()) + 1, last, len(text.rstrip()) + 1, source)
        if "_INDENT" in expected:
            return RecError("expected an indented block after this line", span,
                            hint="a cell (or a for loop) needs at least one indented line under it")
        if expected <= {"CELL", "_NL", "$END"}:
            return RecError("no cell in this file", Span(1, 1, 1, 1, source) if not source.text.strip() else span,
                            hint="a .rec file defines cells: `cell NAME(D, H):` followed by its indented lines")
        return RecError("unexpected end of file", span, hint=_expected_hint(expected))

    if tok.type == "_INDENT":
        line = tok.end_line
        return RecError("unexpected indent", Span(line, 1, line, len(tok.value) + 1, source),
                        hint="only the lines of a cell or a for body are indented, all by the same amount"
                        + (TAB_NOTE if "\t" in source.line(line)[: len(tok.value)] else ""))
    if tok.type == "_DEDENT":
        line = tok.end_line
        return RecError("unexpected end of block", Span(line, 1, line, len(tok.value) + 1, source),
                        hint=_expected_hint(expected))

    span = Span(tok.line, tok.column, tok.end_line or tok.line,
                tok.end_column or tok.column + max(len(tok), 1), source)
    if "_INDENT" in expected:
        return RecError("expected an indented block", span,
                        hint="the lines of a cell or a for loop are indented under its ':' line")
    number = _bad_number(source, tok.start_pos, tok.end_pos)
    if number is not None:
        return number
    if tok.type == "DOCSTRING":
        end = tok.column + (tok.value.index("\n") if "\n" in tok.value else len(tok.value))
        return RecError("a docstring is only allowed right under the cell line", Span(tok.line, tok.column, tok.line,
                                                                                      end, source),
                        hint="use # for comments elsewhere")
    if expected and expected <= {"CELL", "_NL", "$END"}:
        return RecError(f"{_describe(tok)} outside a cell", span,
                        hint="a .rec file is a sequence of cells; the lines of a cell are indented under "
                             "`cell NAME(...):`")
    where = _in_where_clause(tok, source)
    if where and tok.type != "_NL":
        what = "'and' does not join constraints" if tok.value == "and" else _describe(tok)
        return RecError(what, span, hint=WHERE_HINT)
    if tok.type == "_NL":
        if "COLON" in expected:
            return RecError("missing ':' at the end of the line", span, hint="a cell or for line ends with ':'")
        if "NUMBER" in expected and prev is not None and prev.type in OPERATORS | {"EQUAL", "COMMA"}:
            return RecError("unexpected end of line", span, hint=f"expected an expression after {prev.value!r}")
        return RecError("unexpected end of line", span, hint=_expected_hint(expected))
    if not brackets and prev is not None and prev.type == "NAME" and prev.line == tok.line \
            and tok.type in ("NAME", "PRIMED", "NUMBER", "LSQB") and _first_on_line(prev, source):
        word = prev.value
        pspan = Span(prev.line, prev.column, prev.line, prev.column + len(word), source)
        close = difflib.get_close_matches(word, STATEMENT_WORDS, n=1, cutoff=0.7)
        hint = NOT_IN_LANGUAGE.get(word) or (f"did you mean '{close[0]}'?" if close else
                                             "a line of a cell is a declaration (input, param, state, edge, "
                                             "pair), `name = expr`, `s' = expr`, `output ...` or `for ...:`")
        return RecError(f"'{word}' does not start a declaration or a statement", pspan, hint=hint)
    return RecError(_describe(tok), span, hint=_token_hint(tok, prev, expected, brackets))


WHERE_HINT = ("a where clause is comparisons (<, <=, >, >=, ==) of dimension expressions, separated by "
              "commas, before the ':' of the cell line: `cell A(M, P) where 0 <= P <= M, K == 2*H:`")


def _in_where_clause(tok: Token, source: Source) -> bool:
    """The token is on a cell line, after its `where`."""
    if tok.line is None or tok.column is None:
        return False
    m = re.match(r"\s*cell\b.*?\)\s*where\b", source.line(tok.line))
    return bool(m) and tok.column > m.end()


def _describe(tok: Token) -> str:
    if tok.type == "_NL":
        return "unexpected end of line"
    return f"unexpected {tok.value!r}"


def _last_line(source: Source) -> int:
    lines = source.text.split("\n")
    for i in range(len(lines), 0, -1):
        if lines[i - 1].strip():
            return i
    return 1


def _bad_number(source: Source, start: int | None, end: int | None) -> RecError | None:
    """A run of letters, digits and dots glued to a number (`1.2.3`, `3x`, `1e`) is a
    malformed number. None when the text around [start, end) is not one."""
    if start is None or end is None:
        return None
    text = source.text
    if start == 0 or start >= len(text) or text[start - 1] not in WORD_CHARS or text[start] not in WORD_CHARS:
        return None  # the offending token does not touch what comes before it
    a = start
    while a > 0 and (text[a - 1] in WORD_CHARS or (text[a - 1] in "+-" and a > 1 and text[a - 2] in "eE")):
        a -= 1
    b = end
    while b < len(text) and text[b] in WORD_CHARS:
        b += 1
    word = text[a:b]
    if not (word[0].isdigit() or (word[0] == "." and len(word) > 1 and word[1].isdigit())):
        return None
    line = text.count("\n", 0, a) + 1
    col = a - (text.rfind("\n", 0, a) + 1) + 1
    hint = "numbers are written 3, 0.5, 1e-5"
    lead = word.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
    if lead != word and lead and lead[-1].isdigit() and "e" not in word[len(lead):len(lead) + 1].lower():
        hint += f"; for a product write {lead}*{word[len(lead):]}"
    return RecError(f"'{word}' is not a number", Span(line, col, line, col + len(word), source), hint=hint)


def _expected_hint(expected) -> str | None:
    exp = set(expected or ())
    names = []
    if {"NAME", "NUMBER"} <= exp:  # an expression may start here
        exp -= EXPR_START
        names.append("an expression")
    if {"ADD_OP", "MUL_OP"} <= exp:  # an expression may continue here
        exp -= OPERATORS | {"LSQB", "DOT", "LPAR"}
        names.append("an operator")
    names += sorted({TOKEN_NAMES.get(t, repr(_literal(t))) for t in exp if t not in ("$END",)})
    if not names:
        return None
    if len(names) > 6:
        return "expected " + ", ".join(names[:6]) + ", ..."
    return "expected " + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0])


def _literal(terminal: str) -> str:
    """Anonymous terminals are named by lark (e.g. 'CELL', 'RPAR'); show their text."""
    try:
        t = _lark().get_terminal(terminal)
        return t.pattern.value if t.pattern.type == "str" else terminal
    except Exception:
        return terminal


def _token_hint(tok: Token, prev: Token | None, expected: set[str], brackets: list[Token]) -> str | None:
    if tok.type == "EQUAL" and "COMP_OP" in expected:
        return "'=' assigns, once per statement; to compare write '=='"
    if tok.type in ("NAME", "PRIMED", "NUMBER") and prev is not None and ("_NL" in expected or "COMMA" in expected):
        return "two expressions in a row: is an operator or a ',' missing?"
    if tok.type == "NAME":
        close = difflib.get_close_matches(tok.value, STATEMENT_WORDS, n=1, cutoff=0.75)
        if close and close[0] != tok.value:
            return f"did you mean '{close[0]}'?"
    if brackets and tok.type not in ("RPAR", "RSQB"):
        b = brackets[-1]
        close = OPENERS[b.value]
        if ("RPAR" if close == ")" else "RSQB") in expected:
            return f"is a '{close}' missing? the '{b.value}' at {b.line}:{b.column} is still open"
    if tok.type in ("RPAR", "RSQB") and tok.type not in expected:
        opener = "(" if tok.type == "RPAR" else "["
        if not brackets:
            return f"this '{tok.value}' closes nothing"
        if brackets[-1].value != opener:
            b = brackets[-1]
            return f"the '{b.value}' at {b.line}:{b.column} is closed by '{OPENERS[b.value]}', not '{tok.value}'"
    if tok.type == "COLON" and "RSQB" in expected:
        return "a slice is lo:hi; there is no step"
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

    def upto(self, t: Tree, last) -> Span:
        """The span of t, ended at `last` (a node or token) rather than at the line break that
        lark counts into a line-based rule."""
        end = last if isinstance(last, Span) else (self.span(last) if isinstance(last, Token) else last.span)
        return self.span(t).to(end)

    def build(self, tree: Tree) -> A.Module:
        cells = [self.cell(c) for c in tree.children if isinstance(c, Tree)]
        return A.Module(cells, span=self.upto(tree, cells[-1]) if cells else self.span(tree))

    # --- structure ---
    def cell(self, t: Tree) -> A.Cell:
        name, args, where, doc, *items = t.children
        arglist = [] if args is None else [
            A.CellArg(str(a.children[0]), self.expr(a.children[1]) if a.children[1] is not None else None,
                      span=self.span(a)) for a in args.children]
        constraints = [] if where is None else [self.constraint(c) for c in where.children[1:]]
        docstring = None if doc is None else _docstring_text(str(doc.children[0]))
        out = []
        for item in items:
            out.extend(self.item(item))
        return A.Cell(str(name), arglist, docstring, out, constraints, span=self.upto(t, out[-1]))

    def constraint(self, t: Tree) -> A.Constraint:
        kids = t.children
        return A.Constraint([self.expr(k) for k in kids[0::2]], [str(k) for k in kids[1::2]], span=self.span(t))

    def item(self, t: Tree) -> list:
        kind = t.data
        if kind == "clause":
            kw, value = t.children
            if kw.type == "HEADS":
                count = self.expr(value)
                return [A.Heads(count, span=self.upto(t, count))]
            return [A.Over(str(value), span=self.upto(t, value))]
        if kind == "decl":
            kind_tree, *vars_ = t.children
            dvars = [self.decl_var(v) for v in vars_]
            return [A.Decl(str(kind_tree.children[0]), dvars, span=self.upto(t, dvars[-1]))]
        if kind == "simple_line":
            return [self.small_stmt(s) for s in t.children]
        if kind == "for_stmt":
            var, func, args, *body = t.children
            stmts = []
            for b in body:
                stmts.extend(self.item(b))
            pos, kw = self.args(args)
            return [A.For(str(var), str(func), pos + kw, stmts, span=self.upto(t, stmts[-1]))]
        raise AssertionError(kind)

    def decl_var(self, t: Tree) -> A.DeclVar:
        name, shape, cplx, on_edge, init = t.children
        dims = [] if shape is None else [self.expr(e) for e in shape.children]
        node = None
        if init is not None:
            if init.data == "random_init":
                dist, args = init.children
                pos, kw = self.args(args)
                node = A.RandomInit(str(dist), pos + kw, span=self.span(init))
            else:
                node = A.ValueInit(self.expr(init.children[0]), span=self.span(init))
        return A.DeclVar(str(name), dims, on_edge is not None, node, cplx is not None, span=self.span(t))

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
        if k == "imag":
            return A.Imag(float(c[0].value[:-1]), c[0].value, span=sp)
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
    lines = body.replace("\r\n", "\n").split("\n")
    if len(lines) > 1:  # strip the common indentation of continuation lines
        rest = [ln for ln in lines[1:] if ln.strip()]
        cut = min((len(ln) - len(ln.lstrip()) for ln in rest), default=0)
        lines = [lines[0]] + [ln[cut:] for ln in lines[1:]]
    return "\n".join(lines).strip()
