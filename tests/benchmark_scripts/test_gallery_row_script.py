"""benchmarks/gallery_row.py: the README's command for a gallery performance row prints that row (tiny preset, CPU),
and refuses an attention the device cannot run instead of measuring another one."""
import re

from script_runs import run_script


def test_prints_one_row_in_the_gallery_columns(tmp_path):
    r = run_script("gallery_row.py", "--preset", "tiny", "--work-dir", str(tmp_path), "--new-tokens", "4",
                   "--prompt-tokens", "8", "--repeats", "1", "--attn-implementation", "eager")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    header = lines.index("| model name | precision | cards | fa | tokens/s | weight |")
    row = lines[header + 2]
    m = re.fullmatch(r"\| tiny \| fp32 \| 1 \| OFF \| (\d+\.\d\d) \| random weights \(tiny shapes\) \|", row)
    assert m and float(m.group(1)) > 0, row
    assert lines[0].startswith("- mindspore ") and "Machine:" in r.stdout  # the release and machine of the row


def test_flash_attention_on_the_cpu_is_refused(tmp_path):
    r = run_script("gallery_row.py", "--preset", "tiny", "--work-dir", str(tmp_path), "--device", "CPU",
                   "--dtype", "fp16", "--attn-implementation", "flash_attention_2")
    assert r.returncode == 2 and "needs an Ascend NPU" in r.stderr and "| model name |" not in r.stdout
