"""Fine-tuning data with videos (SmolVLM2): ids and pixels are the processor's own for the conversation with its
video, the labels score only the answers, and `idefics3-finetune` trains on such a file."""
import json

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("num2words")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from mindone_idefics3.demo import make_smolvlm2, write_demo_checkpoint
    from mindone_idefics3.processing import Idefics3Processor
    from video_files import write_video

    d = tmp_path_factory.mktemp("ft_video")
    make_smolvlm2(write_demo_checkpoint(d / "model"), fps=1, max_frames=3)
    (d / "clips").mkdir()
    write_video(d / "clips" / "a.mp4", frames=40, fps=10, width=64, height=48)
    rows = [{"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "A small square."}]}],
             "videos": ["clips/a.mp4"]},
            {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]}]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, Idefics3Processor.from_pretrained(d / "model")


def test_video_example_is_the_processors_inputs_with_answer_labels(smol):
    from mindone_idefics3.finetune.data import Labeler, TrainingData

    d, processor = smol
    data = TrainingData.open(d / "train.jsonl")
    assert data[0].videos == [str(d / "clips" / "a.mp4")]
    sample = Labeler(processor)(data[0])
    text = processor.apply_chat_template(data[0].messages)
    ref = processor(text=text, videos=[d / "clips" / "a.mp4"])
    np.testing.assert_array_equal(sample["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(sample["pixel_values"], ref["pixel_values"])
    assert sample["pixel_values"].shape[1] == 3
    labels = sample["labels"][0]
    assert processor.decode(labels[labels != -100]) == " A small square.<end_of_utterance>"


def test_bad_video_rows_name_their_line(smol, tmp_path):
    from mindone_idefics3.errors import Idefics3Error
    from mindone_idefics3.finetune.data import TrainingData

    row = {"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}]}
    for extra, message in (({}, "1 {\"type\": \"video\"} item\\(s\\) but 0 video"),
                           ({"videos": ["nope.mp4"]}, "video 'nope.mp4' not found")):
        (tmp_path / "t.jsonl").write_text(json.dumps({**row, **extra}) + "\n")
        with pytest.raises(Idefics3Error, match="line 1.*" + message):
            TrainingData.open(tmp_path / "t.jsonl")


def test_finetune_runs_on_video_data(smol, tmp_path, ms_cpu):
    from mindone_idefics3.finetune.cli import main

    d, _ = smol
    assert main(["--model", str(d / "model"), "--data", str(d / "train.jsonl"), "-o", str(tmp_path / "out"),
                 "--max-steps", "2", "--batch-size", "2", "--no-progress"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
