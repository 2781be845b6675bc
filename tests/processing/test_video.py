"""SmolVLM2's video path against transformers 4.57.1 (SmolVLMVideoProcessor / SmolVLMProcessor), on real clips
written here with PyAV.

Frame indices, timestamps and metadata are compared with transformers' own PyAV reader driven by its
`sample_frames`; the prompt with its `expand_text_with_video_tokens` (hence the ids, tokenized by transformers'
tokenizer from the same files). Frame pixels: transformers resizes with torchvision, which cannot be imported here
(tests/video_files.py); ours are compared, within 1/255 before normalisation, with the frames transformers' reader
decoded, sized by its `get_resize_output_image_size` and resized by Pillow's antialiased BICUBIC (the filter
transformers uses for the checkpoints' LANCZOS), first to that size and then to max_image_size² — the steps of
its `resize`.
"""
import types
from fractions import Fraction

import numpy as np
import pytest

from processor_fixtures import add_idefics3_tokens, bpe_tokenizer, write_checkpoint
from video_files import smolvlm_reference, write_audio_only, write_video
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.processing import Idefics3Processor
from mindone_idefics3.processing.video import (VIDEO_CHAT_TEMPLATE, VideoSettings, load_video,
                                               sample_frame_indices)

pytest.importorskip("av")
pytest.importorskip("num2words")

SEQ_LEN = 4
# (frames, fps, width, height, sampling fps, max_frames): a clip shorter than its sampling window; one longer than
# max_frames at the target fps (both ends skipped); an odd frame rate (29.97), portrait; 2 fps sampling.
CLIPS = {
    "shorter_than_window": (60, 24, 64, 48, 1, 64),
    "longer_than_max_frames": (150, 10, 80, 44, 1, 8),
    "odd_frame_rate_portrait": (100, Fraction(30000, 1001), 36, 62, 1, 64),
    "two_fps_sampling": (50, 15, 48, 48, 2, 64),
    "many_frames_at_max": (130, 5, 40, 30, 3, 16),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {name: write_video(folder / f"{name}.mp4", frames=f, fps=r, width=w, height=h, seed=i)
            for i, (name, (f, r, w, h, *_)) in enumerate(CLIPS.items())}


@pytest.fixture(scope="module")
def smolvlm_dir(tmp_path_factory):
    """SmolVLM2-256M's processor files, sized down: image_seq_len 4, 32-px frames, video_sampling as its own."""
    tok = add_idefics3_tokens(bpe_tokenizer())
    pre = dict(image_processor_type="SmolVLMImageProcessor", processor_class="SmolVLMProcessor",
               size={"longest_edge": 4 * 32}, max_image_size={"longest_edge": 32},
               video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 32}})
    return write_checkpoint(tmp_path_factory.mktemp("smolvlm") / "ckpt", tok, image_seq_len=SEQ_LEN,
                            preprocessor=pre, tokenizer_config=dict(padding_side="left"))


def reference_read(path, fps, max_frames):
    """transformers' PyAV reader with SmolVLMVideoProcessor.sample_frames choosing the frames."""
    VideoProcessor, _, video_utils, _ = smolvlm_reference()
    owner = types.SimpleNamespace(num_frames=max_frames, fps=fps)
    return video_utils.read_video_pyav(
        str(path), sample_indices_fn=lambda metadata, **kw: VideoProcessor.sample_frames(owner, metadata))


def reference_prompt(text, metadata, frame_count):
    _, Processor, _, _ = smolvlm_reference()
    owner = types.SimpleNamespace(video_token="<video>", image_token="<image>", image_seq_len=SEQ_LEN,
                                  fake_image_token="<fake_token_around_image>", global_image_token="<global-img>")
    inputs = {"pixel_values": np.zeros((1, frame_count, 3, 1, 1)), "video_metadata": [metadata]}
    return Processor.expand_text_with_video_tokens(owner, [text], inputs)[0]


@pytest.mark.parametrize("total, video_fps, fps, max_frames", [
    (60, 24.0, 1, 64), (150, 10.0, 1, 8), (100, 30000 / 1001, 1, 64), (1, 30.0, 1, 64), (2, 25.0, 4, 64),
    (3000, 29.97, 1, 64), (3000, 60.0, 2, 16), (7, 0.5, 1, 64), (500, 25.0, 0.1, 3), (66, 1.0, 1, 64),
    (68, 1.0, 1, 64), (69, 1.0, 1, 64)])
def test_frame_indices_equal_sample_frames(total, video_fps, fps, max_frames):
    VideoProcessor, _, video_utils, _ = smolvlm_reference()
    metadata = video_utils.VideoMetadata(total_num_frames=total, fps=video_fps, duration=total / video_fps)
    owner = types.SimpleNamespace(num_frames=max_frames, fps=fps)
    ref = VideoProcessor.sample_frames(owner, metadata)
    ours = sample_frame_indices(total, video_fps, total / video_fps, fps, max_frames)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", list(CLIPS))
