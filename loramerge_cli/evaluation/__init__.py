"""Evaluation: task specs (specs), data (data), model loading (loading), batches, heads, the engine
that patches candidates into one base model (engine), metrics, the run-directory score cache (cache),
the `eval` report (report) and `--lambda auto` (tuning)."""

REPORT_FORMAT = "loramerge.eval/v1"  # the "format" of an `eval` report (its --out may replace only such a file)
