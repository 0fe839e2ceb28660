"""The pipeline's report: `summary.csv` / `summary.md` (one row per variant, mean +- std over seeds),
`runs.csv`, loss and accuracy plots, per-run curve CSVs (DVC plots) and the reconstructions."""

from emae.report.summary import runs_table, summary_table, to_markdown

__all__ = ["runs_table", "summary_table", "to_markdown"]
