"""idefics3-batch rows with "videos" on a SmolVLM2 checkpoint: a video row answers as it does alone (processor with
the video + generate), beside image and text rows in the same batch; a bad video is that row's error record."""
import json

import pytest

from batch_workspace import read_jsonl, write_jsonl, write_picture
from mindone_idefics3.batch.cli import main

pytest.importorskip("av")
pytest.importorskip("num2words")

MAX_NEW = 8


def test_video_rows_answer_as_alone_and_bad_videos_are_error_records(tmp_path, ms_cpu):
    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor
    from mindone_idefics3.demo import make_smolvlm2, write_demo_checkpoint
    from video_files import write_video

    make_smolvlm2(write_demo_checkpoint(tmp_path / "model", seed=2), fps=1, max_frames=4)
    write_video(tmp_path / "clip.mp4", frames=60, fps=10, width=64, height=48)
    write_picture(tmp_path / "img.png", 120, 90, 0)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 300)
    rows = [{"id": "video", "prompt": "What happens?", "videos": ["clip.mp4"]},
            {"id": "image", "prompt": "What is it?", "images": ["img.png"]},
            {"id": "text", "prompt": "A picture is worth a thousand words."},
            {"id": "video-chat", "videos": ["clip.mp4"], "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Watch:"}, {"type": "video"}, {"type": "text", "text": "Summarize."}]}]},
            {"id": "broken", "prompt": "What?", "videos": ["broken.mp4"]}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    code = main(["--model", str(tmp_path / "model"), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--no-progress"])
    assert code == 0
    records = {json.dumps(r["id"]): r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert "not a video file" in records['"broken"']["error"]

    processor = Idefics3Processor.from_pretrained(tmp_path / "model")
    model = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "model", progress=False)
    for row in rows[0], rows[3]:
        messages = row.get("messages") or [{"role": "user", "content": [
            {"type": "video"}, {"type": "text", "text": row["prompt"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, videos=[tmp_path / "clip.mp4"])
        assert inputs["pixel_values"].shape[1] == 4
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW, use_jit=False)
        alone = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert records[json.dumps(row["id"])]["answer"] == alone
