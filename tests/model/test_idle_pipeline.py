"""runtime.idle_pipeline: MindSpore's spinning pipeline thread runs under SCHED_IDLE inside the context (compiled
graph loops), under the normal policy outside it (PyNative ops run on that thread), and the switch is honoured.

Each case runs in a fresh interpreter: the policy is process state, and the thread is MindSpore's own.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies only")

SCRIPT = """
import json, os
import mindspore as ms
from mindone_idefics3 import device, runtime
device.select_device("CPU")
(ms.Tensor(1.0) + 1).asnumpy()  # MindSpore starts its pipeline threads with the first op

def policies():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        name = open(f"/proc/self/task/{tid}/comm").read().strip()
        out.setdefault(name, []).append(os.sched_getscheduler(int(tid)))
    return out

record = {"before": policies()}
try:
    with runtime.idle_pipeline():
        record["inside"] = policies()
        with runtime.idle_pipeline():
            pass
        record["after_nested"] = policies()
    record["after"] = policies()
    with runtime.idle_pipeline():
        record["again"] = policies()
    for tid in os.listdir("/proc/self/task"):  # a policy someone else gave the thread comes back too
        if open(f"/proc/self/task/{tid}/comm").read().strip() == "frontend_queue":
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
    with runtime.idle_pipeline():
        record["inside_batch"] = policies()
    record["after_batch"] = policies()
except Exception as exc:  # the tests read the message
    record["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(record))
"""


def run(env_value):
    env = dict(os.environ)
    env.pop("MINDONE_IDLE_PIPELINE", None)
    if env_value is not None:
        env["MINDONE_IDLE_PIPELINE"] = env_value
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spinning(policies):
    return policies["frontend_queue"]


def test_the_pipeline_thread_is_idle_inside_only():
    record = run(None)
    assert "error" not in record, record
    assert set(spinning(record["before"])) == {os.SCHED_OTHER}
    assert set(spinning(record["inside"])) == {os.SCHED_IDLE}
    assert set(spinning(record["after_nested"])) == {os.SCHED_IDLE}  # the inner context does not restore it
    assert set(spinning(record["after"])) == {os.SCHED_OTHER}
    assert set(spinning(record["again"])) == {os.SCHED_IDLE}
    assert set(spinning(record["inside_batch"])) == {os.SCHED_IDLE}
    assert set(spinning(record["after_batch"])) == {os.SCHED_BATCH}
    others = [p for name, ps in record["inside"].items() if name != "frontend_queue" for p in ps]
    assert set(others) == {os.SCHED_OTHER}  # the kernel threads and Python keep theirs


def test_switched_off_by_the_environment():
    record = run("0")
    assert "error" not in record, record
    assert set(spinning(record["inside"])) == {os.SCHED_OTHER}


def test_a_bad_switch_value_is_a_clear_error():
    record = run("maybe")
    assert "MINDONE_IDLE_PIPELINE must be 1" in record["error"]
    assert record["error"].startswith("Idefics3Error")
