"""Result tables of the RAT study: Markdown and CSV from a list of row dicts, written atomically."""

import csv
import io
import math
from typing import List, Sequence

from rat_plugins.utils.atomic import atomic_write_text

__all__ = ["cell", "write_table"]


def cell(value) -> str:
    """A table cell: blank for missing, yes / NO for booleans, two decimals for floats."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def write_table(rows: List[dict], columns: Sequence[str], md_path, csv_path, title: str = "") -> str:
    """Markdown and CSV of ``rows`` (missing cells blank, never zero); returns the Markdown."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in columns})
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, buf.getvalue())
    return markdown
