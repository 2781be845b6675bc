#!/usr/bin/env python
"""Answer every row of a JSONL file: `python batch.py --help` (same as `idefics3-batch`); the script msrun starts
for data parallel runs: `msrun --worker_num N --local_worker_num N batch.py --model M --input IN --output OUT`."""
import sys

from mindone_idefics3.batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
