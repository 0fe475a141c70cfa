"""One process-wide lock for code that builds Python AST objects.

CPython 3.11 (gh-106905, fixed only from 3.12.x on) counts the recursion depth of its
AST-to-Python conversion in state all threads share: two threads inside `ast.parse` at once
can fail with "SystemError: AST constructor recursion depth mismatch". recdsl reaches
`ast.parse` through lark (building the grammar: PrepareLiterals uses `ast.literal_eval`)
and through Triton (its JIT and its interpreter's rewriter parse kernel sources), so the
parser and the Triton launcher take this one lock. Reentrant: a Triton launch under it may
parse again."""
from __future__ import annotations

import threading

AST_LOCK = threading.RLock()
