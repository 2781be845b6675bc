"""`generate.py`: the demo end to end (subprocess), --help, and user mistakes → one line on stderr, exit code 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindone_idefics3.processing import load_image

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, env=None, timeout=300):
    full_env = {**os.environ, "GLOG_v": "3", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint, write_demo_image

    d = tmp_path_factory.mktemp("demo")
    write_demo_checkpoint(d / "model")
    write_demo_image(d / "img.png")
    return d


def test_demo_runs_end_to_end():
    r = run_cli("--demo", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "random-weight" in r.stderr and "meaningless" in r.stderr
    assert "prompt tokens" in r.stderr and "tokens/s" in r.stderr and "time to first token" in r.stderr
    assert "[WARNING]" not in r.stderr and "[ERROR]" not in r.stderr  # only our own messages
    assert r.stdout.strip()  # some (meaningless) text was streamed


def test_json_output_matches_the_python_api(demo_dir):
    """The CLI's answer equals processor + model.generate + batch_decode (the seed-style script)."""
    r = run_cli("--model", str(demo_dir / "model"), "--image", str(demo_dir / "img.png"), "--prompt", "What is it?",
                "--max-new-tokens", "10", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["new_tokens"] <= 10 and out["prompt_tokens"] > 0

    from PIL import Image

    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor

    processor = Idefics3Processor.from_pretrained(demo_dir / "model")
    model = Idefics3ForConditionalGeneration.from_pretrained(demo_dir / "model")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[[Image.open(demo_dir / "img.png")]], return_tensors="np")
    ids = model.generate(**inputs, max_new_tokens=10)
    assert out["prompt_tokens"] == inputs["input_ids"].shape[1]
    text = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert out["answer"] == text


