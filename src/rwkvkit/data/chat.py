"""Chat / SFT records -> RWKV chat text, split into segments that are trained on or not.

The default is the RWKV World / G1 format: turns "Role: content" joined by "\\n\\n", e.g.
"User: hi\\n\\nAssistant: Hello!". Only what the assistant says is trained on: its " content", the "\\n\\n" that ends
its turn (the stop signal chat front-ends wait for) and, for the last turn, the end-of-document token 0. The
"Assistant:" prefix itself is prompt, so it ends without a space, exactly as inference prompts do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_BLANK_LINES = re.compile(r"\n{2,}")


class ChatFormatError(ValueError):
    """A chat record that cannot be rendered (the reason becomes `file:line: reason`)."""


@dataclass(frozen=True)
class ChatTemplate:
    """How messages become text. `clean` does what the RWKV templates ask of every turn: CRLF -> LF, runs of blank
    lines collapsed to one newline (so "\\n\\n" stays the turn separator) and surrounding whitespace stripped."""

    role_names: dict[str, str] = field(default_factory=lambda: dict(ROLE_NAMES))
    separator: str = "\n\n"
    train_roles: tuple[str, ...] = ("assistant",)
    clean: bool = True

    def clean_text(self, text: str) -> str:
        if not self.clean:
            return text
        return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n")).strip()

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """[(text, trained)], adjacent segments merged; "".join(texts) is the rendered conversation. The
        end-of-document token that follows is trained iff the last segment is (the last turn is the assistant's)."""
        checked = _check_messages(messages)
        if not any(role in self.train_roles for role, _ in checked):
            raise ChatFormatError(f"no {'/'.join(self.train_roles)} message to train on")
        out: list[tuple[str, bool]] = []
        for i, (role, content) in enumerate(checked):
            content = self.clean_text(content)
            if not content:
                raise ChatFormatError(f"messages[{i}]: empty content")
            name = self.role_names.get(role, role[:1].upper() + role[1:])
            sep = self.separator if i < len(checked) - 1 else ""
            if role in self.train_roles:
                _append(out, f"{name}:", False)
                _append(out, f" {content}{sep}", True)
            else:
                _append(out, f"{name}: {content}{sep}", False)
        return out


def _append(out: list[tuple[str, bool]], text: str, trained: bool) -> None:
    # one encode call per run of same-mask text: the prompt part is then tokenized exactly as an inference prompt
    if out and out[-1][1] == trained:
        out[-1] = (out[-1][0] + text, trained)
    else:
        out.append((text, trained))


def _check_messages(messages) -> list[tuple[str, str]]:
    if not isinstance(messages, list):
        raise ChatFormatError(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ChatFormatError(f"messages[{i}]: missing '{key}'")
            if not isinstance(m[key], str):
                raise ChatFormatError(f"messages[{i}]: '{key}' must be a string, got {type(m[key]).__name__}")
        out.append((m["role"].strip().lower(), m["content"]))
    return out


def record_messages(record: dict, prompt_field: str = "prompt", response_field: str = "response") -> list[dict]:
    """The messages of a chat record: its `messages`, or a prompt/response pair (with an optional `system`)."""
    if "messages" in record:
        return record["messages"]
    messages = []
    if "system" in record:
        messages.append({"role": "system", "content": record["system"]})
    messages.append({"role": "user", "content": record[prompt_field]})
    messages.append({"role": "assistant", "content": record[response_field]})
    return messages
