"""The reference: transformers 4.57.1 on CPU torch, with its vision position ids corrected.

The correction (`corrected_position_ids`, see mindone_idefics3/testing.py) lives in the package so that the
benchmarks apply the same one; the tests import it from here.
"""
from mindone_idefics3.testing import corrected_position_ids

__all__ = ["corrected_position_ids"]
