"""The README's example runs, and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "3 {'computed_by': 'a'}" in out.stdout
    assert "new user {'id': 7}" in out.stdout
    assert "6000 bytes back" in out.stdout


def test_readme_commands_exist() -> None:
    text = README.read_text()
    for command in ("ci/demo.sh", "ci/test.sh"):
        assert command in text
        assert (README.parent / command).stat().st_mode & 0o111
    assert "ci/test.sh" in (README.parent / ".ci" / "run").read_text()
