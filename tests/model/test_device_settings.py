"""MindSpore settings made by the user before (or after) ours are kept; a contradicting request is a clear error.

MindSpore's device and CPU threads can be set once per process, so each scenario runs in a fresh interpreter (the
four start together): the user's MindSpore calls, then a sequence of steps, each recorded as "ok" or as the
message of the Idefics3Error it raised. Anything else (MindSpore's own "can not be set repeatedly") crashes the
scenario and fails its tests.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCENARIOS = {
    "threads_then_device": ("ms.device_context.cpu.op_tuning.threads_num(2); ms.set_device('CPU')",
                            ["load", "load_ascend", "load_cpu", "run"]),
    "device_then_threads": ("ms.set_device('CPU'); ms.device_context.cpu.op_tuning.threads_num(2)",
                            ["load", "env_threads_3", "load", "env_threads_unset", "load", "run"]),
    "an_op_ran_first": ("ms.ops.add(ms.Tensor([1.0]), ms.Tensor([2.0])).asnumpy()", ["load", "load_cpu", "run"]),
    "user_sets_the_device_after_us": ("", ["load", "user_set_device_cpu", "load", "run"]),
}

SCRIPT = """
import json, os, sys
import mindspore as ms
import numpy as np
{user}
from mindone_idefics3 import Idefics3ForConditionalGeneration
from mindone_idefics3.device import current_device
from mindone_idefics3.errors import Idefics3Error
model = None
load = lambda **kw: Idefics3ForConditionalGeneration.from_pretrained(sys.argv[1], progress=False, **kw)
STEPS = dict(
    load=lambda: load(), load_cpu=lambda: load(device="cpu"), load_ascend=lambda: load(device="Ascend"),
    env_threads_3=lambda: os.environ.__setitem__("MINDONE_CPU_THREADS", "3"),
    env_threads_unset=lambda: os.environ.pop("MINDONE_CPU_THREADS"),
    user_set_device_cpu=lambda: ms.set_device("CPU"),
    run=lambda: model(input_ids=np.array([[5, 6, 7]])).logits.asnumpy().shape,
)
results = []
for step in sys.argv[2:]:
    try:
        value = STEPS[step]()
        model = value if step.startswith("load") else model
        results.append("ok" if not step.startswith("load") else "ok on " + current_device())
    except Idefics3Error as e:
        results.append("error: " + str(e))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Scenario → the outcome of each of its steps, or the end of its stderr if it crashed."""
    from mindone_idefics3.demo import write_demo_checkpoint

    model = write_demo_checkpoint(tmp_path_factory.mktemp("settings") / "model")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MINDONE_CPU_THREADS", None)
    running = {name: subprocess.Popen([sys.executable, "-c", SCRIPT.format(user=user), str(model), *steps],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
               for name, (user, steps) in SCENARIOS.items()}
    results = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        results[name] = json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else err[-2000:]
    return results


def steps(outcomes, scenario):
    result = outcomes[scenario]
    assert isinstance(result, list), f"{scenario} crashed:\n{result}"
    return result


def test_threads_then_device_set_by_the_user_are_kept(outcomes):
    load, _, load_cpu, run = steps(outcomes, "threads_then_device")
    assert (load, load_cpu, run) == ("ok on CPU", "ok on CPU", "ok")


def test_asking_for_another_device_than_the_one_set_is_a_clear_error(outcomes):
    message = steps(outcomes, "threads_then_device")[1]
    assert message.startswith("error: device 'Ascend' was asked for") and "already runs on CPU" in message


def test_device_then_threads_set_by_the_user_are_kept_and_loading_twice_works(outcomes):
    load, env_3, _, unset, load_again, run = steps(outcomes, "device_then_threads")
    assert (load, env_3, unset, load_again, run) == ("ok on CPU", "ok", "ok", "ok on CPU", "ok")


def test_a_thread_count_that_cannot_be_applied_is_a_clear_error(outcomes):
    message = steps(outcomes, "device_then_threads")[2]
    assert message.startswith("error: MINDONE_CPU_THREADS=3 cannot be applied") and "threads_num" in message


def test_a_runtime_started_by_the_user_is_kept(outcomes):
    assert steps(outcomes, "an_op_ran_first") == ["ok on CPU", "ok on CPU", "ok"]


def test_the_user_may_set_the_same_device_after_us(outcomes):
    assert steps(outcomes, "user_sets_the_device_after_us") == ["ok on CPU", "ok", "ok on CPU", "ok"]