def test_decoded_frames_metadata_and_pixels_match(clips, name):
    import torch
    from PIL import Image

    *_, fps, max_frames = CLIPS[name]
    settings = VideoSettings(fps=fps, max_frames=max_frames, longest_edge=32, frame_size=32)
    ours = load_video(clips[name], settings)
    ref_frames, metadata = reference_read(clips[name], fps, max_frames)
    np.testing.assert_array_equal(ours.indices, metadata.frames_indices)
    assert ours.timestamps == metadata.timestamps
    assert (ours.fps, ours.total_num_frames, ours.duration) == (metadata.fps, metadata.total_num_frames,
                                                                metadata.duration)
    _, _, _, module = smolvlm_reference()
    height, width = module.get_resize_output_image_size(torch.from_numpy(ref_frames).permute(0, 3, 1, 2), 32)
    expected = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)
                                    .resize((32, 32), Image.Resampling.BICUBIC)) for f in ref_frames])
    assert ours.frames.shape == expected.shape
    assert np.abs(ours.frames.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("name", list(CLIPS))
def test_video_prompt_and_ids_equal_expand_text_with_video_tokens(clips, smolvlm_dir, name):
    from transformers import AutoTokenizer

    *_, fps, max_frames = CLIPS[name]
    processor = Idefics3Processor.from_pretrained(smolvlm_dir)
    text = "<|im_start|>User: <video>What happens?<end_of_utterance>\nAssistant:"
    out = processor(text=text, videos=[clips[name]], fps=fps, max_frames=max_frames)
    ref_frames, metadata = reference_read(clips[name], fps, max_frames)
    expected = reference_prompt(text, metadata, len(ref_frames))
    ref_ids = AutoTokenizer.from_pretrained(str(smolvlm_dir))(expected)["input_ids"]
    np.testing.assert_array_equal(out["input_ids"], [ref_ids])
    assert out["pixel_values"].shape == (1, len(ref_frames), 3, 32, 32)
    assert out["pixel_attention_mask"].all()
    assert (out["input_ids"] == processor.image_token_id).sum() == SEQ_LEN * len(ref_frames)
    # before normalisation, the pixels are the decoded frames (mean 0.5, std 0.5)
    frames = load_video(clips[name], processor.video_settings.with_options(fps, max_frames)).frames
    np.testing.assert_allclose(out["pixel_values"][0] * 0.5 + 0.5, frames.transpose(0, 3, 1, 2) / 255, atol=1e-6)


@pytest.mark.parametrize("config", [
    dict(resample=1, size={"longest_edge": 128}, max_image_size={"longest_edge": 32},
         video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 32}}),
    dict(resample=3, max_image_size={"longest_edge": 48},
         video_sampling={"fps": 2, "max_frames": 16, "video_size": {"longest_edge": 96}}),
    dict(fps=2, num_frames=8, size={"longest_edge": 64}, max_image_size={"longest_edge": 16}),
])
def test_settings_from_the_checkpoint_equal_smolvlm_video_processors(config):
    """SmolVLM2 configs: video_sampling gives fps and max_frames, and `size` wins over video_sampling.video_size
    (transformers' backward-compatible rule); video_preprocessor_config.json fields otherwise."""
    VideoProcessor, *_ = smolvlm_reference()
    ref = VideoProcessor(**config)
    ours = VideoSettings.from_config(config)
    assert (ours.fps, ours.max_frames, ours.longest_edge, ours.frame_size, ours.resample) == (
        ref.fps, ref.num_frames, ref.size["longest_edge"], ref.max_image_size["longest_edge"], ref.resample)


def test_processor_reads_video_settings_from_the_checkpoint(smolvlm_dir):
    s = Idefics3Processor.from_pretrained(smolvlm_dir).video_settings
    assert (s.fps, s.max_frames, s.longest_edge, s.frame_size, s.resample) == (1, 64, 4 * 32, 32, 1)


def test_prompt_constants_and_chat_template_are_smolvlms():
    _, Processor, _, module = smolvlm_reference()
    from mindone_idefics3.processing import video

    import transformers.models.smolvlm.processing_smolvlm as processing

    assert video.VIDEO_CHAT_TEMPLATE == processing.DEFAULT_CHAT_TEMPLATE
    assert (video.VIDEO_INTRO, video.FRAME_TIMESTAMP, video.MEDIA_OUTRO) == (
        module.DEFAULT_VIDEO_INTRO, module.FRAME_TIMESTAMP_MESSAGE, module.DEFAULT_MEDIA_OUTTRO)


def test_chat_with_a_video_item_uses_smolvlms_video_template(clips, smolvlm_dir):
    import jinja2

    processor = Idefics3Processor.from_pretrained(smolvlm_dir)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == jinja2.Environment().from_string(VIDEO_CHAT_TEMPLATE).render(messages=messages,
                                                                                    add_generation_prompt=True)
    inputs = processor.chat_inputs(messages, videos=[clips["two_fps_sampling"]], fps=2)
    assert inputs["pixel_values"].shape[1] == 7 and inputs.image_tiles == [[1] * 7]


