"""README.md stays short and true: at most 200 lines, and its table of the default study's
verdicts is the one results/report.md holds (the report is rebuilt by `dvc repro`; the README's
copy is checked here, never typed from memory)."""

from __future__ import annotations

import re

from stages.common.paths import ROOT

BEGIN, END = (
    "<!-- verdicts: from results/report.md, checked by tests/test_readme.py -->",
    "<!-- /verdicts -->",
)


def report_verdicts() -> list[str]:
    """The README's rows for the report's findings table: claim, verdict, effect."""
    text = (ROOT / "results" / "report.md").read_text()
    section = text.split("## Findings", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| claim")]
    out = ["| claim | verdict | effect [95% CI] |", "|---|---|---|"]
    for row in rows:
        claim, _source, verdict, effect, _why, _evidence = [
            c.strip() for c in row.strip("|").split(" | ")
        ]
        out.append(f"| {claim} | {verdict} | {effect} |")
    return out


def test_the_readme_fits_on_a_screen_or_two():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_readme_verdicts_are_the_reports():
    readme = (ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme, f"README.md lacks the block {BEGIN} ... {END}"
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip().splitlines()
    want = report_verdicts()
    assert block == want, (
        "README.md's verdicts differ from results/report.md; paste:\n" + "\n".join(want)
    )


def test_shipped_text_speaks_of_nothing_a_user_cannot_see():
    """No working-process words or files that are not in the repository, in any shipped text."""
    # (written with classes so that this pattern does not find itself in a grep of the repository)
    words = re.compile(
        r"this st[o]p|the brie[f]\b|brie[f]'s|STACK-NOTE[S]|DEVELOPERS\.m[d]|shared/[A-Z]+"
    )
    shipped = [ROOT / "README.md", ROOT / "dvc.yaml", ROOT / "params.yaml", ROOT / "Makefile",
               ROOT / "pyproject.toml", ROOT / "results" / "report.md"]  # fmt: skip
    for d in ("model", "stages", "flows", "tests", "bench", "docs"):
        shipped += [p for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".j2", ".yaml")]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in shipped
             for m in words.finditer(p.read_text())]  # fmt: skip
    assert not found, "\n".join(found)
