"""The subset of Go's text/template that Ollama's chat templates use, rendered in Python.

Written because PyPI has no maintained renderer (the only candidate, a CGo wrapper at version 0.0.2, needs a Go
toolchain); used to check a Modelfile's TEMPLATE against the model's Jinja chat template before it is shipped.

Supported: text; ``{{- ... -}}`` whitespace trimming; ``.Field``, ``$.Field``, ``$var``, ``$var.Field``, ``.``;
string, number and boolean literals; parentheses; the functions ``eq ne lt le gt ge and or not len slice index``;
``{{ if }} {{ else if }} {{ else }} {{ end }}``; ``{{ range PIPE }}`` and ``{{ range $i, $v := PIPE }}`` (with
``{{ else }}`` for an empty range); ``{{ $x := PIPE }}`` and ``{{ $x = PIPE }}``; ``{{/* comments */}}``.
Anything else raises TemplateError naming the action.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)|(?P<var>\$\w*(?:\.\w+)*)'
                    r'|(?P<field>(?:\.\w+)+|\.)|(?P<op>:=|=|\(|\)|,)|(?P<word>\w+))')


class TemplateError(ValueError):
    """A template outside the supported subset, or one that fails to render."""


@dataclass
class _Node:
    kind: str                       # text, expr, assign, if, range
    value: object = None            # text / parsed pipeline / (names, pipeline)
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


def _lex(source: str) -> list[tuple[str, str]]:
    """[(kind, value)]: ('text', s) and ('action', inner), with Go's trim markers applied to the texts."""
    items, pos, trim_next = [], 0, False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            items.append(("text", text))
        inner = m.group(2).strip()
        if not (inner.startswith("/*") and inner.endswith("*/")):
            items.append(("action", inner))
        trim_next, pos = bool(m.group(3)), m.end()
    text = source[pos:]
    if trim_next:
        text = text.lstrip(" \t\r\n")
    if text:
        items.append(("text", text))
    return items


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot read {expr[pos:]!r} in {{{{ {expr} }}}}")
        out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return out


def _parse_pipeline(tokens: list[tuple[str, str]], action: str):
    """A command: a function word with its arguments, or a single operand. Returns a nested tuple tree."""
    def operand(i):
        kind, val = tokens[i]
        if val == "(":
            depth, j = 1, i + 1
            while j < len(tokens) and depth:
                depth += {"(": 1, ")": -1}.get(tokens[j][1], 0) if tokens[j][0] == "op" else 0
                j += 1
            if depth:
                raise TemplateError(f"unclosed parenthesis in {{{{ {action} }}}}")
            return command(tokens[i + 1:j - 1]), j
        if kind == "str":
            return ("lit", bytes(val[1:-1], "utf-8").decode("unicode_escape") if val[0] == '"' else val[1:-1]), i + 1
        if kind == "num":
            return ("lit", float(val) if "." in val else int(val)), i + 1
        if kind == "word" and val in ("true", "false", "nil"):
            return ("lit", {"true": True, "false": False, "nil": None}[val]), i + 1
        if kind in ("field", "var"):
            return (kind, val), i + 1
        raise TemplateError(f"unexpected {val!r} in {{{{ {action} }}}}")

    def command(toks):
        nonlocal tokens
        saved, tokens = tokens, toks
        try:
            if not toks:
                raise TemplateError(f"empty expression in {{{{ {action} }}}}")
            if toks[0][0] == "word" and toks[0][1] not in ("true", "false", "nil"):
                if toks[0][1] not in _FUNCS:
                    raise TemplateError(f"function {toks[0][1]!r} is not supported ({{{{ {action} }}}})")
                args, i = [], 1
                while i < len(toks):
                    arg, i = operand(i)
                    args.append(arg)
                return ("call", toks[0][1], args)
            node, i = operand(0)
            if i != len(toks):
                raise TemplateError(f"unexpected {toks[i][1]!r} in {{{{ {action} }}}}")
            return node
        finally:
            tokens = saved

    return command(tokens)