def test_frame_count_in_words_is_the_longest_video_of_the_call(clips, smolvlm_dir):
    """As transformers (pixel_values' frame axis): two videos of 3 and 7 frames are both introduced as seven."""
    processor = Idefics3Processor.from_pretrained(smolvlm_dir)
    out = processor(text=["<video>a", "<video>b"], videos=[clips["shorter_than_window"], clips["two_fps_sampling"]],
                    fps=2, padding=True)
    text = processor.batch_decode(out["input_ids"])
    assert all("series of seven frames" in t for t in text)
    assert out["pixel_values"].shape[:2] == (2, 7)
    assert out["pixel_attention_mask"][0, 5:].sum() == 0 and not out["pixel_values"][0, 5:].any()


def test_bad_videos_each_give_one_clear_error(tmp_path, clips, smolvlm_dir):
    import av

    processor = Idefics3Processor.from_pretrained(smolvlm_dir)
    faststart = tmp_path / "faststart.mp4"
    with av.open(str(faststart), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(48):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = faststart.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) * 2 // 3])
    zeroed = bytearray(data)
    start = data.find(b"mdat") + 4
    zeroed[start:] = bytes(len(zeroed) - start)
    (tmp_path / "zero_frames.mp4").write_bytes(bytes(zeroed))
    (tmp_path / "notes.mp4").write_text("not a video\n" * 20)
    write_audio_only(tmp_path / "audio.m4a")
    cases = {"truncated.mp4": "truncated", "zero_frames.mp4": "no decodable video frames",
             "notes.mp4": "not a video file", "audio.m4a": "no video stream \\(audio only\\)",
             "missing.mp4": "video file not found"}
    for name, message in cases.items():
        with pytest.raises(Idefics3Error, match=message):
            processor(text="<video>", videos=[tmp_path / name], fps=24)
    # the processor still works afterwards (2.5 s at 1 fps: round(2.5) = 2 frames, as transformers)
    assert processor(text="<video>", videos=[clips["shorter_than_window"]])["pixel_values"].shape[1] == 2


def test_video_call_errors(clips, smolvlm_dir, tmp_path):
    from processor_fixtures import make_image

    processor = Idefics3Processor.from_pretrained(smolvlm_dir)
    with pytest.raises(Idefics3Error, match="images or videos in one call, not both"):
        processor(text="<image><video>", images=[make_image(40, 30)], videos=[clips["shorter_than_window"]])
    with pytest.raises(Idefics3Error, match="1 <video> tags in total .* but 2 videos"):
        processor(text="<video>", videos=[clips["shorter_than_window"]] * 2)
    with pytest.raises(Idefics3Error, match="fps must be a positive number"):
        processor(text="<video>", videos=[clips["shorter_than_window"]], fps=0)
    idefics_dir = write_checkpoint(tmp_path / "idefics3", add_idefics3_tokens(bpe_tokenizer()), image_seq_len=4)
    with pytest.raises(Idefics3Error, match="takes no videos"):
        Idefics3Processor.from_pretrained(idefics_dir)(text="<video>", videos=[clips["shorter_than_window"]])


def test_missing_pyav_names_the_extra(monkeypatch, clips):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(Idefics3Error, match=r'pip install "mindone_idefics3\[video\]"'):
        load_video(clips["shorter_than_window"])


# ------------------------------------------------------------------------------------------- the image path
def smolvlm_reference_processor(directory, monkeypatch, image_seq_len=SEQ_LEN):
    """transformers' SmolVLMProcessor on the same files: the slow (exact) SmolVLMImageProcessor, the tokenizer, and
    a SmolVLMVideoProcessor built on the torchvision stand-in (only constructed: the image path never uses it).
    transformers resolves the video processor's class to a placeholder (torchvision was missing when it was
    imported), so the class check of the processor's arguments is bypassed here, and only here."""
    import json

    from transformers import AutoTokenizer, SmolVLMImageProcessor
    from transformers.processing_utils import ProcessorMixin

    VideoProcessor, Processor, _, _ = smolvlm_reference()
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
    pre = json.loads((directory / "preprocessor_config.json").read_text())
    return Processor(SmolVLMImageProcessor(**pre), AutoTokenizer.from_pretrained(str(directory)),
                     VideoProcessor(**pre), image_seq_len=image_seq_len)


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
def test_image_path_equals_smolvlm_processor(smolvlm_dir, split, monkeypatch):
    from processor_fixtures import make_image

    ours = Idefics3Processor.from_pretrained(smolvlm_dir)
    ref = smolvlm_reference_processor(smolvlm_dir, monkeypatch)
    ref.image_processor.do_image_splitting = split
    images = [[make_image(100, 70, seed=1), make_image(20, 90, seed=2)], [], [make_image(128, 128, seed=3)]]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "What differs?"}]}]
    prompts = [ours.apply_chat_template(messages, add_generation_prompt=True), "no image here", "<image>and this"]
    expected = ref(text=prompts, images=images, padding=True, return_tensors="np", do_image_splitting=split)
    got = ours(text=prompts, images=images, padding=True, do_image_splitting=split)
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        assert got[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
