#!/usr/bin/env python
"""Ask an Idefics3 / SmolVLM model about images: `python generate.py --help` (same as `idefics3-generate`)."""
import sys

from mindone_idefics3.cli import main

if __name__ == "__main__":
    sys.exit(main())
