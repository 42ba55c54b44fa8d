"""Writes the module listing of docs/layout.md from the modules' docstrings (their first paragraph), so that it
cannot drift from the code: `python scripts/layout_doc.py` rewrites the section, `--check` exits 1 if it differs."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "layout.md"
HEADING = "## Modules, from their docstrings"
FOLDERS = ["lstm_core", "kernels", "kernels/lstm", "kernels/lce", "train"]


def folders() -> list[str]:
    wings = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "train").glob("*/__init__.py"))
    return FOLDERS + wings + ["src/leanfit"]


def first_paragraph(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "(no docstring)"
    return " ".join(doc.split("\n\n")[0].split())


def listing() -> str:
    lines = [HEADING, ""]
    for folder in folders():
        lines += [f"### `{folder}/`", ""]
        lines += [f"- `{p.name}`: {first_paragraph(p)}" for p in sorted((ROOT / folder).glob("*.py"))]
        lines.append("")
    return "\n".join(lines)


def with_listing(text: str) -> str:
    head = text[: text.index(HEADING)] if HEADING in text else text.rstrip() + "\n\n"
    return head + listing()


if __name__ == "__main__":
    current = DOC.read_text(encoding="utf-8")
    wanted = with_listing(current)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if current == wanted else 1)
    DOC.write_text(wanted, encoding="utf-8")
