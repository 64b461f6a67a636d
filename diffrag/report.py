"""Reports: tables as Markdown + CSV under an output folder."""

from __future__ import annotations

from pathlib import Path


def write_table(rows: list[dict], out: Path, name: str) -> str:
  """Writes rows as Markdown and CSV under `out`; returns the Markdown."""
  out.mkdir(parents=True, exist_ok=True)
  cols = list(rows[0])
  md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
  text = "\n".join(md) + "\n"
  (out / f"{name}.md").write_text(text)
  (out / f"{name}.csv").write_text(",".join(cols) + "\n" + "\n".join(",".join(str(r[c]) for c in cols) for r in rows) + "\n")
  return text
