"""Fine-tuning data: the JSONL reader, labels from the chat template's text, collation."""
import json

import numpy as np
import pytest

from finetune_data import write_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint
    from mindone_idefics3.processing import Idefics3Processor

    path = write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "model")
    return path, Idefics3Processor.from_pretrained(path)


def _scored_text(processor, sample):
    labels = sample["labels"][0]
    return processor.decode(labels[labels != -100])


def test_assistant_labels_are_the_answers_and_their_end_of_utterance(demo, tmp_path):
    from mindone_idefics3.finetune.data import Labeler, TrainingData

    _, processor = demo
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
                {"role": "user", "content": [{"type": "text", "text": "And that?"}, {"type": "image"}]},
                {"role": "assistant", "content": "Two circles, one blue."}]
    write_dataset(tmp_path, 1)  # for the images folder
    (tmp_path / "multi.jsonl").write_text(json.dumps({"messages": messages,
                                                      "images": ["img/0_0.png", "img/0_0.png"]}) + "\n")
    data = TrainingData.open(tmp_path / "multi.jsonl")
    sample = Labeler(processor)(data[0])
    # exactly the assistant contents, each with its closing <end_of_utterance>, nothing else
    assert _scored_text(processor, sample) == " A red square.<end_of_utterance> Two circles, one blue.<end_of_utterance>"
    # the ids and pixels are the processor's own for the rendered conversation (the two tags expanded alike)
    text = processor.apply_chat_template(messages)
    ref = processor(text=text, images=[[str(tmp_path / "img/0_0.png")] * 2])
    np.testing.assert_array_equal(sample["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(sample["pixel_values"], ref["pixel_values"])
    # --train-on all: everything but <image> (the notebook's convention) and the first token (nothing before it
    # in the example predicts it; after left padding a pad would)
    every = Labeler(processor, "all")(data[0])
    ids = every["input_ids"][0]
    expected = ids == processor.image_token_id
    expected[0] = True
    np.testing.assert_array_equal(every["labels"][0] == -100, expected)
    assert (sample["labels"][0] != -100).sum() < (every["labels"][0] != -100).sum()


def test_assistant_first_and_text_only(demo, tmp_path):
    from mindone_idefics3.finetune.data import Example, Labeler

    _, processor = demo
    messages = [{"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "How can I help?"}]
    sample = Labeler(processor)(Example(1, messages, []))
    assert _scored_text(processor, sample) == " Hello there.<end_of_utterance> How can I help?<end_of_utterance>"
    assert "pixel_values" not in sample


def test_reader_is_lazy_and_resolves_images(demo, tmp_path):
    from mindone_idefics3.finetune.data import TrainingData

    path = write_dataset(tmp_path / "sub", 8)
    (tmp_path / "sub" / "train.jsonl").write_text("\n" + path.read_text().replace("\n", "\n\n"))  # blank lines
    data = TrainingData.open(tmp_path / "sub" / "train.jsonl")
    assert len(data) == 8 and not hasattr(data, "examples")
    assert data[0].line == 2 and data[1].line == 4
    assert data[0].images == [str(tmp_path / "sub" / "img" / "0_0.png")]
    assert data[2].images[0].startswith("data:image/png;base64,")


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}', "line 2 is not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2 has no assistant turn"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]}',
     r"line 2 has 1 \{\"type\": \"image\"\} item\(s\) but 0 image"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}], '
     '"images": ["nope.png"]}', "line 2: image 'nope.png' not found"),
    ('[1, 2]', "line 2 must be a JSON object"),
])
def test_bad_lines_name_their_line(tmp_path, line, message):
    from mindone_idefics3.errors import Idefics3Error
    from mindone_idefics3.finetune.data import TrainingData

    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    (tmp_path / "d.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(Idefics3Error, match=message):
        TrainingData.open(tmp_path / "d.jsonl")


def test_empty_dataset_is_refused(tmp_path):
    from mindone_idefics3.errors import Idefics3Error
    from mindone_idefics3.finetune.data import TrainingData

    (tmp_path / "d.jsonl").write_text("\n  \n")
    with pytest.raises(Idefics3Error, match="holds no example"):
        TrainingData.open(tmp_path / "d.jsonl")


def test_collate_pads_left_with_ignored_labels(demo, tmp_path):
    from mindone_idefics3.finetune.data import Labeler, TrainingData, collate_examples, scored_tokens

    _, processor = demo
    data = TrainingData.open(write_dataset(tmp_path, 4))
    labeler = Labeler(processor)
    samples = [labeler(data[i]) for i in range(4)]
    batch = collate_examples(samples, processor.tokenizer.pad_token_id)
    lengths = [s["input_ids"].shape[1] for s in samples]
    assert batch["input_ids"].shape == (4, max(lengths)) and len(set(lengths)) > 1
    for b, s in enumerate(samples):
        pad = max(lengths) - lengths[b]
        assert (batch["attention_mask"][b, :pad] == 0).all() and (batch["labels"][b, :pad] == -100).all()
        np.testing.assert_array_equal(batch["labels"][b, pad:], s["labels"][0])
    assert batch["pixel_values"].shape[1] == 2 * 5  # the two-image example: 2 × (4 tiles + global)
    assert scored_tokens(batch["labels"]) == sum(int((s["labels"][0][1:] != -100).sum()) for s in samples)