def _parse(items: list[tuple[str, str]]) -> list[_Node]:
    root: list[_Node] = []
    stack: list[tuple[_Node, list]] = []  # (open if/range node, list being filled)
    current = root
    for kind, value in items:
        if kind == "text":
            current.append(_Node("text", value))
            continue
        words = value.split(None, 1)
        head, rest = (words[0], words[1] if len(words) > 1 else "") if words else ("", "")
        if head in ("if", "range"):
            node = _Node(head)
            if head == "range":
                m = re.match(r"^(\$\w+)\s*(?:,\s*(\$\w+)\s*)?:=\s*(.*)$", rest, re.S)
                names = [n for n in (m.group(1), m.group(2)) if n] if m else []
                node.value = (names, _parse_pipeline(_tokens(m.group(3) if m else rest), value))
            else:
                node.value = _parse_pipeline(_tokens(rest), value)
            current.append(node)
            stack.append((node, current))
            current = node.body
        elif head == "else":
            if not stack:
                raise TemplateError("{{ else }} outside an if or range")
            node, parent = stack[-1]
            if rest.startswith("if "):  # else if: a nested if in the else branch, closed by the same end
                inner = _Node("if", _parse_pipeline(_tokens(rest[3:]), value))
                node.orelse.append(inner)
                stack[-1] = (node, parent)
                stack.append((inner, None))  # closed together with its parent
                current = inner.body
            else:
                current = node.orelse
        elif head == "end":
            if not stack:
                raise TemplateError("{{ end }} without an if or range")
            while True:
                node, parent = stack.pop()
                if parent is not None:
                    break
            current = parent
        elif head in ("with", "define", "template", "block", "break", "continue"):
            raise TemplateError(f"{{{{ {head} }}}} is not supported")
        else:
            m = re.match(r"^(\$\w+)\s*(:=|=)\s*(.*)$", value, re.S)
            if m:
                current.append(_Node("assign", (m.group(1), m.group(2), _parse_pipeline(_tokens(m.group(3)), value))))
            else:
                current.append(_Node("expr", _parse_pipeline(_tokens(value), value)))
    if stack:
        raise TemplateError("an {{ if }} or {{ range }} has no {{ end }}")
    return root


def _truth(v) -> bool:
    """Go's truth: false, 0, nil and empty strings, slices and maps are false."""
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    return len(v) > 0 if hasattr(v, "__len__") else True


def _get(obj, name: str):
    if isinstance(obj, dict):
        if name not in obj:
            return None
        return obj[name]
    return getattr(obj, name, None)


def _and(*a):
    for v in a:
        if not _truth(v):
            return v
    return a[-1]


def _or(*a):
    for v in a:
        if _truth(v):
            return v
    return a[-1]


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "not": lambda a: not _truth(a),
    "and": _and, "or": _or, "len": len, "index": lambda a, *k: _index(a, k),
    "slice": lambda a, *k: a[k[0]:k[1]] if len(k) == 2 else a[k[0]:] if k else a,
}


def _index(a, keys):
    for k in keys:
        a = a[k]
    return a


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def lookup(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise TemplateError(f"undefined variable {name}")

    def assign(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise TemplateError(f"undefined variable {name}")


def _eval(node, dot, scope: _Scope):
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "field":
        value = dot
        for part in node[1].split(".")[1:]:
            if part:
                value = _get(value, part)
        return value
    if kind == "var":
        head, *parts = node[1].split(".")
        value = scope.lookup(head)
        for part in parts:
            value = _get(value, part)
        return value
    if kind == "call":
        return _FUNCS[node[1]](*(_eval(a, dot, scope) for a in node[2]))
    raise TemplateError(f"cannot evaluate {node!r}")


def _show(v) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _run(nodes: list[_Node], dot, scope: _Scope, out: list[str]) -> None:
    for n in nodes:
        if n.kind == "text":
            out.append(n.value)
        elif n.kind == "expr":
            out.append(_show(_eval(n.value, dot, scope)))
        elif n.kind == "assign":
            name, op, pipe = n.value
            value = _eval(pipe, dot, scope)
            if op == "=":
                scope.assign(name, value)
            else:
                scope.frames[-1][name] = value
        elif n.kind == "if":
            scope.frames.append({})
            _run(n.body if _truth(_eval(n.value, dot, scope)) else n.orelse, dot, scope, out)
            scope.frames.pop()
        elif n.kind == "range":
            names, pipe = n.value
            seq = _eval(pipe, dot, scope)
            items = list(seq.items()) if isinstance(seq, dict) else list(enumerate(seq or []))
            if not items:
                scope.frames.append({})
                _run(n.orelse, dot, scope, out)
                scope.frames.pop()
            for key, item in items:
                frame = {names[0]: item} if len(names) == 1 else {names[0]: key, names[1]: item} if names else {}
                scope.frames.append(frame)
                _run(n.body, item, scope, out)
                scope.frames.pop()


def render(source: str, data: dict) -> str:
    """Render ``source`` (Go text/template syntax, Ollama's subset) with ``data`` as the dot."""
    nodes = _parse(_lex(source))
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)

