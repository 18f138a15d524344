"""Answers in a terminal: one streamed answer (`run`, `generate`, `demo`) and the multi-turn
`chat` loop. Tokens go to `out` (stdout unless given) as they come; progress lines to `say`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from ..errors import ImageError
from ..preprocess import load_image
from ..prompt import Conversation
from .generation import Timings
from .pipeline import Pipeline, Request
from .sampling import SamplingParams

Say = Callable[[str], None]


def stream_answer(pipe: Pipeline, request: Request, params: SamplingParams, say: Say, out: TextIO | None = None) -> str:
    """Write the answer's text to `out` token by token, then its timings to `say`; returns the text."""
    out = out or sys.stdout
    text, t = "", Timings()
    for ev in pipe.stream(request, params, timings=[t]):
        out.write(ev.text)
        out.flush()
        text += ev.text
    out.write("\n")
    say(
        f"preprocess {t.preprocess_s * 1e3:.1f} ms · vision {t.vision_s * 1e3:.1f} ms · "
        f"TTFT {t.ttft_s * 1e3:.1f} ms · decode {t.decode_tokens_per_s:.1f} tok/s"
    )
    return text


class ChatSession:
    """One conversation: the turns so far, the images they hold, and images attached to the next message."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.conversation, self.images, self.pending = Conversation(), [], []

    def attach(self, path: str) -> None:
        """Raises ImageError when the image cannot be read; nothing is attached then."""
        load_image(path)
        self.pending.append(path)

    def ask(self, text: str) -> Request:
        """The user's message, with the attached images, as the request for the next answer."""
        self.conversation.add_user(text, num_images=len(self.pending))
        self.images += self.pending
        self.pending = []
        self.conversation.add_assistant(None)
        return Request(self.conversation, list(self.images))

    def answered(self, answer: str) -> None:
        self.conversation.messages[-1] = (self.conversation.roles[1], answer.strip())


def chat(pipe: Pipeline, params: SamplingParams, say: Say, warn: Say, read: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    """Read messages until end of input or `/quit`: `/image PATH` attaches an image to the next
    message, `/reset` starts over; each answer is streamed to `out`."""
    session = ChatSession()
    say("chat: type a message; /image PATH adds an image, /reset clears, /quit exits")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.attach(path)
            except ImageError as exc:
                warn(str(exc))
                continue
            say(f"attached {path}")
            continue
        request = session.ask(line)
        (out or sys.stdout).write("assistant> ")
        session.answered(stream_answer(pipe, request, params, say, out))