@pytest.fixture(autouse=True, scope="module")
def private_cache_home(tmp_path_factory):
    """The CLI's compile cache goes under $XDG_CACHE_HOME: a temporary one here, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache_home")))
        yield


def test_compile_cache_is_reused_within_a_bucket_and_never_mixed_up(demo_dir, tmp_path):
    """Runs of one prompt bucket share cached graphs and answer as without a cache; other shapes (no image, a
    sampled run) get their own directory instead of loading the wrong graphs."""
    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor

    cache = tmp_path / "graphs"
    model = Idefics3ForConditionalGeneration.from_pretrained(demo_dir / "model", progress=False)
    processor = Idefics3Processor.from_pretrained(demo_dir / "model")
    runs = [("What is it?", True), ("What is this thing?", True), ("Hi", False)]
    dirs = []
    for prompt, with_image in runs + runs[:1]:
        image = ["--image", str(demo_dir / "img.png")] if with_image else []
        r = run_cli("--model", str(demo_dir / "model"), *image, "--prompt", prompt, "--max-new-tokens", "6",
                    "--json", "--compile-cache", str(cache))
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        dirs.append(out["compile_cache"])
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        images = [[load_image(str(demo_dir / "img.png"))]] if with_image else None
        inputs = processor(text=text, images=images, return_tensors="np")
        ids = model.generate(**inputs, max_new_tokens=6)
        assert out["answer"] == processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)[0], prompt
    assert dirs[0] == dirs[1] == dirs[3] != dirs[2]
    assert all(Path(d).parent == cache for d in dirs)
    assert len(list((Path(dirs[0]) / "rank_0" / "graph_cache").glob("compile_cache_*.mindir"))) >= 2
    r = run_cli("--model", str(demo_dir / "model"), "--prompt", "Hi", "--json", "--no-compile-cache",
                "--max-new-tokens", "3")
    assert r.returncode == 0 and json.loads(r.stdout)["compile_cache"] is None


def test_help_documents_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--model", "--image", "--prompt", "--max-new-tokens", "--dtype", "--device", "--temperature",
                 "--top-p", "--top-k", "--seed", "--longest-edge", "--no-image-splitting", "--system", "--no-stream",
                 "--json", "--demo", "--no-jit", "--repetition-penalty", "--compile-cache", "--no-compile-cache"):
        assert flag in r.stdout
    assert "HuggingFaceM4/Idefics3-8B-Llama3" in r.stdout


@pytest.mark.parametrize("case", ["missing_image", "unreadable_image", "too_long", "bf16_on_cpu", "ascend_absent",
                                  "no_weights", "offline_repo", "unknown_dtype"])
def test_user_mistakes_exit_2_with_one_line(case, demo_dir, tmp_path):
    model = ["--model", str(demo_dir / "model")]
    img = ["--image", str(demo_dir / "img.png")]
    env = None
    if case == "missing_image":
        args, expect = model + ["--image", str(tmp_path / "nope.jpg")], "nope.jpg"
    elif case == "unreadable_image":
        (tmp_path / "bad.jpg").write_bytes(b"not an image")
        args, expect = model + ["--image", str(tmp_path / "bad.jpg")], "bad.jpg"
    elif case == "too_long":
        args, expect = model + img + ["--max-new-tokens", "5000"], "beyond the model's context of 2048"
    elif case == "bf16_on_cpu":
        args, expect = model + img + ["--dtype", "bf16"], "bf16 is not supported by MindSpore's CPU backend"
    elif case == "ascend_absent":
        args, expect = model + img + ["--device", "Ascend"], "no Ascend NPU is usable"
    elif case == "no_weights":
        empty = tmp_path / "m"
        empty.mkdir()
        (empty / "config.json").write_text((demo_dir / "model" / "config.json").read_text())
        for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                  "chat_template.json", "special_tokens_map.json"):
            (empty / f).write_text((demo_dir / "model" / f).read_text())
        args, expect = ["--model", str(empty)] + img, "has no weights"
    elif case == "offline_repo":
        args, expect = ["--model", "someorg/some-model"] + img, "HF_HUB_OFFLINE is set"
        env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    elif case == "unknown_dtype":
        args, expect = model + img + ["--dtype", "fp8"], "invalid choice: 'fp8'"
    if "--max-new-tokens" not in args:
        args += ["--max-new-tokens", "4"]
    r = run_cli(*args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expect in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_chat_from_stdin_answers_as_the_python_api(demo_dir, ms_cpu):
    """generate.py --chat: turns from stdin, /image, an over-long turn refused without ending the session, /reset,
    /exit; each answer is ChatSession's for the same turns."""
    from mindone_idefics3 import ChatSession, Idefics3ForConditionalGeneration, Idefics3Processor

    image = str(demo_dir / "img.png")
    lines = [f"/image {image}", "What is it?", "And the colours?", "words " * 2100, "/image nope.png", "/bogus",
             "/reset", "Hello?", "/exit", "never read"]
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(demo_dir / "model"), "--chat",
                        "--max-new-tokens", "8"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                       timeout=600, env={**os.environ, "GLOG_v": "3"}, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    model = Idefics3ForConditionalGeneration.from_pretrained(demo_dir / "model", progress=False)
    chat = ChatSession(model, Idefics3Processor.from_pretrained(demo_dir / "model"), max_new_tokens=8)
    expected = [chat.ask("What is it?", [load_image(image)]), chat.ask("And the colours?")]
    chat.reset()
    expected.append(chat.ask("Hello?"))
    assert [line.strip() for line in r.stdout.splitlines()] == expected
    stats = [line for line in r.stderr.splitlines() if "from the conversation's cache" in line]
    assert len(stats) == 3 and " 0 from the conversation's cache" in stats[0]
    assert " 0 from the conversation's cache, 0 image tiles encoded" not in stats[1]  # the second turn reused
    assert "beyond the model's context" in r.stderr and "image file not found" in r.stderr
    assert "'/bogus' is not a command" in r.stderr and "[the conversation starts again]" in r.stderr
