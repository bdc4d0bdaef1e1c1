"""docs/CASES.md is the key to the case ids (``C01`` ...) that test names and comments cite: every id cited
in tests/ or flashpack/ is listed there, and every listed case has a test named ``test_cNN_...``."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITE = re.compile(r"(?<![\"'\w])C(\d\d)[a-z]?(?![\"'\w])")  # C07, C03a, C15-C18; not the dtype "C64"
TEST_NAME = re.compile(r"^\s*(?:async\s+)?def test_c(\d\d)[a-z]?_", re.M)


def listed_cases() -> dict[str, str]:
    with open(os.path.join(REPO, "docs", "CASES.md"), encoding="utf-8") as f:
        rows = [line for line in f if re.match(r"\| C\d\d \|", line)]
    return {line.split("|")[1].strip(): line for line in rows}


def sources():
    for top in ("tests", "flashpack"):
        for root, _, names in os.walk(os.path.join(REPO, top)):
            for n in names:
                if n.endswith(".py"):
                    path = os.path.join(root, n)
                    with open(path, encoding="utf-8") as f:
                        yield os.path.relpath(path, REPO), f.read()


def test_cases_doc_lists_each_case_once_with_input_duty_and_source():
    cases = listed_cases()
    assert list(cases) == [f"C{i:02d}" for i in range(1, len(cases) + 1)]
    for cid, row in cases.items():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 4 and all(cells), (cid, cells)  # id, input, what flashpack must do, where


def test_every_cited_case_id_resolves_in_cases_doc():
    cases = listed_cases()
    unresolved = []
    for path, text in sources():
        for m in CITE.finditer(text):
            if f"C{m.group(1)}" not in cases:
                unresolved.append(f"{path}: C{m.group(1)}")
        for m in TEST_NAME.finditer(text):
            if f"C{m.group(1)}" not in cases:
                unresolved.append(f"{path}: test_c{m.group(1)}")
    assert unresolved == []


def test_every_case_has_a_test_named_after_it():
    named = {f"C{m.group(1)}" for _, text in sources() for m in TEST_NAME.finditer(text)}
    assert sorted(set(listed_cases()) - named) == []
