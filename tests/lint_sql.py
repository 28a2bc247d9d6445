#!/usr/bin/env python3
"""Lint pg_store's install-time SQL (sql/*.sql) for names a database owner can capture.

While CREATE EXTENSION or ALTER EXTENSION UPDATE runs, search_path is the extension's
schema (public by default) with pg_catalog searched first. An operator or a function
whose arguments need an implicit cast finds no exact match in pg_catalog, and an
exact-match operator or function that the owner of the database created in public wins:
it is stored in the view, constraint, default or policy being defined (or run, by an
upgrade script's UPDATE), and every reader, superusers too, then runs the owner's code.
So everything parsed at install time names pg_catalog's operators and functions. This
lint has no type information: it asks for that everywhere, and accepts only the syntax
that is not an operator or a call.

It flags, outside comments, string literals, quoted identifiers and the bodies of
functions that pin their search_path:
* a bare symbolic operator (=, <>, !=, <, >, <=, >=, +, -, *, /, %, ||, ~, !~, ~~, ^, &,
  |, #, @ ... any operator token): write `a OPERATOR(pg_catalog.=) b`, the operands of
  the types pg_catalog's operator takes (cast them where they are not).
  OPERATOR(...) must name pg_catalog.
* the keyword forms that look an operator up by name: BETWEEN, LIKE, ILIKE, SIMILAR TO,
  IS [NOT] DISTINCT FROM, OVERLAPS, NULLIF(a, b), a simple `CASE x WHEN v`,
  JOIN ... USING (...), NATURAL JOIN, and [NOT] IN except as below (over a subquery,
  write `x OPERATOR(pg_catalog.=) ANY (SELECT ...)`).
* a call of an unqualified function (`round(x, 1)`): write `pg_catalog.round(...)`.
  SQL's keyword constructs are not calls (coalesce, greatest, least, extract, position,
  substring, overlay, trim, cast, exists, array, row, ...: see NOT_A_CALL): extract,
  position and the like name pg_catalog's function themselves, and coalesce, greatest
  and least compare through the type's default btree operator class, found by type.
* CREATE FUNCTION or PROCEDURE without `SET search_path = pg_catalog, pg_temp` (or TO),
  unless its LANGUAGE is c or internal (no SQL in its body). With it, the body (a string
  or dollar-quoted string after AS) is resolved when called, with that path, and is not
  linted; without it, the body would resolve names through the caller's search_path.
  The rest of the statement (argument defaults) is linted, and so is a BEGIN ATOMIC
  body, which is parsed at creation.
* inside DO blocks, which run at install time: their PL/pgSQL body is linted the same
  way (`:=` is an assignment, `<<label>>` a label, `FOR x IN` a loop).

It accepts (not operators, not calls):
* `::` casts; `=>` and `:=` (named arguments, assignments); `.` and `[ ]`.
* `=` of a setting or an assignment: `SET [LOCAL|SESSION] name = value` (SET statements,
  the SET clause of CREATE/ALTER FUNCTION, ALTER ROLE ...), `WITH (option = value)` and
  `SET (option = value)` option lists, and the `column = expression` items of an
  UPDATE's (or ON CONFLICT DO UPDATE's) SET clause. (`(a, b) = (...)` there is flagged.)
* `*` that is not between two expressions: `SELECT *`, `t.*`, `count(*)`, `RETURNING *`.
* a unary minus right before a numeric literal (`-1`): the parser folds it into a
  negative constant and looks no operator up. `-1::bigint` is `-(1::bigint)`, an
  operator, and flagged; so is a unary plus, and a minus before anything else.
* `x [NOT] IN ('a', 'b')` over string literals only: the literals take x's type, so it
  compares x's type with itself. That is safe where pg_catalog has `=` for the type with
  itself, as for text, which is all pg_store compares this way (states, phases, modes).
  For a type without one (regrole, regclass, ...) it is not, and this lint cannot tell:
  tests/upgrade.sh plants an operator in public for every such pair of types and checks
  that none is captured.
* IN that is not an operator: `FOR x IN` (PL/pgSQL), `IN SCHEMA`, LOCK's `IN ... MODE`,
  an argument mode (`(IN x int)`), `position(a IN b)`; LIKE in `CREATE TABLE t (LIKE u)`.
* `name(` that is not a call: after FUNCTION, PROCEDURE, AGGREGATE, ROUTINE, TABLE, VIEW,
  TYPE, REFERENCES, INTO, KEY, USING, AS, IF [NOT] EXISTS, `)` or `::`, after ON in
  CREATE INDEX, and after a word that is not a keyword (a column's type modifier,
  `c varchar(10)`; a column definition list, `AS x(a int)`); and a qualified name
  (`store.line_key(`, `pg_catalog.round(`): the schema named is the one searched.
* psql meta-commands (a line starting with a backslash, as the `\\echo ... \\quit`
  guard of an upgrade script).

Usage: tests/lint_sql.py FILE...      lint the files; exit 1 on any finding
       tests/lint_sql.py --self-test  check the lint on snippets it must flag or pass
"""

