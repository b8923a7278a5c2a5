"""docs/CONTRACT.md: every "CONTRACT §n" the code cites is a section there (issue 13, item 9)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO / "docs" / "CONTRACT.md"
# "CONTRACT §3", "CONTRACT §2 and §6", optionally naming a file or key: "CONTRACT §3 ``oof/oof_probs.parquet``"
CITATION = re.compile(r"CONTRACT (§\d+(?:(?:,| and|, and) §\d+)*)(?: ``([^`]+)``)?")


def sections() -> dict[int, str]:
    """{n: heading line and body} of each ``## §n`` section."""
    parts = re.split(r"^(?=## )", CONTRACT.read_text(encoding="utf-8"), flags=re.M)
    found = {}
    for part in parts:
        m = re.match(r"## §(\d+) \S", part)
        if m:
            assert int(m.group(1)) not in found, f"two sections §{m.group(1)}"
            found[int(m.group(1))] = part
    return found


def citations() -> list[tuple[str, int, str | None]]:
    """(file:line, section number, named file or key) for every citation in src/ and conf/."""
    out = []
    for root in ("src", "conf"):
        for path in sorted((REPO / root).rglob("*")):
            if path.suffix not in (".py", ".yaml", ".yml", ".md") or not path.is_file():
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for m in CITATION.finditer(line):
                    for n in re.findall(r"§(\d+)", m.group(1)):
                        out.append((f"{path.relative_to(REPO)}:{i}", int(n), m.group(2)))
    return out


def test_every_contract_citation_names_a_section_that_exists():
    have = sections()
    assert sorted(have) == list(range(1, len(have) + 1)), "sections are numbered §1..§n without gaps"
    cited = citations()
    assert len(cited) >= 20  # the regex still finds the code's citations
    missing = [(where, n) for where, n, _ in cited if n not in have]
    assert not missing, f"cited but not in {CONTRACT.name}: {missing}"
    # a citation that names a file or key ("CONTRACT §3 ``flag/label_issues.csv``") finds it in that section
    unnamed = [(where, n, name) for where, n, name in cited if name and name not in have[n]]
    assert not unnamed, f"named in a citation but absent from that section: {unnamed}"


def test_step_modules_never_import_each_other():
    """Keys and locators live in steps/locate.py: a step imports it, steps/common and the core, never
    another step (cycle, which runs them all, aside)."""
    import ast

    steps = Path(__file__).resolve().parents[1] / "src" / "cleanloop" / "steps"
    names = {p.stem for p in steps.glob("*.py")} - {"__init__", "common", "locate"}
    for path in steps.glob("*.py"):
        if path.stem == "cycle":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                bad = {m for m in mods if m.startswith("cleanloop.steps.") and m.split(".")[2] in names}
                assert not bad, f"{path.name} imports {sorted(bad)}"
