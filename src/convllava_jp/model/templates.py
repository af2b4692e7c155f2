"""Chat templates: `plain` (stages 1-2) and `llm-jp-v1` (stage 3, inference).

The same template exists twice on purpose: as Jinja text stored on the tokenizer (so
`tokenizer.apply_chat_template(..., chat_template="llm-jp-v1")` renders it like any HF model) and
as `segments()`, which yields the rendered string cut into (text, supervised) pieces. Training and
inference both tokenize segment by segment, so a prompt tokenizes the same way at both times and
the labels mark exactly the assistant replies. A test checks the two renderings agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..data.constants import IMAGE_TOKEN, TEMPLATE_NAMES
from ..errors import TemplateError

LLM_JP_SYSTEM_PROMPT = (
    "これは好奇心旺盛なユーザーと人工知能システムのチャットです。"
    "システムはユーザーの質問に親切、詳細、丁寧に答える。"
)
USER_ROLE_JA = "ユーザー"
ASSISTANT_ROLE_JA = "システム"

# Messages use the OpenAI/HF roles; LLaVA JSON's "human"/"gpt" are mapped on load.
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# As LLaVA's `plain`: the user turn is reduced to its image tags (instructions dropped), then "\n".
PLAIN_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '"
    + IMAGE_TOKEN
    + "' * message['content'].count('"
    + IMAGE_TOKEN
    + "') }}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)

LLM_JP_V1_JINJA = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{{ '" + LLM_JP_SYSTEM_PROMPT + "' }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ ' " + USER_ROLE_JA + ": ' }}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ ' " + ASSISTANT_ROLE_JA + ": ' }}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' " + ASSISTANT_ROLE_JA + ": ' }}{% endif %}"
)

JINJA_TEMPLATES = {"plain": PLAIN_JINJA, "llm-jp-v1": LLM_JP_V1_JINJA}


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Map LLaVA (`from`/`value`, human/gpt) or OpenAI (`role`/`content`) turns to role/content dicts.

    Raises TemplateError on an unknown role or a non-string content.
    """
    out = []
    for i, message in enumerate(messages):
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role == "system":
            out.append({"role": "system", "content": content})
            continue
        if role not in _ROLE_ALIASES:
            raise TemplateError(f"turn {i}: unknown role {role!r} (expected human/gpt or user/assistant)")
        if not isinstance(content, str):
            raise TemplateError(f"turn {i}: content must be a string, got {type(content).__name__}")
        out.append({"role": _ROLE_ALIASES[role], "content": content})
    return out


def segments(
    messages: Sequence[dict],
    template: str,
    eos_token: str,
    add_generation_prompt: bool = False,
) -> Iterator[Segment]:
    """Cut the rendered conversation into pieces; only assistant replies (+ EOS) are supervised."""
    if template not in JINJA_TEMPLATES:
        raise TemplateError(f"unknown chat template {template!r}; choose from {', '.join(TEMPLATE_NAMES)}")
    messages = normalize_messages(messages)
    if template == "plain":
        for m in messages:
            if m["role"] == "user":
                yield Segment(IMAGE_TOKEN * m["content"].count(IMAGE_TOKEN) + "\n", False)
            elif m["role"] == "assistant":
                yield Segment(m["content"] + eos_token, True)
        return
    if messages and messages[0]["role"] == "system":
        yield Segment(messages[0]["content"], False)
        messages = messages[1:]
    else:
        yield Segment(LLM_JP_SYSTEM_PROMPT, False)
    for m in messages:
        if m["role"] == "user":
            yield Segment(f" {USER_ROLE_JA}: " + m["content"], False)
        elif m["role"] == "assistant":
            yield Segment(f" {ASSISTANT_ROLE_JA}: ", False)
            yield Segment(m["content"] + eos_token, True)
        else:
            raise TemplateError("a system message is only allowed as the first turn")
    if add_generation_prompt:
        yield Segment(f" {ASSISTANT_ROLE_JA}: ", False)


def render(
    messages: Sequence[dict], template: str, eos_token: str, add_generation_prompt: bool = False
) -> str:
    """The conversation as one string, exactly as the Jinja template renders it."""
    return "".join(s.text for s in segments(messages, template, eos_token, add_generation_prompt))
