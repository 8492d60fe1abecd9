"""The README's "Writing other plugins" quotes the shipped example plugin's files exactly, so the documented
contract is the tested one (tests/integration/test_example_plugin.py runs that plugin)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A quoted file: a marker comment naming it (invisible once rendered), then its fenced code block.
QUOTED = re.compile(r"<!-- file: (?P<path>\S+) -->\n```\w*\n(?P<code>.*?)^```$", re.DOTALL | re.MULTILINE)


def section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end]


def test_readme_quotes_the_example_files_exactly() -> None:
    """Each file quoted in "Writing other plugins" is byte for byte the example's file, and both are quoted."""
    quoted = {m["path"]: m["code"] for m in QUOTED.finditer(section("Writing other plugins"))}

    assert set(quoted) == {"examples/deny_header/deny_header.py", "examples/deny_header/pyproject.toml"}
    for path, code in quoted.items():
        assert code == (ROOT / path).read_text(), f"README.md quotes an outdated {path}"
