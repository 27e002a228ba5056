"""The README's and results/README.md's tables of measured numbers against the committed files they come
from. A table is checked when an HTML comment right above it names its source:

    <!-- numbers: results/ladder-cpu/results.csv perplexity
    RoPE = rope-s1337 none
    CoCA + YaRN = coca-s1337 yarn:dynamic -->

(a results.csv, the metric perplexity or passkey_accuracy, then one line per table row: its label, the
checkpoint and the scaling), or, for seeded runs, `numbers: results/ladder-cpu/runs.json arms` (rows
labelled by arm; columns `k / n` and `crossing steps` as `python -m nanococa.report runs` prints them).
Every cell of a checked row must equal the file's value as the reports format it."""
import csv
import json
import os
import re

import pytest

from helpers import ROOT
from nanococa.common import parse_lengths

DOCS = ["README.md", "results/README.md"]
COMMENT = re.compile(r"<!-- numbers: (.*?)-->\s*\n(\|.*?)(?:\n\n|\n?\Z)", re.S)


def checked_tables(doc):
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    return [(m.group(1), m.group(2)) for m in COMMENT.finditer(text)]


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def fmt(value, lo, hi):
    if value in ("", None):
        return ""
    return f"{float(value):.2f}" + (f" ({float(lo):.2f}-{float(hi):.2f})" if lo else "")


def check_results_table(spec, table):
    head, *mapping = [line.strip() for line in spec.strip().splitlines()]
    path, metric = head.split()
    lo_hi = ("perplexity_lo", "perplexity_hi") if metric == "perplexity" else ("passkey_lo", "passkey_hi")
    with open(os.path.join(ROOT, path)) as f:
        data = {(r["checkpoint"], r["scaling"], int(r["length"])): r for r in csv.DictReader(f)}
    rows = dict(line.split(" = ") for line in mapping)
    lines = table.strip().splitlines()
    lengths = [parse_lengths(h.replace(",", ""))[0] for h in cells(lines[0])[1:]]
    seen = 0
    for line in lines[2:]:
        label, *values = cells(line)
        if label not in rows:
            continue
        ckpt, scaling = rows[label].split()
        for n, shown in zip(lengths, values):
            r = data[(ckpt, scaling, n)]
            expected = fmt(r[metric], r[lo_hi[0]], r[lo_hi[1]])
            assert shown == expected or (shown in ("-", "") and expected == ""), \
                f"{path}: {label} at {n}: the table says {shown!r}, the file {expected!r}"
        seen += 1
    assert seen == len(rows), f"{path}: rows {sorted(rows)} not all found in the table"


def check_runs_table(spec, table):
    path = spec.split()[0]
    doc = json.load(open(os.path.join(ROOT, path)))
    arms = {}
    for r in doc["runs"]:
        arms.setdefault(r["arm"], []).append(r)
    lines = table.strip().splitlines()
    header = cells(lines[0])
    for line in lines[2:]:
        row = dict(zip(header, cells(line)))
        members = arms[row[header[0]]]
        k = sum(r["learned"] for r in members)
        if "k / n" in row:
            assert row["k / n"] == f"{k} / {len(members)}", row
        if "crossing steps" in row:
            steps = sorted(r["crossing"] for r in members if r["crossing"] is not None)
            assert row["crossing steps"] == (", ".join(f"{s:,}" for s in steps) or "-"), row


@pytest.mark.parametrize("doc", DOCS)
def test_tables_of_measured_numbers_match_their_files(doc):
    tables = checked_tables(doc)
    if doc == "README.md":
        assert tables, "the README's headline tables name their sources"
    for spec, table in tables:
        if spec.split()[1] == "arms":
            check_runs_table(spec, table)
        else:
            check_results_table(spec, table)
