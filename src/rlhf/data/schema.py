"""Canonical row schema shared by every stage, and the HH-style message renderer.

Whatever format a user brings, the readers turn each record into one of the three
frozen row models below. Conversations are rendered to text in the Anthropic HH
style so that ``prompt + completion`` is exactly the rendered full conversation::

    render_messages([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    == "\\n\\nHuman: Hi\\n\\nAssistant:"

and a conversational row also keeps its ``messages``: the conversation before the
final answer, which a model with a chat template renders with that template instead
(`rlhf.models.chat`). The text fields stay what judges and tables read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict

__all__ = [
    "DataKind",
    "Message",
    "SFTRow",
    "PreferenceRow",
    "PromptRow",
    "Row",
    "ROW_TYPES",
    "ROLE_NAMES",
    "ASSISTANT_CUE",
    "render_messages",
    "row_chars",
]

DataKind = Literal["sft", "preference", "prompt", "ptx"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


Messages = tuple[Message, ...]


class SFTRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    completion: str
    messages: Messages | None = None
    """Conversational rows: the turns before the final answer (`completion`)."""


class PreferenceRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    chosen: str
    rejected: str
    messages: Messages | None = None
    """Conversational rows: the turns both answers follow."""


class PromptRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    messages: Messages | None = None
    """Conversational rows: the turns the model answers."""


Row = Union[SFTRow, PreferenceRow, PromptRow]

ROW_TYPES: dict[str, type[BaseModel]] = {
    "sft": SFTRow,
    "preference": PreferenceRow,
    "prompt": PromptRow,
    "ptx": SFTRow,  # PPO-ptx text: an empty prompt and the text as the completion, or demonstrations
}

# Message role -> the speaker name used in the rendered text (HH compatible).
ROLE_NAMES: dict[str, str] = {"system": "System", "user": "Human", "assistant": "Assistant"}

# What a prompt ends with when the model is to answer next.
ASSISTANT_CUE = "\n\nAssistant:"


def render_messages(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """Render chat messages as HH-style text.

    Each message becomes ``"\\n\\n{Role}: {content}"`` with Role one of System,
    Human (for ``user``) or Assistant. With ``add_generation_prompt`` the text ends
    with ``"\\n\\nAssistant:"``. Content is used verbatim (nothing is stripped).
    Raises ``ValueError`` on an unknown role.
    """
    parts: list[str] = []
    for message in messages:
        role = message["role"]
        if role not in ROLE_NAMES:
            raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
        parts.append(f"\n\n{ROLE_NAMES[role]}: {message['content']}")
    if add_generation_prompt:
        parts.append(ASSISTANT_CUE)
    return "".join(parts)


def row_chars(row: BaseModel) -> int:
    """Total characters over the text fields of a canonical row (messages repeat the prompt)."""
    return sum(len(v) for v in row.model_dump(exclude={"messages"}).values())
