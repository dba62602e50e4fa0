#!/usr/bin/env python3
"""Regenerate the ```text block under "## Usage" in README.md from move.py --help.

    python3 scripts/update_readme_usage.py          # rewrite README.md
    python3 scripts/update_readme_usage.py --check  # exit 1 if it is stale

Runs move.py with COLUMNS=100 so argparse wraps the same way everywhere;
tests/test_readme.py compares the block the same way.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
USAGE_BLOCK = re.compile(r"(^## Usage\n.*?^```text\n)(.*?)(^```$)", re.S | re.M)


def help_text() -> str:
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("PYTHON_COLORS", None)
    env["NO_COLOR"] = "1"  # Python 3.14 colours --help on a terminal
    out = subprocess.run([sys.executable, str(ROOT / "move.py"), "--help"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return out.rstrip("\n") + "\n"


def usage_block(readme: str) -> str:
    m = USAGE_BLOCK.search(readme)
    if not m:
        raise SystemExit("README.md has no ```text block under '## Usage'")
    return m.group(2)


def main() -> int:
    readme = README.read_text(encoding="utf-8")
    current, wanted = usage_block(readme), help_text()
    if current == wanted:
        print("README.md usage block is up to date")
        return 0
    if "--check" in sys.argv[1:]:
        print("README.md usage block is stale: run python3 scripts/update_readme_usage.py")
        return 1
    README.write_text(USAGE_BLOCK.sub(lambda m: m.group(1) + wanted + m.group(3), readme,
                                      count=1), encoding="utf-8")
    print("README.md usage block updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
