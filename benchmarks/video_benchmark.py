"""`generate.py --video` beside transformers on a SmolVLM2-shaped checkpoint and a 10-second 640×360 clip.

    python benchmarks/video_benchmark.py [--work-dir DIR] [--max-new-tokens 16]

The checkpoint: the smolvlm-256m preset's random weights (SmolVLM2-256M has SmolVLM-256M's shapes) turned into a
SmolVLM2 one (`demo.make_smolvlm2`: model_type smolvlm, video_sampling fps 1 / max 64 frames). The clip: 10 s,
640×360, 30 fps, written with PyAV. Each side runs in a fresh process and reports its peak RSS and times:

- ours: `generate.py --video clip.mp4 --json` at default settings (decoding, frame sampling, vision, prefill and
  decode; no compile cache);
- transformers: `SmolVLMForConditionalGeneration.from_pretrained` + `generate` (greedy, same number of new
  tokens) on the same model inputs. transformers' own video processor needs torchvision, whose PyPI wheels do not
  run with the CPU torch of these machines, so its inputs are ours, saved to an .npz (tests/processing/
  test_video.py shows they are the ones its processor gives, frames within 1/255): its times and memory leave out
  decoding the clip.

Prints one JSON object and writes it to benchmarks/results/video-smolvlm2-256m-cpu.json (with the machine: CPU
model, cores, load average at start and end).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reference(model_dir: str, inputs_file: str, new_tokens: int) -> None:
    """The transformers side (run in its own process): load, generate, report."""
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from transformers import SmolVLMForConditionalGeneration

    from mindone_idefics3.process import peak_rss_bytes
    from tests.reference import corrected_position_ids

    t_load = time.perf_counter()
    model = SmolVLMForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_seconds = time.perf_counter() - t_load
    data = np.load(inputs_file)
    kwargs = {k: torch.from_numpy(data[k]) for k in data.files}
    kwargs["pixel_attention_mask"] = kwargs["pixel_attention_mask"].bool()
    t_gen = time.perf_counter()
    with torch.no_grad(), corrected_position_ids():
        out = model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    generate_seconds = time.perf_counter() - t_gen
    print(json.dumps(dict(load_seconds=round(load_seconds, 2), generate_seconds=round(generate_seconds, 2),
                          total_seconds=round(time.perf_counter() - t0, 2),
                          peak_host_memory_mb=round(peak_rss_bytes() / 2**20, 1),
                          new_ids=out[0, kwargs["input_ids"].shape[1]:].tolist(), torch_threads=torch.get_num_threads())))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/mindone-idefics3-bench", help="where the checkpoint and clip go")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "video-smolvlm2-256m-cpu.json"))
    p.add_argument("--reference-run", nargs=3, metavar=("MODEL", "NPZ", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference_run:
        reference(args.reference_run[0], args.reference_run[1], int(args.reference_run[2]))
        return 0

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np

    from bench.machine import describe, finish, usable_cores
    from bench.presets import ensure_preset
    from mindone_idefics3.demo import make_smolvlm2
    from tests.video_files import write_video

    work = Path(args.work_dir)
    machine = describe(usable_cores(), "CPU", reference=True)
    model_dir = work / "smolvlm2-256m"
    if not (model_dir / "config.json").is_file() or "smolvlm" not in (model_dir / "config.json").read_text():
        base = ensure_preset("smolvlm-256m", work)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(base, model_dir)
        make_smolvlm2(model_dir, fps=1, max_frames=64)
    clip = work / "clip-10s-640x360.mp4"
    if not clip.is_file():
        write_video(clip, frames=300, fps=30, width=640, height=360)
    prompt = "What happens in this video?"
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": str(ROOT)}

    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(model_dir), "--video", str(clip),
                        "--prompt", prompt, "--max-new-tokens", str(args.max_new_tokens), "--json",
                        "--no-compile-cache"], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return r.returncode
    ours = json.loads(r.stdout)

    from mindone_idefics3.processing import Idefics3Processor

    processor = Idefics3Processor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    inputs = processor.chat_inputs(messages, videos=[clip])
    npz = work / "video-inputs.npz"
    np.savez(npz, **{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")})
    r = subprocess.run([sys.executable, __file__, "--reference-run", str(model_dir), str(npz),
                        str(ours["new_tokens"])], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return r.returncode
    ref = json.loads(r.stdout.strip().splitlines()[-1])
    finish(machine)
    result = dict(
        checkpoint="smolvlm-256m preset shapes as SmolVLM2 (random weights, fp32)", clip="10 s, 640x360, 30 fps",
        frames=int(inputs["pixel_values"].shape[1]), prompt_tokens=ours["prompt_tokens"],
        new_tokens=ours["new_tokens"], same_new_ids=ours["new_ids"] == ref["new_ids"][:len(ours["new_ids"])],
        ours={k: ours[k] for k in ("total_seconds", "processor_seconds", "load_seconds", "vision_seconds",
                                   "prefill_seconds", "time_to_first_token", "decode_tokens_per_second",
                                   "peak_host_memory_mb")},
        transformers=dict(ref, note="inputs from our processor (its video processor needs torchvision); times "
                                    "and memory leave out decoding the clip"),
        machine=machine)
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
