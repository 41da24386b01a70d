"""The README's quick start is what CI runs: its two commands appear verbatim, in order, in .ci/run."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no ```bash block under '## Quick start'"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_commands():
    commands = quick_start_commands()
    assert commands == ['pip install torch==2.13.0 && pip install -e ".[test]" && dwml demo', "python3 -m pytest"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert [line for line in ci if line in commands] == commands
