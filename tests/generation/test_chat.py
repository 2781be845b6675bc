"""ChatSession: each turn answers as transformers does on the whole conversation so far, while prefilling only
what the cache does not hold and encoding only the turn's new images."""
import numpy as np
import pytest
from PIL import Image

from mindone_idefics3 import ChatSession, Idefics3Processor
from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3.errors import Idefics3Error

MAX_NEW = 12


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ms_cpu):
    from mindone_idefics3.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "model")
    return path, Model.from_pretrained(path, progress=False), Idefics3Processor.from_pretrained(path)


def picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def transformers_answer(path, messages, images, stops) -> str:
    """transformers' greedy answer to the whole conversation, as a chat turn (stripped, as `ask` returns it)."""
    from reference import transformers_chat_answer

    return transformers_chat_answer(path, messages, images, MAX_NEW, stops).strip()


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "pynative"])
def test_each_turn_answers_as_transformers_on_the_whole_conversation(demo, use_jit):
    path, model, processor = demo
    chat = ChatSession(model, processor, max_new_tokens=MAX_NEW, use_jit=use_jit)
    text_model = model.model.text_model
    stops = set(chat.stop.tolist())
    turns = [("What is it?", [picture(1, 150, 100)]), ("And its colours?", None),
             ("Compare it with this one.", [picture(2, 60, 200)])]
    shapes = []
    for number, (question, images) in enumerate(turns):
        answer = chat.ask(question, images)
        assert chat.messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        assert answer == transformers_answer(path, chat.messages[:-1], chat.images, stops), number
        stats = chat.last_stats
        shapes.append(text_model.cache_shape)
        if number == 0:
            assert stats.reused_tokens == 0 and stats.vision_tiles > 1  # the photo is split into tiles
        else:  # the conversation so far comes from the cache; only the new image (if any) is encoded
            assert stats.reused_tokens >= chat.last_stats.prompt_tokens // 2 > 0
            tiles = processor.chat_inputs(*([{"role": "user", "content": [{"type": "image"}] + [
                {"type": "text", "text": "x"}]}], [images[0]])).image_tiles[0][0] if images else 0
            assert stats.vision_tiles == tiles
    assert shapes[-1][1] > shapes[0][1]  # the cache grew into a larger bucket, keeping what it held


def test_a_sampled_conversation_draws_what_generate_draws_on_the_whole_conversation(demo):
    """The demo checkpoint's greedy answers hardly depend on the prompt, so they would not notice keys read stale
    from the cache; a sampled draw does (each turn reseeds, as `generate` does)."""
    path, model, processor = demo
    options = dict(do_sample=True, temperature=1.5, top_k=0, seed=11)
    chat = ChatSession(model, processor, max_new_tokens=MAX_NEW, **options)
    stops = set(chat.stop.tolist())
    turns = []
    for question, images in [("What is it?", [picture(4, 120, 90)]), ("And its colours?", None),
                             ("Compare it with this one.", [picture(5, 70, 70)])]:
        answer = chat.ask(question, images)
        turns.append((list(chat.messages[:-1]), list(chat.images), answer, chat.last_stats.reused_tokens))
    assert all(reused > 0 for *_, reused in turns[1:])
    for number, (messages, images, answer, _) in enumerate(turns):  # (a generate in between would end the reuse)
        inputs = processor.chat_inputs(messages, images)
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, **options)[0, inputs["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        assert answer == processor.decode(out[:cut], skip_special_tokens=True).strip(), number


def test_a_generate_in_between_is_noticed_and_the_next_turn_starts_afresh(demo):
    path, model, processor = demo
    chat = ChatSession(model, processor, max_new_tokens=MAX_NEW, use_jit=False)
    chat.ask("What is it?", [picture(3, 80, 80)])
    inputs = processor.chat_inputs(chat.messages[:1], chat.images)
    model.generate(**inputs, max_new_tokens=MAX_NEW, use_jit=False)  # writes the same cache
    second = chat.ask("Describe it.")
    assert chat.last_stats.reused_tokens == 0
    fresh = ChatSession(model, processor, max_new_tokens=MAX_NEW, use_jit=False)
    fresh.messages, fresh.images = chat.messages[:2], chat.images
    assert second == fresh.ask("Describe it.")


def test_a_turn_over_the_context_is_an_error_and_the_session_goes_on(demo):
    path, model, processor = demo
    chat = ChatSession(model, processor, max_new_tokens=MAX_NEW, use_jit=False)
    chat.ask("Hello?")
    messages = list(chat.messages)
    with pytest.raises(Idefics3Error, match="beyond the model's context of 2048 tokens"):
        chat.ask("words " * 2100)
    assert chat.messages == messages
    chat.ask("And now?")
    assert chat.last_stats.reused_tokens > 0 and len(chat.messages) == 4
    chat.reset()
    assert chat.messages == [] and chat.images == []
    chat.ask("Again?")
    assert chat.last_stats.reused_tokens == 0
