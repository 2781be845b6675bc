"""The fine-tuning command: it learns, resumes to the same losses, refuses bad input cleanly."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune_data import write_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("ft")
    model = write_demo_checkpoint(root / "model")
    data = write_dataset(root / "data", 8)
    return root, model, data


def losses(out):
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def test_a_tiny_model_fits_eight_examples(workspace, ms_cpu):
    from mindone_idefics3.finetune.cli import main

    root, model, data = workspace
    out = root / "learn"
    assert main(["--model", str(model), "--data", str(data), "-o", str(out), "--max-steps", "16",
                 "--batch-size", "8", "--learning-rate", "2e-2", "--lr-scheduler", "constant", "--lora-rank", "16",
                 "--lora-alpha", "32", "--lora-dropout", "0", "--no-image-splitting", "--no-progress",
                 "--eval-data", str(data)]) == 0
    log = losses(out)
    train = [r["loss"] for r in log if "loss" in r]
    assert len(train) == 16 and train[-1] < 0.1 * train[0], train
    assert log[-1]["step"] == 16 and log[-1]["eval_loss"] < 0.1 * train[0]
    assert {"step", "loss", "lr", "tokens", "seconds"} <= set(log[0])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_resume_logs_the_same_losses_as_an_uninterrupted_run(workspace, ms_cpu, monkeypatch):
    from mindone_idefics3.finetune import trainer as trainer_module
    from mindone_idefics3.finetune.cli import main

    root, model, data = workspace
    common = ["--model", str(model), "--data", str(data), "--max-steps", "4", "--batch-size", "2",
              "--grad-accum", "2", "--save-steps", "2", "--learning-rate", "1e-3", "--warmup-steps", "1",
              "--weight-decay", "0.1", "--lora-dropout", "0.1", "--no-image-splitting", "--no-progress"]
    assert main(common + ["-o", str(root / "straight")]) == 0

    real_log = trainer_module.Trainer.log

    def stop_at_step_3(self, record):
        if record.get("step") == 3:
            raise KeyboardInterrupt
        real_log(self, record)

    monkeypatch.setattr(trainer_module.Trainer, "log", stop_at_step_3)
    assert main(common + ["-o", str(root / "resumed")]) == 130
    assert [r["step"] for r in losses(root / "resumed")] == [1, 2]
    monkeypatch.setattr(trainer_module.Trainer, "log", real_log)
    assert main(common + ["-o", str(root / "resumed"), "--resume"]) == 0
    straight, resumed = losses(root / "straight"), losses(root / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    a = (root / "straight" / "adapter_model.safetensors").read_bytes()
    assert a == (root / "resumed" / "adapter_model.safetensors").read_bytes()
    # a resume with other options is refused
    assert main(common[:-2] + ["--seed", "5", "--no-progress", "-o", str(root / "resumed"), "--resume"]) == 2


def _bad_cases(root, model, data):
    d = root / "bad"
    d.mkdir(exist_ok=True)
    good = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                         {"role": "assistant", "content": "x"}], "images": ["../data/img/0_0.png"]}
    files = {
        "missing_image": [dict(good, images=["missing.png"])],
        "tag_count": [dict(good, images=[])],
        "malformed": [good, "{not json"],
        "empty": [],
        "no_assistant": [{"messages": good["messages"][:1], "images": good["images"]}],
    }
    for name, lines in files.items():
        (d / f"{name}.jsonl").write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                                                 for line in lines))
    base = ["--model", str(model), "--max-steps", "1", "--no-progress"]
    existing = root / "existing"
    existing.mkdir(exist_ok=True)
    (existing / "keep.txt").write_text("mine")
    return {
        "missing_image": (base + ["--data", str(d / "missing_image.jsonl")], "image 'missing.png' not found"),
        "tag_count": (base + ["--data", str(d / "tag_count.jsonl")], "1 {\"type\": \"image\"} item(s) but 0"),
        "malformed": (base + ["--data", str(d / "malformed.jsonl")], "line 2 is not valid JSON"),
        "empty": (base + ["--data", str(d / "empty.jsonl")], "holds no example"),
        "no_assistant": (base + ["--data", str(d / "no_assistant.jsonl")], "line 1 has no assistant turn"),
        "unknown_target": (base + ["--data", str(data), "--lora-targets", "q_proj,qkv"],
                           "unknown module name 'qkv'"),
        "rank_zero": (base + ["--data", str(data), "--lora-rank", "0"], "--lora-rank must be at least 1"),
        "existing_out": (base + ["--data", str(data)], "already exists and is not empty"),
    }


@pytest.mark.parametrize("case", ["missing_image", "tag_count", "malformed", "empty", "no_assistant",
                                  "unknown_target", "rank_zero", "existing_out"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(workspace, ms_cpu, capsys, case):
    from mindone_idefics3.finetune.cli import main

    root, model, data = workspace
    argv, message = _bad_cases(root, model, data)[case]
    out = root / "existing" if case == "existing_out" else root / f"out_{case}"
    capsys.readouterr()
    assert main(argv + ["-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if case == "existing_out":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def test_command_line_entry_points(workspace):
    """finetune.py and python -m agree; a bad input in a fresh process prints exactly one stderr line."""
    root, model, data = workspace
    help_text = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    assert "--lora-targets" in help_text and "msrun" in help_text
    run = subprocess.run([sys.executable, "-m", "mindone_idefics3.finetune", "--model", str(model), "--data",
                          str(data), "-o", str(root / "x"), "--lora-rank", "0"], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --lora-rank must be at least 1, got 0"]


def test_merge_writes_a_full_checkpoint_that_generates_like_the_adapter(workspace, ms_cpu, capsys):
    from mindone_idefics3.cli import main as generate
    from mindone_idefics3.finetune.cli import main

    root, model, data = workspace
    out = root / "merge"
    assert main(["--model", str(model), "--data", str(data), "-o", str(out), "--max-steps", "2", "--batch-size",
                 "4", "--learning-rate", "5e-2", "--lora-dropout", "0", "--no-image-splitting", "--no-progress",
                 "--merge"]) == 0
    merged = sorted(p.name for p in (out / "merged").iterdir())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "chat_template.json", "generation_config.json"):
        assert name in merged
    image = str(next((data.parent / "img").glob("*.png")))
    answers = []
    for flags in (["--model", str(model), "--adapter", str(out)], ["--model", str(out / "merged")],
                  ["--model", str(model)]):
        capsys.readouterr()
        assert generate(flags + ["--image", image, "--max-new-tokens", "6", "--json", "--no-compile-cache",
                                 "--no-image-splitting"]) == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
    assert answers[0] == answers[1]
    assert answers[0] != answers[2]  # the adapter changed what the model says


def test_full_fine_tuning_writes_the_model_to_out(workspace, ms_cpu):
    from safetensors.numpy import load_file

    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.finetune.cli import main

    root, model, data = workspace
    out = root / "full"
    assert main(["--model", str(model), "--data", str(data), "-o", str(out), "--max-steps", "1", "--batch-size",
                 "2", "--full", "--learning-rate", "1e-3", "--no-image-splitting", "--no-progress"]) == 0
    before, after = load_file(str(model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name in before:
        same = np.array_equal(before[name], after[name])
        if name.startswith("model.vision_model."):
            assert same, name  # frozen without --train-vision
        elif name in ("model.text_model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                      "model.connector.modality_projection.proj.weight"):
            assert not same, name
    assert (out / "tokenizer.json").is_file() and (out / "train_log.jsonl").is_file()
    Idefics3ForConditionalGeneration.from_pretrained(out, progress=False)
