"""`generate.py --video` on a SmolVLM2 checkpoint (the demo's shapes, model_type smolvlm, SmolVLM2's processor
files) with a clip written by PyAV: the answer equals the Python API's, and video mistakes are one error line."""
import json
import shutil

import pytest

from test_cli import run_cli

pytest.importorskip("av")
pytest.importorskip("num2words")


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    from mindone_idefics3.demo import make_smolvlm2, write_demo_checkpoint, write_demo_image
    from video_files import write_video

    d = tmp_path_factory.mktemp("smolvlm2")
    make_smolvlm2(write_demo_checkpoint(d / "model"), fps=1, max_frames=8)
    write_video(d / "clip.mp4", frames=72, fps=12, width=96, height=54)
    write_demo_image(d / "img.png")
    return d


def test_video_answer_equals_the_python_api(smol_dir):
    r = run_cli("--model", str(smol_dir / "model"), "--video", str(smol_dir / "clip.mp4"), "--fps", "2",
                "--max-frames", "5", "--prompt", "What happens?", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)

    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor

    processor = Idefics3Processor.from_pretrained(smol_dir / "model")
    model = Idefics3ForConditionalGeneration.from_pretrained(smol_dir / "model")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=[smol_dir / "clip.mp4"], fps=2, max_frames=5)
    assert inputs["pixel_values"].shape[1] == 5  # 6 s at 2 fps, at most 5 frames
    assert "series of five frames from a 0:00:06" in processor.decode(inputs["input_ids"][0])
    ids = model.generate(**inputs, max_new_tokens=6)
    assert out["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert out["answer"] == processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def test_video_mistakes_are_one_line(smol_dir, tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    small = tmp_path / "small_context"
    shutil.copytree(smol_dir / "model", small)
    config = json.loads((small / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 128
    (small / "config.json").write_text(json.dumps(config))
    cases = [
        (["--video", str(tmp_path / "notes.mp4")], "is not a video file"),
        (["--video", str(smol_dir / "clip.mp4"), "--image", str(smol_dir / "img.png")], "cannot be combined"),
        (["--fps", "2"], "apply to --video"),
        (["--video", str(smol_dir / "clip.mp4"), "--max-frames", "0"], "at least 1"),
        (["--model", str(small), "--video", str(smol_dir / "clip.mp4")], "beyond the model's context .* fewer "
                                                                         "video frames"),
    ]
    for extra, message in cases:
        args = ["--model", str(smol_dir / "model"), *extra] if "--model" not in extra else extra
        r = run_cli(*args, "--max-new-tokens", "4")
        assert r.returncode == 2, (extra, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (extra, r.stderr)
        import re

        assert re.search(message, lines[0]), (extra, lines[0])
