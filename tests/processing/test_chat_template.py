"""Chat templates render exactly as transformers' processor renders them, from the same checkpoint files."""
import json

import pytest

from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.processing import Idefics3Processor
from processor_fixtures import CHAT_TEMPLATE, add_idefics3_tokens, bpe_tokenizer, reference, write_checkpoint


def user(*items):
    return {"role": "user", "content": list(items)}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMAGE = {"type": "image"}


def text(value):
    return {"type": "text", "text": value}


CONVERSATIONS = [
    [user(IMAGE, text("What do we see in this image?"))],
    [user(IMAGE, text("What is this?")), assistant("A red square."), user(text("And this one?"), IMAGE, IMAGE)],
    [{"role": "system", "content": [text("Answer briefly.")]}, user(text("Hi")), assistant("Hello!"),
     user(IMAGE, IMAGE, IMAGE, text("Compare the three images.\nBe precise.")), assistant("The first is larger.")],
    [user(IMAGE), assistant("  spaces kept  "), user(text("ünïcödé 東京 🙂 <b>&amp;</b>"))],
]


@pytest.fixture(scope="module")
def tok():
    return add_idefics3_tokens(bpe_tokenizer())


@pytest.fixture(scope="module")
def pair(tok, tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("chat"), tok)
    return Idefics3Processor.from_pretrained(path), reference(path)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_idefics3_template_matches_reference(pair, index, generation_prompt):
    ours, ref = pair
    conversation = CONVERSATIONS[index]
    expected = ref.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
    assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == expected


def test_model_card_format(pair):
    ours, _ = pair
    assert ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True) == \
        "<|begin_of_text|>User:<image>What do we see in this image?<end_of_utterance>\nAssistant:"


def test_batched_conversations_and_continue_final_message(pair):
    ours, ref = pair
    assert ours.apply_chat_template(CONVERSATIONS, add_generation_prompt=True) == \
        ref.apply_chat_template(CONVERSATIONS, add_generation_prompt=True)
    partial = CONVERSATIONS[1] + [assistant("It is a")]
    assert ours.apply_chat_template(partial, continue_final_message=True) == \
        ref.apply_chat_template(partial, continue_final_message=True)
    with pytest.raises(Idefics3Error, match="cannot both be set"):
        ours.apply_chat_template(partial, continue_final_message=True, add_generation_prompt=True)


FEATURES_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
    "{{ m['role'] | upper }}={{ m['content'] | tojson }}{% if m['role'] == 'assistant' %}{% generation %}"
    "[{{ m['content'][0]['text'] }}]{% endgeneration %}{% endif %}\n{% endfor %}"
    "{{ additional_special_tokens | join(',') }}|{{ eos_token }}|{{ pad_token }}|{{ custom | default('none') }}"
    "{% if add_generation_prompt %}<go>{% endif %}"
)


def test_template_features_match_reference(pair):
    """Special-token variables, tojson without HTML escaping, loop controls, {% generation %}, extra kwargs."""
    ours, ref = pair
    conversation = CONVERSATIONS[3] + [user(text("more"))]
    for kwargs in ({}, {"custom": "yes"}):
        expected = ref.apply_chat_template(conversation, chat_template=FEATURES_TEMPLATE, add_generation_prompt=True,
                                           **kwargs)
        got = ours.apply_chat_template(conversation, chat_template=FEATURES_TEMPLATE, add_generation_prompt=True,
                                       **kwargs)
        assert got == expected
    assert "<fake_token_around_image>,<image>,<end_of_utterance>" in got and "&amp;" in got


def test_template_errors_are_idefics3_errors(pair):
    ours, _ = pair
    with pytest.raises(Idefics3Error, match="refused the conversation: no system role"):
        ours.apply_chat_template(CONVERSATIONS[0],
                                 chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(Idefics3Error, match="syntax error at line 2"):
        ours.apply_chat_template(CONVERSATIONS[0], chat_template="ok\n{% for %}")
    with pytest.raises(Idefics3Error, match="sandbox forbids"):
        ours.apply_chat_template(CONVERSATIONS[0], chat_template="{% set _ = messages.append(1) %}x")
    leaked = ours.apply_chat_template(CONVERSATIONS[0], chat_template="[{{ messages.__class__ }}]{{ ''.__class__ }}")
    assert leaked == "[]"  # Python internals are invisible inside the sandbox
    with pytest.raises(Idefics3Error, match="'role' and 'content'"):
        ours.apply_chat_template([{"content": "no role"}])


def test_string_content_becomes_a_text_item(pair):
    """Ours renders string content like the list form; transformers' Idefics3 template drops such text."""
    ours, ref = pair
    as_string = [{"role": "user", "content": "What is it?"}]
    as_list = [user(text("What is it?"))]
    assert ours.apply_chat_template(as_string) == ref.apply_chat_template(as_list)
    assert "What is it?" not in ref.apply_chat_template(as_string)


@pytest.mark.parametrize("source", ["json", "jinja", "processor"])
def test_template_sources_as_transformers(tok, tmp_path, source):
    path = write_checkpoint(tmp_path, tok, template_file=source, chat_template=CHAT_TEMPLATE + "{{ '!' }}")
    ours, ref = Idefics3Processor.from_pretrained(path), reference(path)
    assert ours.chat_template == ref.chat_template
    assert ours.apply_chat_template(CONVERSATIONS[1]).endswith("!")


def test_json_template_wins_over_jinja_and_processor_config(tok, tmp_path):
    path = write_checkpoint(tmp_path, tok, template_file="json", chat_template="json")
    (path / "chat_template.jinja").write_text("jinja")
    config = json.loads((path / "processor_config.json").read_text())
    (path / "processor_config.json").write_text(json.dumps({**config, "chat_template": "processor"}))
    ours, ref = Idefics3Processor.from_pretrained(path), reference(path)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == ref.apply_chat_template(CONVERSATIONS[0]) == "json"


def test_tokenizer_template_is_the_fallback(tok, tmp_path):
    """Where transformers' processor has no template (it raises), ours uses the tokenizer's."""
    path = write_checkpoint(tmp_path, tok, template_file="tokenizer")
    ours = Idefics3Processor.from_pretrained(path)
    with pytest.raises(ValueError, match="does not have a chat template"):
        reference(path).apply_chat_template(CONVERSATIONS[0])
    assert ours.apply_chat_template(CONVERSATIONS[0]) == reference(path).tokenizer.apply_chat_template(
        CONVERSATIONS[0], tokenize=False)


def test_no_template_and_named_templates(tok, tmp_path):
    path = write_checkpoint(tmp_path, tok, template_file="none")
    ours = Idefics3Processor.from_pretrained(path)
    with pytest.raises(Idefics3Error, match="no chat template"):
        ours.apply_chat_template(CONVERSATIONS[0])
    assert ours.apply_chat_template(CONVERSATIONS[0], chat_template="given") == "given"
    ours.chat_template = {"short": "S", "long": "L"}
    assert ours.apply_chat_template(CONVERSATIONS[0], chat_template="long") == "L"
    with pytest.raises(Idefics3Error, match="none is named 'default'"):
        ours.apply_chat_template(CONVERSATIONS[0])
