"""Tables for people (Markdown) and programs (CSV), written side by side under an output folder."""

from __future__ import annotations

import csv
import io
from pathlib import Path


def _columns(rows: list[dict]) -> list[str]:
  return list(dict.fromkeys(k for r in rows for k in r))


def _cell(r: dict, c: str) -> str:
  return str(r.get(c, ""))


def markdown_table(rows: list[dict]) -> str:
  """Rows as a Markdown table: columns are the union of the rows' keys in first-seen order; a
  missing value is blank."""
  cols = _columns(rows)
  md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  md += ["| " + " | ".join(_cell(r, c) for c in cols) + " |" for r in rows]
  return "\n".join(md) + "\n"


def write_table(rows: list[dict], out: Path, name: str) -> str:
  """Writes rows as `name.md` (`markdown_table`) and `name.csv` under `out`; returns the Markdown."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  cols = _columns(rows)
  text = markdown_table(rows)
  (out / f"{name}.md").write_text(text)
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(cols)
  writer.writerows([[_cell(r, c) for c in cols] for r in rows])
  (out / f"{name}.csv").write_text(buf.getvalue())
  return text


def pyplot():
  """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save_figure(fig, path: str | Path, legend_size: int | None = None) -> None:
  """Legend (on every axis with labels), tight layout, PNG at 120 dpi, figure closed."""
  for ax in fig.axes:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=legend_size)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)
