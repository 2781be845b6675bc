"""Scoring predictions against references: `idefics3-eval` (cli.py), one module per benchmark metric (anls.py,
vqa.py, relaxed.py, choice.py, exact.py) and the report (score, bootstrap interval, categories: report.py).
Pure Python and numpy: no model, no MindSpore."""
