"""docs/guide.md's examples run, each in a process of its own, and print what the guide shows.

Every ```python block is a whole program followed by a ```text block: what it prints (stdout).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide.md"
TEXT = GUIDE.read_text()

# A python block and the text block right after it (only blank lines between them).
EXAMPLE = re.compile(r"^```python\n(.*?)^```\n\s*^```text\n(.*?)^```", re.S | re.M)
EXAMPLES = EXAMPLE.findall(TEXT)


def _first_line(code: str) -> str:
    """A readable id: the example's first class or function name."""
    match = re.search(r"^(?:class|async def|def) (\w+)", code, re.M)
    return match.group(1) if match else "example"


def test_every_python_block_has_its_output() -> None:
    assert len(EXAMPLES) >= 8
    blocks = re.findall(r"^```python$", TEXT, re.M)
    assert len(blocks) == len(EXAMPLES), "a ```python block without a ```text block after it"


@pytest.mark.parametrize(("code", "expected"), EXAMPLES, ids=[_first_line(c) for c, _ in EXAMPLES])
def test_example_prints_what_the_guide_says(code: str, expected: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n").splitlines() == expected.rstrip("\n").splitlines(), out.stderr


def test_cli_commands_in_the_guide_exist() -> None:
    section = TEXT.split("## The CLI", 1)[1].split("\n## ", 1)[0]
    used = set(re.findall(r"^nerve (?:-\S+ (?:json )?)*([a-z]+)", section, re.M))
    assert used >= {"demo", "run", "call", "upload", "download", "nodes", "fuzz"}
    helptext = subprocess.run([sys.executable, "-m", "nerve.cli", "--help"], capture_output=True,
                              text=True, timeout=30).stdout
    section_help = helptext.split("positional arguments:", 1)[1]
    listed = set(re.findall(r"^ {4}([a-z]+)\b", section_help, re.M))
    assert {"demo", "run", "call"} <= listed, helptext
    assert used <= listed, (used - listed, helptext)


def test_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", TEXT):
        assert (GUIDE.parent / target).resolve().is_file(), target
    readme = (ROOT / "README.md").read_text()
    for anchor in re.findall(r"README\.md#([\w-]+)", TEXT):
        headings = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                    for h in re.findall(r"^#+ (.*)$", readme, re.M)}
        assert anchor in headings, anchor
