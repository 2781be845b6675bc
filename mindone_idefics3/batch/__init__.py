"""Batch inference over a JSONL file: `idefics3-batch` (cli.py). The input rows (rows.py) are prepared one by one
(prepare.py), sorted by prompt length within a window and generated in batches (runner.py), and their records
appended and fsync'ed per batch (records.py); under msrun each rank takes its share of the rows and rank 0 writes
the final file (shards.py)."""
