"""The terminal chat loop of `convllava-jp chat`: multi-turn, answers streamed as they are decoded.

Lines starting with "/" are commands (CHAT_HELP); any other line is a question about the current
image, asked with the conversation so far.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConvLlavaError

CHAT_HELP = """commands inside the chat:
  /image PATH   switch to another image (starts a new conversation)
  /noimage      continue without an image (starts a new conversation)
  /reset        forget the conversation, keep the image
  /help         this list
  /quit         leave (also Ctrl-D)"""


class _Chat:
    """The conversation state: the current image and the (question, answer) turns so far."""

    def __init__(self, pipeline: Any, config: Any, out: TextIO):
        self.pipeline = pipeline
        self.config = config
        self.out = out
        self.image: Any = None
        self.image_name: str | None = None
        self.history: list[tuple[str, str]] = []

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def set_image(self, path: str | None) -> None:
        from ..data.images import load_image

        if path is None:
            self.image, self.image_name = None, None
            return
        self.image = load_image(Path(path).expanduser())  # ImageError names the file
        self.image_name = path

    def command(self, line: str) -> bool:
        """Run a /command; False when the chat should end."""
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            self.say(CHAT_HELP)
        elif command == "/reset":
            self.history.clear()
            self.say("(会話をリセットしました)")
        elif command == "/image" and not rest.strip():
            self.say("usage: /image PATH")
        elif command in ("/image", "/noimage"):
            try:
                self.set_image(rest.strip() if command == "/image" else None)
            except ConvLlavaError as err:
                self.say(f"error: {err}")
                return True
            self.history.clear()
            self.say(f"(画像: {self.image_name or 'なし'}; 新しい会話)")
        else:
            self.say(f"unknown command {command}; /help lists them")
        return True

    def ask(self, question: str) -> None:
        from .generation import GenerationRequest

        images = [self.image] if self.image is not None else []
        messages = self.pipeline.question_messages(question, len(images), self.history)
        self.say("AI> ", end="")
        answer = ""
        try:
            for piece in self.pipeline.stream(GenerationRequest(messages, images), self.config):
                answer += piece
                self.say(piece, end="")
        except ConvLlavaError as err:  # e.g. the conversation outgrew the context
            self.say(f"\nerror: {err} (/reset starts over)")
            return
        self.say()
        self.history.append((question, answer))


def run_chat(
    pipeline: Any,
    config: Any,
    image: str | None = None,
    *,
    read_line: Callable[[str], str] = input,
    out: TextIO | None = None,
    interactive: bool | None = None,
) -> None:
    """Chat until /quit or end of input; `image` is the path of the first image (None: none)."""
    chat = _Chat(pipeline, config, out or sys.stdout)
    if image:
        chat.set_image(image)
    if interactive is None:
        interactive = sys.stdin.isatty()
    chat.say(f"画像: {chat.image_name or '(なし)'} — /help でコマンド一覧")
    while True:
        try:
            line = read_line("あなた> " if interactive else "").strip()
        except EOFError:
            break
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                break
            continue
        chat.ask(line)
