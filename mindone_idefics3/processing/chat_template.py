"""Chat templates: the checkpoint's Jinja template rendered in a sandbox, as transformers renders it.

The environment matches transformers 4.57.1 (`ImmutableSandboxedEnvironment` with trim_blocks, lstrip_blocks and
loop controls; a `tojson` that does not escape HTML; `raise_exception` and `strftime_now`; the `{% generation %}`
tag accepted), and the template sees the same variables: `messages`, `add_generation_prompt`, `tools`, `documents`,
the tokenizer's special tokens (`bos_token`, `eos_token`, ..., `additional_special_tokens`) and any extra keyword
arguments. Templates cannot reach Python internals: the sandbox refuses it and we report an `Idefics3Error`.

One deliberate difference: a message whose `content` is a plain string is passed as
`[{"type": "text", "text": content}]`, the form Idefics3's template expects (transformers passes the string
through, and Idefics3's template then silently drops the text).
"""
from __future__ import annotations

import copy
import functools
import json
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence, Union

from ..errors import Idefics3Error

Conversation = Sequence[Dict[str, Any]]
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile once per template text."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): render the body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise Idefics3Error(f"the chat template has a Jinja syntax error at line {e.lineno}: {e.message}; fix "
                            "chat_template.jinja / chat_template.json of the checkpoint") from None


def normalize_conversation(conversation: Conversation) -> List[Dict[str, Any]]:
    """Validate the message format (one Idefics3Error naming the message and the key at fault); string content
    becomes one text item."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise Idefics3Error(f"a conversation is a non-empty list of messages like {{'role': 'user', 'content': "
                            f"[{{'type': 'image'}}, {{'type': 'text', 'text': '...'}}]}}, got {conversation!r:.80}")
    messages = []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise Idefics3Error(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        if not isinstance(message["role"], str):
            raise Idefics3Error(f"message {i} role must be a string such as 'user', got {message['role']!r:.80}")
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not isinstance(content, (list, tuple)) or not all(isinstance(c, dict) and "type" in c for c in content):
            raise Idefics3Error(f"message {i} content must be a string or a list of items like {{'type': 'text', "
                                f"'text': '...'}} / {{'type': 'image'}}, got {content!r:.80}")
        for j, item in enumerate(content):
            if item["type"] not in ("text", "image", "video"):
                raise Idefics3Error(f"message {i} item {j} has type {item['type']!r:.40}; Idefics3 takes 'text' "
                                    "and 'image' items (and SmolVLM2 'video' items)")
            if item["type"] == "text" and not isinstance(item.get("text"), str):
                raise Idefics3Error(f"message {i} item {j} (type 'text') needs a string 'text', got "
                                    f"{item.get('text')!r:.80}")
        messages.append({**message, "content": list(content)})
    return messages


def render(template: str, conversation: Conversation, *, add_generation_prompt: bool = False,
           continue_final_message: bool = False, special_tokens: Optional[dict] = None, **kwargs) -> str:
    """The prompt text of one conversation (see the module docstring for what the template sees)."""
    import jinja2

    if add_generation_prompt and continue_final_message:
        raise Idefics3Error("add_generation_prompt and continue_final_message cannot both be set: the first starts "
                            "a new assistant turn, the second continues the last message")
    messages = normalize_conversation(conversation)
    final_text = None
    if continue_final_message:
        messages = copy.deepcopy(messages)
        texts = [item for item in messages[-1]["content"] if "text" in item]
        if not texts:
            raise Idefics3Error("continue_final_message needs text in the last message to continue")
        final_text = texts[-1]["text"]
        texts[-1]["text"] = final_text + CONTINUE_TAG
    variables = {"tools": None, "documents": None, **kwargs, **(special_tokens or {})}
    try:
        text = compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **variables)
    except jinja2.exceptions.SecurityError as e:
        raise Idefics3Error(f"the chat template tried an operation the sandbox forbids ({e}); use the checkpoint's "
                            "own template") from None
    except jinja2.exceptions.TemplateError as e:
        raise Idefics3Error(f"the chat template refused the conversation: {e}") from None
    if continue_final_message:
        tag = CONTINUE_TAG.strip()
        if final_text.strip() not in text or tag not in text:
            raise Idefics3Error("continue_final_message: the template does not reproduce the last message's text")
        at = text.rindex(tag)
        text = text[:at] if text[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()
    return text


def select_template(templates: Union[str, Dict[str, str], None], name: Optional[str]) -> str:
    """The template to use: `name` (a template's name or a template text), else the single or "default" one."""
    if name is not None:
        return templates.get(name, name) if isinstance(templates, dict) else name
    if templates is None:
        raise Idefics3Error("this checkpoint has no chat template (no chat_template.jinja / chat_template.json, and "
                            "none in processor_config.json or tokenizer_config.json); pass chat_template=... or "
                            "write the prompt text yourself")
    if isinstance(templates, str):
        return templates
    if "default" not in templates:
        raise Idefics3Error(f"the checkpoint has several chat templates ({', '.join(templates)}) and none is "
                            "named 'default'; pass chat_template=<name>")
    return templates["default"]


def question_turns(prompt: str, num_images: int, system: Optional[str] = None, num_videos: int = 0
                   ) -> List[Dict[str, Any]]:
    """The conversation for one question about images (or videos): an optional system turn, then one user turn
    holding the images (videos) first and the text after them (the model card's layout)."""
    messages = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)] + \
        [{"type": "text", "text": prompt}]
    return messages + [{"role": "user", "content": content}]
