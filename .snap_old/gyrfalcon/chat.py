"""Chatting with a model: a conversation's history through the tokenizer's chat template, replies streamed.

    session = ChatSession(model, tokenizer, system="You are brief.", temperature=0.7, max_new_tokens=256)
    for piece in session.send("Hello!"):
        print(piece, end="", flush=True)
    session.reset()                       # forget the conversation (the system message stays)

`run_chat` is the interactive loop behind `gyrfalcon chat`: a line is a user turn, `/reset` clears the history,
`/exit` (or end of input) leaves. Each turn re-reads the whole conversation (prefill is fast; the recurrent state
then matches the template's rendering of the history exactly). When the conversation outgrows the model's context,
the oldest exchanges are dropped (the system message is kept).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .generate import GenerationError, stream

COMMANDS = {"/exit": "leave", "/quit": "leave", "/reset": "forget the conversation", "/help": "this list"}


class ChatSession:
    """A conversation: `history` holds {"role", "content"} messages (the system message first, when given)."""

    def __init__(self, model, tokenizer, *, system: str | None = None, **options):
        if getattr(tokenizer, "chat_template", None) is None:
            raise GenerationError("the tokenizer has no chat template, so a conversation cannot be rendered; use a "
                                  "chat (instruct) model's tokenizer, or `gyrfalcon generate` for plain text")
        if options.get("stop") is not None and not isinstance(options["stop"], (str, list, tuple)):
            raise GenerationError(f"stop must be a string or a list of strings, got {type(options['stop']).__name__}")
        self.model, self.tokenizer, self.system, self.options = model, tokenizer, system, options
        self.history: list[dict] = []
        self.trimmed = 0  # messages dropped to fit the context, over the whole conversation
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _fitted(self, messages: list[dict]) -> list[dict]:
        """The conversation, without its oldest exchanges if it is too long for the model's context."""
        context = self.model.config.max_position_embeddings
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(head):]
        room = min(self.options.get("max_new_tokens", 256), context // 2)
        while True:
            ids = self.tokenizer.apply_chat_template(head + body, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            if len(ids) + room <= context or len(body) <= 1:
                return head + body
            drop = 2 if len(body) > 2 else 1          # a user message and the reply to it
            body = body[drop:]
            self.trimmed += drop

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply's text; the reply joins the history once complete."""
        if not isinstance(text, str) or not text.strip():
            raise GenerationError("a chat message must be non-empty text")
        messages = self._fitted(self.history + [{"role": "user", "content": text}])
        reply = []
        for event in stream(self.model, self.tokenizer, messages, **self.options):
            if event.text:
                reply.append(event.text)
                yield event.text
        self.history = messages + [{"role": "assistant", "content": "".join(reply)}]

    def reply(self, text: str) -> str:
        return "".join(self.send(text))


def run_chat(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None,
             prompt: str = "you> ", reply_prefix: str = "model> ") -> int:
    """The interactive loop: read a line, stream the reply, until /exit or end of input. Returns the exit code."""
    if write is None:
        def write(s: str) -> None:
            print(s, end="", flush=True)
    write(f"chat with {session.model.config.num_hidden_layers}-layer Falcon-H1; commands: "
          + ", ".join(f"{c} ({what})" for c, what in COMMANDS.items() if c != "/quit") + "\n")
    while True:
        try:
            line = read(prompt)
        except EOFError:
            write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            write("(conversation cleared)\n")
            continue
        if line == "/help" or (line.startswith("/") and " " not in line):
            write("commands: " + ", ".join(f"{c} ({what})" for c, what in COMMANDS.items()) + "\n")
            continue
        before = session.trimmed
        write(reply_prefix)
        for piece in session.send(line):
            write(piece)
        write("\n")
        if session.trimmed > before:
            write(f"(the conversation outgrew the context: {session.trimmed - before} oldest messages dropped)\n")
