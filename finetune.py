#!/usr/bin/env python
"""Fine-tune an Idefics3 / SmolVLM model (LoRA or full): `python finetune.py --help` (same as `idefics3-finetune`)."""
import sys

from mindone_idefics3.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
