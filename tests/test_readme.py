"""The README's Python examples run as shown (each complete program in it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT, _program_env

with open(os.path.join(ROOT, "README.md")) as f:
    BLOCKS = [
        block for block in re.findall(r"```python\n(.*?)```", f.read(), re.S)
        if '__name__ == "__main__"' in block
    ]


def test_readme_has_complete_programs():
    assert len(BLOCKS) >= 2  # the manager's and the pool's


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_program_runs(index, tmp_path):
    script = tmp_path / f"readme_{index}.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        env=_program_env(None), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