import re
import sys

OP_CHARS = set("+-*/<>=~!@#%^&|`?")
# Keywords after which an expression starts (a following + or - is unary, * is not
# binary): everything but the few that end one.
OPERAND_END_KEYWORDS = {"null", "true", "false", "end", "current_date", "current_time",
                        "current_timestamp", "current_user", "session_user", "current_role",
                        "localtime", "localtimestamp", "user"}
# Words that may precede "(" without being a function call: SQL keywords, keyword
# constructs, type names that take a modifier, PL/pgSQL statements.
NOT_A_CALL = set("""
all and any array as asc between bigint bit boolean by case cast char character check
coalesce collate column conflict constraint create cross cube dec decimal default
delete desc distinct do double else elsif end except exclude exists extract false fetch
filter float for foreign from full greatest group grouping having if in include index
inner insert int integer intersect interval into is join key lateral least left like
limit loop national nchar normalize not null numeric of offset on only or order outer
over overlay partition perform position precision primary raise range real references
return returning returns right rollup row rows select set setof sets smallint some
substring table tablesample then time timestamp treat trim union unique update using
values varchar varying view when where while window with within xmlattributes
xmlconcat xmlelement xmlexists xmlforest xmlparse xmlpi xmlroot xmlserialize xmltable
execute call assert zone to escape variadic ilike similar notice warning info log debug
exception exit continue return strict
timestamptz timetz varbit
""".split())
# After these, "name(" declares or names something (a function's signature, a table's
# column list, an alias's column definitions, a type modifier), it does not call it.
DECLARES_NEXT = {"function", "procedure", "aggregate", "routine", "table", "view", "type",
                 "references", "into", "key", "using", "as"}


class Tok:
    __slots__ = ("kind", "text", "line", "end")

    def __init__(self, kind, text, line, end=None):
        self.kind, self.text, self.line, self.end = kind, text, line, end

    @property
    def low(self):
        return self.text.lower()

    def is_kw(self, *words):
        return self.kind == "ident" and self.low in words

    def __repr__(self):
        return f"{self.kind}:{self.text}"


