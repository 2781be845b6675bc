"""How the fuzz tests run: hypothesis with a fixed seed, a small budget in the default suite and a large one under
`-m slow`, a per-case deadline, and a watchdog that ends the process (with a traceback) if a case hangs.

Each fuzz test is parametrized with `BUDGETS`: `fast` (FAST_CASES cases, default suite) and `slow` (SLOW_CASES).
`run_cases` returns how many cases ran and checks that the whole budget was used.
"""
from __future__ import annotations

import faulthandler
from datetime import timedelta
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

FAST_CASES = 30
SLOW_CASES = 600
SEED = 20251201
CASE_DEADLINE = timedelta(seconds=5)  # generous: the machine is shared; a normal case takes milliseconds
HANG_SECONDS = 120  # a case still running after this is a hang: the watchdog ends the process

BUDGETS = pytest.mark.parametrize("budget", [FAST_CASES, pytest.param(SLOW_CASES, marks=pytest.mark.slow)],
                                  ids=["fast", "slow"])


def run_cases(strategy: st.SearchStrategy, check: Callable, budget: int, *,
              deadline: timedelta = CASE_DEADLINE) -> int:
    """Run `check(case)` on `budget` cases drawn from `strategy`; returns the number of cases run."""
    count = 0

    @seed(SEED)
    @settings(max_examples=budget, deadline=deadline, database=None, derandomize=False, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])
    @given(strategy)
    def property_(case):
        nonlocal count
        count += 1
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
        try:
            check(case)
        finally:
            faulthandler.cancel_dump_traceback_later()

    property_()
    assert count >= budget, f"only {count} of {budget} cases ran"
    return count
