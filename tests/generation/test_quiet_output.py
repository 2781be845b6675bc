"""Only our own messages reach a library user's terminal: no MindSpore [WARNING] lines from choosing the device
or from compiling graphs, while generate() compiles new graphs for new shapes (Python API, a fresh process)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from inputs import make_batch
    from conftest import Checkpoint
    from pathlib import Path
    from mindone_idefics3 import Idefics3ForConditionalGeneration

    ckpt = Checkpoint(Path(sys.argv[1]), "a")
    model = Idefics3ForConditionalGeneration.from_pretrained(sys.argv[1], progress=False)
    for images, text in (([1], [7]), ([2], [9]), ([0], [15]), ([1, 2], [5, 12])):
        ids, mask, pv, pam = make_batch(ckpt, images, text, np.random.default_rng(len(text)))
        out = model.generate(ids, mask, pv, pam, max_new_tokens=4, eos_token_id=[])
        assert out.shape == (ids.shape[0], ids.shape[1] + 4)
    print("done")
""")


def test_generate_with_changing_shapes_prints_no_mindspore_warning(ckpt_a, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}  # MindSpore's default log level, as a user has
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # this checkout's package
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(ckpt_a.path), str(ROOT / "tests")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-3000:]
    noise = [line for line in r.stderr.splitlines() if "[WARNING]" in line or "[ERROR]" in line]
    assert not noise, "\n".join(noise[:5])
