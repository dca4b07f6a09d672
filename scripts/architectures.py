"""Rewrite the README's table of supported and refused architectures from the lists the tests run.

python scripts/architectures.py          # update README.md
python scripts/architectures.py --check  # exit 1 if README.md is out of date (the tests check this too)
"""

from __future__ import annotations

import sys
from pathlib import Path

from hivegen.model.tiny import README_BEGIN, README_END, readme_section

README = Path(__file__).resolve().parent.parent / "README.md"


def updated(text: str) -> str:
    """`text` with its generated section replaced by the current one."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{README} lacks the markers {README_BEGIN!r} ... {README_END!r}")
    return text[:start] + readme_section() + text[end + len(README_END) :]


def main() -> int:
    current = README.read_text()
    fresh = updated(current)
    if "--check" in sys.argv[1:]:
        if fresh != current:
            print("README.md's architecture list is out of date: run python scripts/architectures.py")
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
