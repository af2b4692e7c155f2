"""Token conventions shared by the data pipeline and the model's processor.

They live here, below `model/`, so that `data/` builds samples without importing the model.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"  # the tag in text; the processor expands each into the image's placeholder ids
IGNORE_INDEX = -100  # label of a position the loss skips (as torch's cross_entropy ignore_index)
# The chat templates `model.templates` defines (a model dir's own named templates and .jinja files too).
TEMPLATE_NAMES: tuple[str, ...] = (
    "plain",
    "llm-jp-v1",
    "llm-jp-3",
    "sarashina2.2",
    "qwen3",
    "llama-3",
    "gemma",
)

# Speaker names of a LLaVA record's turns ("from"; "role" in the OpenAI layout).
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
