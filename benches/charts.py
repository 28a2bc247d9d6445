#!/usr/bin/env python3
"""The charts of docs/benchmarks.md, drawn from the benchmarks' own figures.

    python3 benches/charts.py                      draw docs/bench-*.svg from docs/bench-results.json
    python3 benches/charts.py import BENCH FILE [--commit C] [--date D]
                                                   replace BENCH's section of the results with
                                                   the figures in FILE, then draw

BENCH is engine, bench, scale or citus: what `make bench-engine`, `make bench`,
`make bench-scale` and `make bench-citus` print on stdout (save it with `| tee FILE`). The
import reads the final table of that output; bench-citus prints one table per setting of
INSERT_WORKERS, and its import replaces the run with the same number of insert workers.

Python's standard library only: the SVG is written by hand, horizontal bars of wall time
(shorter is faster), pg_store's bars in blue, each labelled with its value.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "bench-results.json"
DOCS = ROOT / "docs"

PG_STORE = "#2b6cb0"  # pg_store's bars
OTHER = "#a0aec0"  # the alternatives'
INK = "#1a202c"
FAINT = "#4a5568"


# --- drawing ---------------------------------------------------------------------------


def bar_chart(title, groups, unit, footnote):
    """An SVG of horizontal bars. `groups` is a list of (heading, bars), each bar a
    (label, value, is_pg_store) triple; all bars share one scale, so groups compare."""
    width, label_w, bar_w = 820, 330, 360
    top, row, gap = 44, 24, 14
    values = [v for _, bars in groups for _, v, _ in bars if v is not None]
    vmax = max(values) if values else 1.0
    out, y = [], top
    for heading, bars in groups:
        y += 4
        out.append(f'<text x="10" y="{y + 12}" font-weight="bold" fill="{INK}">{escape(heading)}</text>')
        y += 22
        for label, value, ours in bars:
            out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" fill="{INK}">{escape(label)}</text>')
            if value is None:
                out.append(f'<text x="{label_w + 4}" y="{y + 15}" fill="{FAINT}">not measured</text>')
            else:
                w = max(1.0, bar_w * value / vmax)
                colour = PG_STORE if ours else OTHER
                out.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="{colour}"/>')
                out.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" fill="{INK}">{fmt(value)} {unit}</text>')
            y += row
        y += gap
    height = y + 26
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="24" font-size="15" font-weight="bold" fill="{INK}">{escape(title)}</text>',
    ]
    tail = [f'<text x="10" y="{height - 10}" font-size="11" fill="{FAINT}">{escape(footnote)}</text>', "</svg>"]
    return "\n".join(head + out + tail) + "\n"


def fmt(v):
    return f"{v:.2f}" if v < 10 else f"{v:,.1f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "–"


def provenance(sec):
    commit = f", commit {sec['commit']}" if sec.get("commit") else ""
    return f"{sec['command']}, {sec['date']}{commit}; figures from docs/bench-results.json, drawn by benches/charts.py"


def chart_engine(sec):
    groups = []
    for r in sec["rows"]:
        size = f"{r['input_mib'] // 1024} GiB" if r["input_mib"] >= 1024 else f"{r['input_mib']} MiB"
        groups.append((
            f"{size}, {r['records_m']:.2f} M records — store-dedup ÷ sort -u: {ratio(r['store_dedup_s'], r['sort_s'])}",
            [("store-dedup (the engine)", r["store_dedup_s"], True), ("LC_ALL=C sort -u", r["sort_s"], False)],
        ))
    return bar_chart("Deduplicating line files: wall time (shorter is faster), same memory and threads", groups, "s", provenance(sec))


def chart_bench(sec):
    rows = {(r["scenario"], r["contender"]): r["wall_s"] for r in sec["rows"]}
    names = {"pg_store": "pg_store (store_ingest)", "A": "A: sort -u | \\copy", "B": "B: \\copy to staging + ON CONFLICT"}
    groups = []
    for scenario, heading in (("empty", "1 GiB into an empty table"), ("incremental", "1 GiB into a table holding half the lines")):
        bars = [(names[c], rows[(scenario, c)], c == "pg_store") for c in ("pg_store", "A", "B") if (scenario, c) in rows]
        pg = rows.get((scenario, "pg_store"))
        others = sorted((v, c) for (s, c), v in rows.items() if s == scenario and c != "pg_store")
        best = f" — pg_store ÷ {others[0][1]}: {ratio(pg, others[0][0])}" if others else ""
        groups.append((heading + best, bars))
    return bar_chart(f"make bench: {sec['records_m']:.2f} M records into PostgreSQL, wall time (shorter is faster)", groups, "s", provenance(sec))


def chart_scale(sec):
    r = {x["step"]: x["wall_s"] for x in sec["rows"]}
    g = sec["size_g"]
    groups = [
        (f"{g} GiB into an empty table — pg_store ÷ sort -u | COPY: {ratio(r.get('big_pg'), r.get('big_a'))}", [
            ("A: sort -u | \\copy", r.get("big_a"), False),
            ("pg_store", r.get("big_pg"), True),
            ("pg_store, kill -9 of the worker at 90 %", r.get("big_kill"), True),
        ]),
        (f"1 GiB of new files into that table — pg_store ÷ B: {ratio(r.get('new_pg'), r.get('new_b'))}", [
            ("B: \\copy to staging + ON CONFLICT", r.get("new_b"), False),
            ("pg_store", r.get("new_pg"), True),
        ]),
        ("The same 1 GiB into an empty table", [("pg_store", r.get("new_empty"), True)]),
    ]
    return bar_chart(f"make bench-scale: {g} GiB, then 1 GiB more, wall time (shorter is faster)", groups, "s", provenance(sec))


def chart_citus(sec):
    groups = []
    for run in sorted(sec["runs"], key=lambda x: x["insert_workers"]):
        n = run["insert_workers"]
        # 0 is the setting's default: the job decides (one range per core, or on Citus
        # the cores it does not share with worker nodes on its host), and says in "ranges".
        who = (f"the default (insert_workers = 0: {run['ranges']} range{'s' if run.get('ranges') != 1 else ''})"
               if n == 0 and "ranges" in run else "the default (insert_workers = 0)" if n == 0
               else f"{n} insert worker{'s' if n != 1 else ''}")
        groups.append((
            f"{who} — pg_store's speed ÷ COPY's: {ratio(run['copy_s'], run['pg_store_s'])}",
            [
                ("\\copy of the sorted distinct lines", run["copy_s"], False),
                ("pg_store, whole job", run["pg_store_s"], True),
                ("pg_store, whole job, key column", run["key_column_s"], True),
            ],
        ))
    return bar_chart(
        f"make bench-citus: {sec['distinct_m']:.2f} M distinct lines into a distributed table, wall time (shorter is faster)",
        groups, "s", provenance(sec))


CHARTS = {"engine": ("bench-engine.svg", chart_engine), "bench": ("bench-1g.svg", chart_bench),
          "scale": ("bench-10g.svg", chart_scale), "citus": ("bench-citus.svg", chart_citus)}


def draw(results):
    for key, (name, chart) in CHARTS.items():
        if key in results:
            (DOCS / name).write_text(chart(results[key]), encoding="utf-8")
            print(f"wrote docs/{name}")


# --- importing a run's output ----------------------------------------------------------


def header_date(text):
    m = re.search(r"^# (\d{4}-\d{2}-\d{2}) ", text, re.M)
    return m.group(1) if m else None


def num(s):
    """A figure of the output: '-' for none, whole numbers as int."""
    if s in ("-", "–", ""):
        return None
    v = float(s)
    return int(v) if v.is_integer() and "." not in s else v


def parse_engine(text, sec):
    rows = []
    pat = re.compile(r"^(\S+)\s+(\d+)MiB\s+(\S+) \| store-dedup\s+([\d.]+) s\s+(\d+) MiB \| sort -u\s+([\d.]+) s\s+(\d+) MiB \|")
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            records = m.group(3)
            rows.append({"input_mib": int(m.group(2)),
                         "records_m": round(int(records) / 1e6, 2) if records.isdigit() else None,
                         "store_dedup_s": float(m.group(4)), "store_dedup_rss_mib": int(m.group(5)),
                         "sort_s": float(m.group(6)), "sort_rss_mib": int(m.group(7))})
    m = re.search(r"memory (\S+), threads (\d+), median of (\d+)", text)
    if m:
        sec["settings"] = f"memory {m.group(1)}, threads {m.group(2)}, median of {m.group(3)}"
    # A run may measure some sizes only (SIZES="32M 128M"): its rows replace those sizes.
    sizes = {r["input_mib"] for r in rows}
    kept = [r for r in sec.get("rows", []) if r["input_mib"] not in sizes]
    sec["rows"] = sorted(kept + rows, key=lambda r: r["input_mib"])
    return bool(rows)


def parse_bench(text, sec):
    rows = []
    pat = re.compile(r"^(empty|incr)\s+(pg_store|A sort\|COPY|B COPY\+INSERT)\s+([\d.]+)\s+(\d+)\s+(\S+) MiB\s+(\S+)\s+")
    records = None
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            wall = float(m.group(3))
            records = records or int(m.group(4)) * wall
            rss = m.group(5)
            rows.append({"scenario": "empty" if m.group(1) == "empty" else "incremental",
                         "contender": m.group(2).split()[0], "wall_s": wall,
                         "peak_rss_mib": None if rss == "-" else int(rss), "temp_mib": num(m.group(6))})
    m = re.search(r"runs: (\d+) \(B: (\d+)\)", text)
    if m:
        sec["runs"] = f"pg_store and A median of {m.group(1)}, B {m.group(2)} run(s)"
    if records:
        sec["records_m"] = round(records / 1e6, 2)
    sec["rows"] = rows
    return bool(rows)


def parse_scale(text, sec):
    rows = []
    pat = re.compile(r"^(big_a|big_pg|new_b|new_pg|new_empty|big_kill)\s+.*?\s+([\d.]+)\s+\d+\s+(\S+)\s+(\S+)\s+(\S+)"
                     r"\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\+(\d+)(?:\s+(\S+))?\s*$")
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            n = [num(x) for x in m.groups()[2:7]]
            rows.append({"step": m.group(1), "wall_s": float(m.group(2)), "private_mib": n[0], "temp_mib": n[1],
                         "wal_mib": n[2], "fpi": n[3], "pages_written": n[4], "rows": int(m.group(8)),
                         "heap_mib": int(m.group(9)), "index_mib": int(m.group(10)),
                         **({"autovacuums": num(m.group(11))} if m.group(11) else {})})
            m2 = re.search(r"(\d+) GiB", line)
            if m.group(1) == "big_pg" and m2:
                sec["size_g"] = int(m2.group(1))
    m = re.search(r"insert workers: (\d+)", text)
    if m:
        sec["insert_workers"] = int(m.group(1))
    sec["rows"] = rows
    return len(rows) == 6


def parse_citus(text, sec):
    walls = {}
    labels = {"COPY of the distinct lines into (line PK)": "copy_s", "pg_store, whole job, into (line PK)": "pg_store_s",
              "pg_store, whole job, key column (key PK)": "key_column_s"}
    for line in text.splitlines():
        for label, key in labels.items():
            if line.startswith(label):
                walls[key] = float(line[len(label):].split()[0])
    m = re.search(r"insert workers: (\d+)", text)
    r = re.search(r"median of (\d+) rounds, (\d+) distinct lines", text)
    if len(walls) != 3 or not m or not r:
        return False
    run = {"insert_workers": int(m.group(1)), "rounds": int(r.group(1)), **walls}
    g = re.search(r"insert ranges (\d+)", text)
    if g:
        run["ranges"] = int(g.group(1))
    sec["distinct_m"] = round(int(r.group(2)) / 1e6, 2)
    others = [x for x in sec.get("runs", []) if x["insert_workers"] != run["insert_workers"]]
    sec["runs"] = sorted(others + [run], key=lambda x: x["insert_workers"])
    return True


PARSERS = {"engine": (parse_engine, "make bench-engine"), "bench": (parse_bench, "make bench"),
           "scale": (parse_scale, "make bench-scale"), "citus": (parse_citus, "make bench-citus")}


def dump(value, indent=0):
    """JSON as docs/bench-results.json keeps it: objects indented, a list of objects one
    object a line (a row of a result table), everything else inline."""
    pad = "  " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {dump(v, indent + 1)}" for k, v in value.items()]
        text = "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = [pad + json.dumps(v, ensure_ascii=False) for v in value]
        text = "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    else:
        text = json.dumps(value, ensure_ascii=False)
    return text + ("\n" if indent == 0 else "")


def import_run(results, bench, path, commit, date):
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    parse, command = PARSERS[bench]
    sec = dict(results.get(bench, {}))
    if not parse(text, sec):
        sys.exit(f"{path}: no complete {command} result table found")
    sec.update(command=command, date=date or header_date(text) or sec.get("date"), commit=commit,
               source=f"imported from the output of {command}")
    results[bench] = sec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    imp = sub.add_parser("import", help="replace a benchmark's figures with a run's output, then draw")
    imp.add_argument("bench", choices=sorted(PARSERS))
    imp.add_argument("file", help="the benchmark's stdout, saved")
    imp.add_argument("--commit", help="the commit the run measured (default: HEAD)")
    imp.add_argument("--date", help="the run's date (default: from the output's first line)")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    if args.cmd == "import":
        commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                               capture_output=True, text=True).stdout.strip() or None
        import_run(results, args.bench, args.file, commit, args.date)
        RESULTS.write_text(dump(results), encoding="utf-8")
        print(f"updated docs/bench-results.json ({args.bench})")
    draw(results)


if __name__ == "__main__":
    main()
