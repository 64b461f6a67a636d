"""Tables for people (Markdown) and programs (CSV), written side by side under an output folder."""

from __future__ import annotations

import csv
import io
from pathlib import Path


def write_table(rows: list[dict], out: Path, name: str) -> str:
  """Writes rows as `name.md` and `name.csv` under `out`; returns the Markdown.

  Columns are the union of the rows' keys in first-seen order; a missing value is blank.
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  cols = list(dict.fromkeys(k for r in rows for k in r))
  cell = lambda r, c: str(r.get(c, ""))
  md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  md += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
  text = "\n".join(md) + "\n"
  (out / f"{name}.md").write_text(text)
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(cols)
  writer.writerows([[cell(r, c) for c in cols] for r in rows])
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
