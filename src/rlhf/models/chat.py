"""How a row becomes token ids: with the model's chat template, or as HH-style text.

A tokenizer with a chat template (an instruct model's) renders conversations with it:
the prompt is `apply_chat_template(turns, add_generation_prompt=True)`, an answer is
what the template adds for one more assistant turn, cut after the template's
end-of-turn token (a stop id: the tokenizer's EOS or one of `generation_config`'s), so
an SFT target ends exactly where generation stops. Text is tokenized with
`add_special_tokens=False` (the template writes BOS itself). Which tokens are the
assistant's is found by rendering the conversation turn by turn, so it works for any
template, with or without `{% generation %}` markers.

Rows without turns (plain `{prompt, completion}`) become one user turn and one
assistant turn (`model.wrap_plain_rows`), or stay text. Tokenizers without a
template (those prep trains) and `model.chat_template: off` keep the HH text of the
rows: prompt ids, then answer ids and EOS.

A sequence is `(ids, targets)`: `targets` is the prompt length (every later token is
an answer token), or a 0/1 list with one entry per token (all assistant turns).
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.config import ModelConfig
from rlhf.models.batching import tokenize_pair


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render turn by turn."""


def stop_ids(tok, model=None) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS and the model's
    `generation_config.eos_token_id` (one id or a list: instruct models often stop on
    an end-of-turn token as well as end-of-text)."""
    ids = [tok.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def chat_format(tok, mcfg: ModelConfig, model_dir: str | None = None, **kw) -> "ChatFormat":
    """The format of a saved model folder: its tokenizer, plus the stop ids of its
    `generation_config.json` when it has one."""
    from pathlib import Path

    stops = stop_ids(tok)
    if model_dir and (Path(model_dir) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        stops = stop_ids(tok, type("Saved", (), {"generation_config": GenerationConfig.from_pretrained(model_dir)}))
    return ChatFormat(tok, mcfg, stops=stops, source=model_dir or "the tokenizer", **kw)


class ChatFormat:
    """Token ids of prompts, demonstrations and answers for one tokenizer."""

    def __init__(self, tok, mcfg: ModelConfig, *, stops: Sequence[int] | None = None, all_turns: bool = False,
                 source: str = "the tokenizer"):
        self.tok, self.mcfg, self.all_turns, self.source = tok, mcfg, all_turns, source
        self.templated = mcfg.chat_template != "off" and bool(getattr(tok, "chat_template", None))
        self.wrap_plain = mcfg.wrap_plain_rows
        self.stops = list(stops) if stops else stop_ids(tok)

    # ----------------------------------------------------------------- turns

    def turns(self, row) -> list[dict] | None:
        """The conversation before the row's answer, or None when the row stays text."""
        if not self.templated:
            return None
        if row.messages:
            return [{"role": m.role, "content": m.content} for m in row.messages]
        return [{"role": "user", "content": row.prompt.strip()}] if self.wrap_plain else None

    def _render(self, turns: list[dict], prompt: bool) -> str:
        return self.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _answer_end(self, ids: list[int]) -> int:
        """Length of an answer's tokens through its first stop id (all of them if none)."""
        return next((i + 1 for i, t in enumerate(ids) if t in self.stops), len(ids))

    # ----------------------------------------------------------------- ids

    def prompt_ids(self, row) -> list[int]:
        """What the model answers: the rendered turns and the assistant header."""
        turns = self.turns(row)
        if turns is None:
            return self.tok(row.prompt, add_special_tokens=True)["input_ids"]
        return self._ids(self._render(turns, prompt=True))

    def sequence(self, row, answer: str) -> tuple[list[int], int | list[int]]:
        """The row's prompt followed by `answer` (through its end-of-turn token), and
        which tokens are answer tokens (`targets`, see the module doc)."""
        turns = self.turns(row)
        if turns is None:
            return tokenize_pair(self.tok, row.prompt, answer)
        convo = turns + [{"role": "assistant", "content": answer.strip()}]
        if self.all_turns and any(t["role"] == "assistant" for t in turns[1:]):
            return self._all_turns(convo)
        head = self._render(turns, prompt=True)
        head_ids = self._ids(head)
        return head_ids + self._answer(head, convo), len(head_ids)

    def _answer(self, head: str, convo: list[dict]) -> list[int]:
        """The final answer's tokens: what rendering it adds after `head`, through the stop id."""
        full = self._render(convo, prompt=False)
        if not full.startswith(head):
            raise ChatTemplateError(
                f"the chat template of {self.source} renders the conversation before the last answer differently "
                "once the answer follows (it must be a prefix); set model.chat_template=off to use HH text")
        ids = self._ids(full[len(head):])
        end = self._answer_end(ids)
        if end and ids[end - 1] in self.stops:
            return ids[:end]  # through the end-of-turn token; what the template writes after it is not generated
        return ids + [self.tok.eos_token_id]

    def _all_turns(self, convo: list[dict]) -> tuple[list[int], list[int]]:
        """Every assistant turn after the first message is a target, through its stop id;
        rendered turn by turn, each rendering a prefix of the next."""
        ids, targets, done = [], [], ""
        for i, turn in enumerate(convo):
            if turn["role"] != "assistant" or i == 0:
                continue
            head = self._render(convo[:i], prompt=True)
            if not head.startswith(done):
                raise ChatTemplateError(
                    f"the chat template of {self.source} renders earlier turns differently as the conversation "
                    "grows; set sft.assistant_turns=final (or model.chat_template=off)")
            context = self._ids(head[len(done):])
            ids += context
            targets += [0] * len(context)
            if i == len(convo) - 1:
                answer = self._answer(head, convo)
                return ids + answer, targets + [1] * len(answer)
            full = self._render(convo[:i + 1], prompt=False)
            answer = self._ids(full[len(head):])
            end = self._answer_end(answer)
            ids += answer
            targets += [1] * end + [0] * (len(answer) - end)
            done = full
        raise AssertionError("the conversation ends with the answer")

    def lengths(self, row) -> tuple[int, int]:
        """(prompt tokens, tokens of the prompt with its longest answer), as trained on."""
        n_prompt = len(self.prompt_ids(row))
        answers = [a for a in (getattr(row, k, None) for k in ("completion", "chosen", "rejected")) if a is not None]
        return n_prompt, max([len(self.sequence(row, a)[0]) for a in answers], default=n_prompt + 1)

    def demonstration(self, row) -> tuple[list[int], int | list[int]]:
        return self.sequence(row, row.completion)

    def pair(self, row) -> tuple[list[int], list[int]]:
        """Chosen and rejected sequences (the same prompt ids)."""
        return self.sequence(row, row.chosen)[0], self.sequence(row, row.rejected)[0]


def targets_mask(ids: Sequence[int], targets: int | Sequence[int]) -> list[int]:
    """1 for each token the loss is on; never the first token (nothing predicts it)."""
    if isinstance(targets, int):
        k = max(targets, 1)
        return [0] * k + [1] * (len(ids) - k)
    return [0] + list(targets[1:])