def tokenize(src, line=1):
    """PostgreSQL's lexical structure, as far as the lint needs it. Comments and
    whitespace are dropped; a string, a dollar-quoted string or a quoted identifier is
    one token; a psql meta-command line is dropped."""
    toks, i, n = [], 0, len(src)
    at_line_start = True
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            at_line_start = True
            i += 1
            continue
        if c in " \t\r\f":
            i += 1
            continue
        if c == "\\" and at_line_start:  # psql meta-command: to the end of the line
            while i < n and src[i] != "\n":
                i += 1
            continue
        at_line_start = False
        start_line = line
        if src.startswith("--", i):
            while i < n and src[i] != "\n":
                i += 1
            continue
        if src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += src[i] == "\n"
                    i += 1
            continue
        m = re.match(r"(?i)(e|x|b|n|u&)?'", src[i:i + 3])
        if m and (m.group(1) is None or not (i and (src[i - 1].isalnum() or src[i - 1] == "_"))):
            backslash = (m.group(1) or "").lower() == "e"
            j = i + len(m.group(0))
            while j < n:
                if backslash and src[j] == "\\":
                    j += 2
                    continue
                if src[j] == "'":
                    if j + 1 < n and src[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            text = src[i:j + 1]
            toks.append(Tok("string", text, start_line))
            line += text.count("\n")
            i = j + 1
            continue
        m = re.match(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$", src[i:])
        if m:
            tag = m.group(0)
            j = src.find(tag, i + len(tag))
            if j < 0:
                raise SyntaxError(f"line {line}: unterminated dollar-quoted string {tag}")
            text = src[i:j + len(tag)]
            toks.append(Tok("dollar", text, start_line))
            line += text.count("\n")
            i = j + len(tag)
            continue
        if c == '"':
            j = i + 1
            while j < n and not (src[j] == '"' and not src.startswith('""', j)):
                j += 2 if src.startswith('""', j) else 1
            text = src[i:j + 1]
            toks.append(Tok("qident", text, start_line))
            line += text.count("\n")
            i = j + 1
            continue
        m = re.match(r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", src[i:])
        if m:
            toks.append(Tok("number", m.group(0), line))
            i += len(m.group(0))
            continue
        m = re.match(r"[A-Za-z_\x80-\uffff][A-Za-z_0-9$\x80-\uffff]*", src[i:])
        if m:
            toks.append(Tok("ident", m.group(0), line))
            i += len(m.group(0))
            continue
        if c == "$" and i + 1 < n and src[i + 1].isdigit():
            m = re.match(r"\$\d+", src[i:])
            toks.append(Tok("param", m.group(0), line))
            i += len(m.group(0))
            continue
        for p in ("::", ":=", "=>", ".."):
            if src.startswith(p, i):
                toks.append(Tok("punct", p, line))
                i += 2
                break
        else:
            if c in OP_CHARS:
                j = i
                while j < n and src[j] in OP_CHARS and not src.startswith("--", j) and not src.startswith("/*", j):
                    j += 1
                op = src[i:j]
                # As PostgreSQL: a multi-character operator ends in + or - only if it
                # holds one of ~ ! @ # % ^ & | ` ?.
                while len(op) > 1 and op[-1] in "+-" and not set(op) & set("~!@#%^&|`?"):
                    op = op[:-1]
                toks.append(Tok("op", op, line))
                i += len(op)
            else:
                toks.append(Tok("punct", c, line))
                i += 1
    return toks


def statements(toks):
    """Split at top-level semicolons (not those of a BEGIN ATOMIC … END body)."""
    stmt, depth, atomic, cases = [], 0, False, 0
    for t in toks:
        if t.kind == "punct" and t.text in "([":
            depth += 1
        elif t.kind == "punct" and t.text in ")]":
            depth -= 1
        elif t.is_kw("atomic") and stmt and stmt[-1].is_kw("begin"):
            atomic = True
        elif atomic and t.is_kw("case"):
            cases += 1
        elif atomic and t.is_kw("end"):
            if cases:
                cases -= 1
            else:
                atomic = False
        if t.kind == "punct" and t.text == ";" and depth <= 0 and not atomic:
            if stmt:
                yield stmt
            stmt, depth = [], 0
        else:
            stmt.append(t)
    if stmt:
        yield stmt


def ends_operand(toks, k):
    """Whether toks[k] ends an expression (so that an operator after it is binary)."""
    if k < 0:
        return False
    t = toks[k]
    # A type after `::` ends the expression it casts, keyword or not (`x::integer`,
    # `x::double precision`, `x::timestamp with time zone`).
    j = k
    while j >= 0 and toks[j].kind in ("ident", "qident") and k - j < 4:
        if j >= 1 and toks[j - 1].kind == "punct" and toks[j - 1].text == "::":
            return True
        j -= 1
    if t.kind in ("number", "string", "qident", "param", "dollar"):
        return True
    if t.kind == "punct":
        return t.text in (")", "]")
    if t.kind == "ident":
        return t.low in OPERAND_END_KEYWORDS or t.low not in NOT_A_CALL
    return False


def matching(toks, i):
    """Index of the parenthesis closing the one at i."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].kind == "punct" and toks[j].text in "([":
            depth += 1
        elif toks[j].kind == "punct" and toks[j].text in ")]":
            depth -= 1
            if depth == 0:
                return j
    return len(toks) - 1


def function_findings(stmt):
    """CREATE FUNCTION/PROCEDURE: the SET search_path it needs, and the tokens to lint
    (all but the body, when the body resolves names with the pinned path)."""
    low = [t.low if t.kind == "ident" else t.text for t in stmt]
    findings = []
    language = None
    pinned = False
    for k, w in enumerate(low):
        if w == "language" and k + 1 < len(stmt):
            language = stmt[k + 1].text.strip("'\"").lower()
        if w == "set" and k + 1 < len(stmt) and low[k + 1] == "search_path":
            values = []
            for t in stmt[k + 3:]:
                if t.kind == "punct" and t.text == ",":
                    continue
                if t.kind in ("ident", "qident", "string"):
                    values.append(t.text.strip("'\"").lower())
                    if len(values) == 2:
                        break
                else:
                    break
            pinned = low[k + 2] in ("=", "to") and values == ["pg_catalog", "pg_temp"]
    name = stmt[0].line
    body_is_code = language not in ("c", "internal")
    if body_is_code and not pinned:
        findings.append((name, "CREATE FUNCTION without SET search_path = pg_catalog, pg_temp: "
                               "its body would resolve names through the caller's search_path"))
    rest = []
    after_as = False
    for t in stmt:
        if t.is_kw("as"):
            after_as = True
            rest.append(t)
            continue
        if after_as and t.kind in ("string", "dollar") and (pinned or not body_is_code):
            continue  # the body: resolved when called, with the pinned search_path
        if not (t.kind == "punct" and t.text == ","):
            after_as = False
        rest.append(t)
    return findings, rest


def lint_tokens(toks, plpgsql=False):
    """Findings (line, message) for the operators and calls of one statement."""
    out = []
    n = len(toks)
    first = toks[0].low if toks and toks[0].kind == "ident" else ""
    is_update = first == "update" or any(
        toks[k].is_kw("do") and k + 1 < n and toks[k + 1].is_kw("update") for k in range(n))
    is_create_index = first == "create" and any(t.is_kw("index") for t in toks[:4])
    # Parenthesis stack: what each open parenthesis belongs to.
    stack = []
    update_set_depth = None

    def prev(k):
        return toks[k - 1] if k > 0 else None

    def nxt(k):
        return toks[k + 1] if k + 1 < n else None

    def is_assignment_target(k):
        """toks[k] is "=": is it preceded by `SET name` or (in an UPDATE's SET clause)
        `, name`, name possibly qualified?"""
        j = k - 1
        if j < 0 or toks[j].kind not in ("ident", "qident"):
            return False
        while j >= 2 and toks[j - 1].kind == "punct" and toks[j - 1].text == "." \
                and toks[j - 2].kind in ("ident", "qident"):
            j -= 2
        before = toks[j - 1] if j >= 1 else None
        if before is not None and before.is_kw("local", "session") and j >= 2:
            before = toks[j - 2]
        if before is not None and before.is_kw("set"):
            return True
        return (before is not None and before.kind == "punct" and before.text == ","
                and update_set_depth == len(stack))

    k = 0
    while k < n:
        t = toks[k]
        if t.kind == "punct" and t.text in "([":
            owner = prev(k)
            ctx = "paren"
            if owner is not None and owner.is_kw("with", "set", "reset") and t.text == "(":
                ctx = "options"
            elif owner is not None and owner.is_kw("operator"):
                ctx = "operator"
            elif owner is not None and owner.is_kw("position"):
                ctx = "position"
            stack.append(ctx)
        elif t.kind == "punct" and t.text in ")]":
            if stack:
                stack.pop()
        elif t.is_kw("set") and is_update and update_set_depth is None:
            update_set_depth = len(stack)
        elif t.is_kw("from", "where", "returning") and update_set_depth == len(stack):
            update_set_depth = None

        if t.kind == "op":
            ctx = stack[-1] if stack else None
            p, q = prev(k), nxt(k)
            if ctx == "operator":
                if not (k >= 2 and toks[k - 1].text == "." and toks[k - 2].low == "pg_catalog"):
                    out.append((t.line, f"OPERATOR({t.text}) without pg_catalog: write OPERATOR(pg_catalog.{t.text})"))
            elif t.text == "=" and ctx == "options" and p is not None and p.kind in ("ident", "qident"):
                pass  # WITH (option = value)
            elif t.text == "=" and is_assignment_target(k):
                pass  # SET name = value, UPDATE … SET column = expression
            elif plpgsql and t.text == "<<" and q is not None and q.kind == "ident" \
                    and k + 2 < n and toks[k + 2].text == ">>":
                k += 3  # <<label>>
                continue
            elif t.text == "*" and not (ends_operand(toks, k - 1) and p.text != "." and q is not None
                                        and not (q.kind == "punct" and q.text in "),;")
                                        and not q.is_kw("from")):
                pass  # SELECT *, t.*, count(*)
            elif t.text == "-" and not ends_operand(toks, k - 1) and q is not None and q.kind == "number" \
                    and not (k + 2 < n and toks[k + 2].kind == "punct" and toks[k + 2].text == "::"):
                pass  # a negative numeric literal (-1::bigint is -(1::bigint): an operator)
            else:
                out.append((t.line, f"bare operator {t.text}: write OPERATOR(pg_catalog.{t.text}) "
                                    "with operands of the types it takes"))
        elif t.kind == "ident":
            w = t.low
            p, q = prev(k), nxt(k)
            left = k - 1
            if p is not None and p.is_kw("not"):
                left = k - 2
            if w == "in":
                ctx = stack[-1] if stack else None
                for_loop = any(toks[j].is_kw("for", "foreach") for j in range(max(0, k - 6), k)) and plpgsql
                if ctx == "position" or for_loop or not ends_operand(toks, left) \
                        or (q is not None and q.is_kw("schema", "access", "row", "share", "exclusive")):
                    pass
                elif q is not None and q.text == "(":
                    close = matching(toks, k + 1)
                    inner = toks[k + 2:close]
                    literals = inner and all(
                        x.kind == "string" if m % 2 == 0 else (x.kind == "punct" and x.text == ",")
                        for m, x in enumerate(inner)) and len(inner) % 2 == 1
                    if not literals:
                        out.append((t.line, "IN over a subquery or non-literal list looks = up by name: "
                                            "write x OPERATOR(pg_catalog.=) ANY (...)"))
                else:
                    out.append((t.line, "IN looks = up by name"))
            elif w in ("between", "like", "ilike", "similar", "overlaps") and ends_operand(toks, left):
                out.append((t.line, f"{t.text.upper()} looks its operators up by name: write them with OPERATOR(pg_catalog.…)"))
            elif w == "distinct" and p is not None and (p.is_kw("is") or (p.is_kw("not") and prev(k - 1) is not None
                                                                           and prev(k - 1).is_kw("is"))):
                out.append((t.line, "IS DISTINCT FROM looks = up by name"))
            elif w == "nullif" and q is not None and q.text == "(":
                out.append((t.line, "NULLIF looks = up by name: write CASE WHEN a OPERATOR(pg_catalog.=) b THEN NULL ELSE a END"))
            elif w == "case" and q is not None and not q.is_kw("when"):
                out.append((t.line, "a simple CASE x WHEN v looks = up by name: write CASE WHEN x OPERATOR(pg_catalog.=) v"))
            elif w == "natural":
                out.append((t.line, "NATURAL JOIN looks = up by name: join ON … OPERATOR(pg_catalog.=) …"))
            elif w == "using" and q is not None and q.text == "(" and any(
                    toks[j].is_kw("join") for j in range(max(0, k - 5), k)):
                out.append((t.line, "JOIN … USING looks = up by name: join ON … OPERATOR(pg_catalog.=) …"))
            elif q is not None and q.kind == "punct" and q.text == "(" and w not in NOT_A_CALL \
                    and w not in ("operator", "nullif") and not (p is not None and p.kind == "punct" and p.text == "."):
                declared = p is not None and (
                    p.kind in ("ident", "qident") and (p.low in DECLARES_NEXT or p.low not in NOT_A_CALL)
                    or (p.kind == "punct" and p.text in (")", "::"))
                    or (p.is_kw("on") and is_create_index)
                    or (p.is_kw("exists") and any(x.is_kw("if") for x in toks[max(0, k - 3):k])))
                if not declared:
                    out.append((t.line, f"unqualified function {t.text}(…): write pg_catalog.{t.low}(…) "
                                        "with arguments of the types it takes"))
        elif t.kind == "qident" and not (k > 0 and toks[k - 1].text == "."):
            q, p = nxt(k), prev(k)
            if q is not None and q.text == "(" and not (p is not None and (
                    p.kind in ("ident", "qident") and (p.low in DECLARES_NEXT or p.low not in NOT_A_CALL)
                    or (p.kind == "punct" and p.text in (")", "::")))):
                out.append((t.line, f"unqualified function {t.text}(…)"))
        k += 1
    return out


def lint_statement(stmt, plpgsql=False):
    first = stmt[0].low if stmt[0].kind == "ident" else ""
    words = [t.low for t in stmt[:5] if t.kind == "ident"]
    if first == "create" and ("function" in words or "procedure" in words):
        findings, rest = function_findings(stmt)
        return findings + lint_tokens(rest, plpgsql)
    if first == "do" and not plpgsql:
        findings = []
        for k, t in enumerate(stmt):
            if t.kind == "dollar" or t.kind == "string":
                language = [x.low for x in stmt if x.kind == "ident"]
                if "language" in language and language[language.index("language") + 1] != "plpgsql":
                    return [(t.line, "DO block in a language other than plpgsql: cannot lint it")]
                body = t.text[t.text.index("$", 1) + 1:t.text.rindex("$", 0, len(t.text) - 1)] \
                    if t.kind == "dollar" else t.text[1:-1].replace("''", "'")
                findings += lint_source(body, line=t.line, plpgsql=True)
        return findings
    return lint_tokens(stmt, plpgsql)


def lint_source(src, line=1, plpgsql=False):
    findings = []
    for stmt in statements(tokenize(src, line)):
        if not plpgsql:
            findings += lint_statement(stmt)
            continue
        # A PL/pgSQL statement: its SQL lies between these words of the block structure
        # (IF … THEN, FOR … LOOP, DECLARE, BEGIN, EXCEPTION WHEN … THEN, ELSE).
        part, depth = [], 0
        for t in stmt + [None]:
            if t is not None and t.kind == "punct" and t.text in "([":
                depth += 1
            elif t is not None and t.kind == "punct" and t.text in ")]":
                depth -= 1
            if t is None or (depth == 0 and t.is_kw("begin", "declare", "exception", "loop", "then", "else")):
                if part:
                    findings += lint_statement(part, plpgsql=True)
                part = []
            else:
                part.append(t)
    return findings


# Snippets the lint must flag (each at least once) or pass.
BAD = [
    "CREATE VIEW v AS SELECT a / b FROM t",
    "CREATE VIEW v AS SELECT a FROM t WHERE x = 1",
    "CREATE VIEW v AS SELECT a FROM t WHERE x <> 1",
    "CREATE VIEW v AS SELECT a || b FROM t",
    "CREATE VIEW v AS SELECT a * b FROM t",
    "CREATE VIEW v AS SELECT -a FROM t",
    "CREATE VIEW v AS SELECT +1 FROM t",
    "CREATE VIEW v AS SELECT a FROM t WHERE a OPERATOR(=) 1",
    "CREATE VIEW v AS SELECT a FROM t WHERE a OPERATOR(public.=) 1",
    "CREATE VIEW v AS SELECT round(a, 1) FROM t",
    "CREATE VIEW v AS SELECT count(*) FROM t",
    "CREATE VIEW v AS SELECT a FROM t WHERE a BETWEEN 1 AND 2",
    "CREATE VIEW v AS SELECT a FROM t WHERE a NOT LIKE 'x%'",
    "CREATE VIEW v AS SELECT a FROM t WHERE a IS DISTINCT FROM b",
    "CREATE VIEW v AS SELECT a FROM t WHERE a IN (1, 2)",
    "CREATE VIEW v AS SELECT a FROM t WHERE a IN (SELECT b FROM u)",
    "CREATE VIEW v AS SELECT a FROM t WHERE a NOT IN (b, 'x')",
    "CREATE VIEW v AS SELECT nullif(a, 0) FROM t",
    "CREATE VIEW v AS SELECT CASE a WHEN 1 THEN 2 END FROM t",
    "CREATE VIEW v AS SELECT a FROM t JOIN u USING (a)",
    "CREATE VIEW v AS SELECT a FROM t NATURAL JOIN u",
    "CREATE TABLE t (a timestamptz DEFAULT now())",
    "CREATE TABLE t (a int CHECK (a > 0))",
    "CREATE INDEX i ON t (a) WHERE a = 'x'",
    "CREATE POLICY p ON t USING (owner = current_user)",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = public AS $$ SELECT 1 $$",
    "CREATE FUNCTION f(a int DEFAULT 1 + 1) RETURNS int LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$ SELECT a + 1 $$",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = pg_catalog, pg_temp BEGIN ATOMIC SELECT 1 + 1; END",
    "DO $$ BEGIN IF 1 = 1 THEN RAISE NOTICE 'x'; END IF; END $$",
    "DO $$ DECLARE x int := round(1.5); BEGIN END $$",
    "UPDATE t SET a = b + 1",
    "UPDATE t SET a = 1 WHERE b = 2",
    "UPDATE t SET a = 1, b = 2 FROM u WHERE u.x = t.y",
    "SELECT pg_catalog.set_config('x', 'y', false) WHERE 1 = 1",
    "CREATE VIEW v AS SELECT -1::bigint FROM t",
    "CREATE VIEW v AS SELECT a::bigint - 1 FROM t",
    "CREATE VIEW v AS SELECT a FROM t WHERE a::integer IN (1, 2)",
    "CREATE VIEW v AS SELECT a FROM t WHERE a::double precision BETWEEN 1 AND 2",
    "DO $$ BEGIN EXECUTE format('SELECT 1'); END $$",
    "DO $$ BEGIN PERFORM upper('x'); END $$",
    "CREATE VIEW v AS SELECT a FROM t WHERE a ILIKE 'x' OR b SIMILAR TO 'y'",
]
GOOD = [
    "CREATE VIEW v WITH (security_invoker = true) AS SELECT * FROM t",
    "CREATE VIEW v AS SELECT t.*, pg_catalog.count(*) FROM t GROUP BY 1",
    "CREATE VIEW v AS SELECT a::numeric OPERATOR(pg_catalog./) b::numeric FROM t",
    "CREATE VIEW v AS SELECT pg_catalog.round(a::numeric, 1), coalesce(a, -1), greatest(a, b) FROM t",
    "CREATE VIEW v AS SELECT extract(epoch FROM a OPERATOR(pg_catalog.-) b) FROM t",
    "CREATE VIEW v AS SELECT CASE WHEN a OPERATOR(pg_catalog.=) 'x' THEN -1.5 ELSE 2 END FROM t",
    "CREATE VIEW v AS SELECT a FROM t WHERE a IN ('x', 'y') AND b NOT IN ('z')",
    "CREATE VIEW v AS SELECT a FROM t WHERE a OPERATOR(pg_catalog.=) ANY (SELECT b FROM u)",
    "CREATE VIEW v AS SELECT a FROM t WHERE a IS NOT NULL AND b IS TRUE",
    "CREATE VIEW v AS SELECT a FROM t AS x(a, b) JOIN u ON u.b OPERATOR(pg_catalog.=) x.b",
    "CREATE TABLE t (a bigserial PRIMARY KEY, b text NOT NULL DEFAULT 'x' CHECK (b IN ('x', 'y')), "
    "c varchar(10), d timestamptz DEFAULT pg_catalog.now(), e int REFERENCES u (a) ON DELETE CASCADE, "
    "f int DEFAULT -1, LIKE w)",
    "CREATE UNIQUE INDEX i ON store.lines (store.line_key(line))",
    "CREATE INDEX i ON t USING btree (a) WHERE state IN ('queued', 'running')",
    "CREATE POLICY p ON t FOR SELECT USING (pg_catalog.pg_has_role(owner, 'USAGE'))",
    "SET client_min_messages = warning",
    "SET client_min_messages TO warning",
    "ALTER TABLE t SET (fillfactor = 90)",
    "COMMENT ON FUNCTION f(bigint, interval) IS 'a = b; count(*) -- not code'",
    "COMMENT ON COLUMN t.a IS E'it''s \\' = 1'",
    "CREATE FUNCTION f(job bigint, timeout interval DEFAULT NULL) RETURNS SETOF t LANGUAGE sql VOLATILE "
    "SET search_path = pg_catalog, pg_temp AS $$ SELECT * FROM t WHERE id = job AND round(x, 1) > 0 $$",
    "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql SET search_path TO pg_catalog, pg_temp "
    "AS $f$ BEGIN RETURN (SELECT 1 + $q$ a = b $q$::int); END $f$",
    "CREATE FUNCTION store.\"wake\"() RETURNS void STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'wake_wrapper'",
    "CREATE OR REPLACE FUNCTION store.\"line_key\"(\"line\" TEXT) RETURNS bytea IMMUTABLE LANGUAGE c "
    "AS 'MODULE_PATHNAME', 'line_key_wrapper'",
    "CREATE FUNCTION f(path text, target regclass DEFAULT 'store.lines') RETURNS TABLE (a int, b text) "
    "LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$ SELECT 1, 'x' $$",
    "DO $$ BEGIN RAISE NOTICE 'x = %', coalesce(pg_catalog.current_setting('a', true), '30d'); END $$",
    "DO $$ DECLARE r record; BEGIN FOR r IN SELECT 1 LOOP NULL; END LOOP; END $$",
    "UPDATE t SET a = 1, b = pg_catalog.format('%s', c) FROM u WHERE u.x OPERATOR(pg_catalog.=) t.y",
    "UPDATE t c SET attempt = j.attempts FROM u j WHERE j.id OPERATOR(pg_catalog.=) c.job",
    "SELECT pg_catalog.pg_extension_config_dump('store.jobs', '')",
    "GRANT SELECT ON ALL TABLES IN SCHEMA store TO PUBLIC",
    "ALTER TABLE t ADD COLUMN o text NOT NULL DEFAULT store.origin(), ALTER COLUMN b SET NOT NULL",
    "CREATE EVENT TRIGGER e ON sql_drop EXECUTE FUNCTION store.forget_dropped_tables()",
    "\\echo Use \"ALTER EXTENSION x UPDATE\" to load this file. \\quit\nSELECT 1",
    "SELECT pg_catalog.format('%s', x => 1)",
    "SELECT position('a' IN 'abc')",
    "SET LOCAL client_min_messages = warning",
    "DROP FUNCTION IF EXISTS store_ingest(text, regclass)",
    "CREATE TABLE IF NOT EXISTS t (a int)",
    "ALTER FUNCTION f(int) SET search_path = pg_catalog, pg_temp",
    "CREATE TABLE t (a timestamptz(3), b double precision DEFAULT -1.5, c character varying(10))",
    "SELECT x.a FROM pg_catalog.generate_series(1, 2) x(a)",
]


def self_test():
    failures = 0
    for snippet in BAD:
        if not lint_source(snippet):
            print(f"not flagged: {snippet}")
            failures += 1
    for snippet in GOOD:
        found = lint_source(snippet)
        if found:
            print(f"flagged: {snippet}\n  {found}")
            failures += 1
    print(f"lint_sql self-test: {len(BAD)} bad and {len(GOOD)} good snippets, {failures} wrong")
    return failures == 0


def main(argv):
    if argv == ["--self-test"]:
        return 0 if self_test() else 1
    if not argv:
        print("\n".join(__doc__.strip().splitlines()[-2:]))
        return 2
    total = 0
    for path in argv:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        for line, msg in lint_source(src):
            print(f"{path}:{line}: {msg}")
            total += 1
    if total:
        print(f"lint_sql: {total} finding(s): an object parsed at install time could capture an "
              "operator or function that the database owner created in public")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
