"""Chat templates: Jinja text with `{% generation %}` markers around what the model must learn.

One source per template. `segments()` renders it (transformers' renderer, which records where each
`{% generation %}` block lands) and cuts the string into (text, supervised) pieces: at each
message's end (wherever the template renders a conversation prefix as a prefix of the whole) and at
the generation blocks. Training tokenizes piece by piece with the pieces' flags as labels;
inference renders the same template with `add_generation_prompt`, so a prompt's ids are a prefix of
a training sample's. `plain` and `llm-jp-v1` tokenize exactly as before (pinned by a test).

The family templates (`llm-jp-3`, `sarashina2.2`, `qwen3`, `llama-3`, `gemma`) are the models'
published `tokenizer_config.json` templates (tools and reasoning branches left out) with the markers
around each reply and its end-of-turn token. A user's own template is a `.jinja` file path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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

# llm-jp/llm-jp-3-*-instruct: Alpaca-style, fixed system text (a system message's content is not used).
LLM_JP_3_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\n### 指示:\\n' + message['content'] }}"
    "{% elif message['role'] == 'system' %}"
    "{{ '以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。' }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\n### 応答:\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '\\n\\n### 応答:\\n' }}{% endif %}"
    "{% endfor %}"
)

# sbintuitions/sarashina2.2-*-instruct-v0.1
SARASHINA_2_2_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    "{% endfor %}"
)

# Qwen/Qwen3-*: ChatML in non-thinking mode (the stock template with enable_thinking=false): every
# reply follows an empty think block, as the prompt ends with one.
QWEN3_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct (as elyza/Llama-3-ELYZA-JP-8B, tokyotech-llm Swallow).
LLAMA_3_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# google/gemma-2-*-it (and gemma-3's text turns); a system message is folded into the first user turn
# as gemma-3 does.
GEMMA_JINJA = (
    "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<start_of_turn>model\\n' }}"
    "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<start_of_turn>user\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

JINJA_TEMPLATES = {
    "plain": PLAIN_JINJA,
    "llm-jp-v1": LLM_JP_V1_JINJA,
    "llm-jp-3": LLM_JP_3_JINJA,
    "sarashina2.2": SARASHINA_2_2_JINJA,
    "qwen3": QWEN3_JINJA,
    "llama-3": LLAMA_3_JINJA,
    "gemma": GEMMA_JINJA,
}
assert tuple(JINJA_TEMPLATES) == TEMPLATE_NAMES
# Tokenized piece by piece on their own, as before generation markers (ids pinned by a test).
LEGACY_TEMPLATES = ("plain", "llm-jp-v1")

_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MARKER_HELP = (
    "wrap each assistant reply and its end-of-turn token in {% generation %}...{% endgeneration %}, "
    "e.g. {% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %} "
    "(the labels of training come from these blocks)"
)
_PROBE_REPLY = "ZqPROBEREPLYqZ"  # no whitespace: templates may trim replies


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


TRAINED_TEMPLATE = "trained"  # the tokenizer's named template a chat stage was trained with
DEFAULT_TEMPLATE = "llm-jp-v1"


def trained_template_name(source: str | None) -> str:
    """The name to prompt with for a recorded training template: the built-in name when the source
    is a built-in template (so it tokenizes exactly as in training), else `trained`; no source:
    `llm-jp-v1`."""
    if not source:
        return DEFAULT_TEMPLATE
    for name, builtin in JINJA_TEMPLATES.items():
        if source.strip() == builtin.strip():
            return name
    return TRAINED_TEMPLATE


def default_template_name(model_dir: str | Path) -> str:
    """The template to prompt a model dir with: the one its last chat stage was trained with
    (saved as the tokenizer's named template `trained`), else `llm-jp-v1`. Reads files only."""
    trained = Path(model_dir) / "additional_chat_templates" / f"{TRAINED_TEMPLATE}.jinja"
    return trained_template_name(trained.read_text(encoding="utf-8") if trained.is_file() else None)


def template_source(template: str, chat_templates: Mapping[str, str] | str | None = None) -> str:
    """The Jinja text of a template: a built-in name, a name the tokenizer carries, or a file path.

    `chat_templates` is the tokenizer's `chat_template` (a dict of named templates or one string,
    which is the name `default`). Raises TemplateError when none matches.
    """
    if template in JINJA_TEMPLATES:
        return JINJA_TEMPLATES[template]
    named = chat_templates if isinstance(chat_templates, Mapping) else {"default": chat_templates}
    if named.get(template):
        return named[template]
    path = Path(template)
    if path.suffix in (".jinja", ".j2", ".txt") or path.is_file():
        if not path.is_file():
            raise TemplateError(f"chat template file {template} does not exist")
        return path.read_text(encoding="utf-8")
    known = sorted(set(JINJA_TEMPLATES) | {k for k, v in named.items() if v})
    raise TemplateError(
        f"unknown chat template {template!r}; choose from {', '.join(known)} or give a .jinja file"
    )


def has_generation_markers(source: str) -> bool:
    return bool(_GENERATION_MARK.search(source))


def check_trainable(source: str, name: str = "template") -> None:
    """Raise TemplateError unless the template marks the replies to learn with `{% generation %}`."""
    if not has_generation_markers(source):
        raise TemplateError(
            f"chat template {name!r} has no {{% generation %}} block, so nothing would be trained: {_MARKER_HELP}"
        )


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Map LLaVA (`from`/`value`, human/gpt) or OpenAI (`role`/`content`) turns to role/content dicts.

    OpenAI-style content lists become text with `<image>` tags in part order (`content_text`).
    Raises TemplateError on an unknown role, a non-string content or a system turn after the first.
    """
    out = []
    for i, message in enumerate(messages):
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if isinstance(content, list):
            content = content_text(content, where=f"turn {i}")
        if role == "system":
            if i:
                raise TemplateError(f"turn {i}: a system message is only allowed as the first turn")
            out.append({"role": "system", "content": content})
            continue
        if role not in _ROLE_ALIASES:
            raise TemplateError(f"turn {i}: unknown role {role!r} (expected human/gpt or user/assistant)")
        if not isinstance(content, str):
            raise TemplateError(f"turn {i}: content must be a string, got {type(content).__name__}")
        out.append({"role": _ROLE_ALIASES[role], "content": content})
    return out


def content_text(parts: Sequence, where: str = "content") -> str:
    """OpenAI-style content parts -> one text, an `<image>` tag per image part, in order.

    Parts are joined by "\\n". Interleaved parts (text between images, or an image between texts)
    keep their order; otherwise, as [text, image] from most clients, the images go first, in the
    training layout "<image>\\n質問". Text parts may not contain `<image>` themselves.
    """
    pieces = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_TOKEN in part["text"]:
                raise TemplateError(
                    f"{where}, part {j}: text contains {IMAGE_TOKEN}; send images as image parts"
                )
            pieces.append(part["text"])
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE_TOKEN)
        else:
            raise TemplateError(
                f"{where}, part {j}: expected {{'type': 'text', 'text': ...}} or an image part, got {part!r}"
            )
    kinds = "".join("i" if p == IMAGE_TOKEN else "t" for p in pieces)
    if "it" in kinds and "ti" in kinds:  # interleaved
        return "\n".join(pieces)
    texts = [p for p in pieces if p != IMAGE_TOKEN]
    return (IMAGE_TOKEN + "\n") * kinds.count("i") + "\n".join(texts)


def content_images(parts: Sequence) -> list:
    """The image payloads of OpenAI-style content parts, in order (`image` or `image_url`'s url)."""
    images = []
    for part in parts:
        if isinstance(part, Mapping) and part.get("type") in ("image", "image_url"):
            value = part.get(part["type"])
            images.append(value.get("url") if isinstance(value, Mapping) else value)
    return images


def split_content_parts(messages: Sequence[dict], images: Sequence = ()) -> tuple[list[dict], list]:
    """OpenAI-style messages (content lists of text and image parts) -> text turns + images in order.

    Each image part becomes an `<image>` tag where it stands; its payload (`image`: a path, bytes or
    PIL image; `image_url`: a path or a base64 data URL) joins `images`. String contents pass through.
    Images given both as parts and in `images` are refused (their order would be ambiguous).
    """
    out, found = [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            found += [_decode_data_url(x) for x in content_images(content)]
            message = {**message, "content": content_text(content, where=f"turn {i}")}
        out.append(message)
    if found and images:
        raise TemplateError("images are given both as content parts and as a separate list; give one")
    return out, (found or list(images))


def _decode_data_url(value):
    if isinstance(value, str) and value.startswith("data:"):
        import base64

        header, _, data = value.partition(",")
        if ";base64" not in header:
            raise TemplateError("an image data URL must be base64 (data:image/png;base64,...)")
        return base64.b64decode(data, validate=False)
    return value


def _render(source: str, messages: list[dict], tokens: Mapping[str, str], add_generation_prompt: bool):
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, spans = render_jinja_template(
            conversations=[messages],
            chat_template=source,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
            **tokens,
        )
    except TemplateError:
        raise
    except Exception as err:  # jinja errors, raise_exception() of the template
        raise TemplateError(f"the chat template cannot render this conversation: {err}") from err
    return rendered[0], spans[0]


def _prefix_render(source: str, messages: list[dict], tokens: Mapping[str, str]) -> str | None:
    try:
        return _render(source, messages, tokens, False)[0]
    except TemplateError:
        return None


def segments(
    messages: Sequence[dict],
    template: str,
    special_tokens: Mapping[str, str] | str,
    add_generation_prompt: bool = False,
    chat_templates: Mapping[str, str] | str | None = None,
) -> list[Segment]:
    """The rendered conversation cut into pieces; the `{% generation %}` blocks are supervised.

    `special_tokens`: the tokenizer's special token strings (`eos_token`, `bos_token`, ...), or
    just the EOS string. `template`/`chat_templates` as `template_source`.
    """
    source = template_source(template, chat_templates)
    tokens = {"eos_token": special_tokens} if isinstance(special_tokens, str) else dict(special_tokens)
    messages = normalize_messages(messages)
    text, spans = _render(source, messages, tokens, add_generation_prompt)
    cuts = {0, len(text)}
    for k in range(len(messages) + 1):
        prefix = text if k == len(messages) and not add_generation_prompt else None
        prefix = prefix if prefix is not None else _prefix_render(source, messages[:k], tokens)
        if prefix is not None and text.startswith(prefix):
            cuts.add(len(prefix))
    for start, end in spans:
        cuts.update((start, end))
    bounds = sorted(cuts)
    out = []
    for start, end in zip(bounds, bounds[1:]):
        supervised = any(s <= start and end <= e for s, e in spans)
        out.append(Segment(text[start:end], supervised))
    return out


def render(
    messages: Sequence[dict],
    template: str,
    special_tokens: Mapping[str, str] | str,
    add_generation_prompt: bool = False,
    chat_templates: Mapping[str, str] | str | None = None,
) -> str:
    """The conversation as one string, exactly as the Jinja template renders it."""
    return "".join(
        s.text for s in segments(messages, template, special_tokens, add_generation_prompt, chat_templates)
    )


@lru_cache(maxsize=64)
def _end_of_turn_text(source: str, tokens: tuple) -> str:
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE_REPLY}]
    text, spans = _render(source, messages, dict(tokens), False)
    for start, end in spans:
        block = text[start:end]
        if _PROBE_REPLY in block:
            return block.split(_PROBE_REPLY, 1)[1]
    return ""


def end_of_turn_text(source: str, special_tokens: Mapping[str, str]) -> str:
    """What a template's generation block adds after a reply ("<|im_end|>", "</s>", ...); may be ""."""
    return _end_of_turn_text(source, tuple(sorted(special_tokens.items())))
