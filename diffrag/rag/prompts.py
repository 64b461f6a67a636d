"""RAG prompts: passages, then `Question: ...`, then `Answer:`, then the masked answer canvas.

The template text is a config value. With a tokenizer that has a chat template (LLaDA /
Dream instruct) and `chat=True`, the filled template is the one user turn of the chat,
followed by the generation prompt. Fitting rule when the prompt is longer than the
context window (max_prompt_tokens): passages are cut from the lowest-ranked one up,
token by token from their ends (a passage cut to nothing is dropped); if the prompt with
no passage at all still does not fit, the question is too long and that is an error.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

DEFAULT_TEMPLATE = "{passages}\n\nQuestion: {question}\n\nAnswer:"


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  template: str = DEFAULT_TEMPLATE
  passage_separator: str = "\n\n"
  chat: bool = True          # use the tokenizer's chat template when it has one
  max_prompt_tokens: int = 4096
  context_limit: int = 0     # > 0: prompt + answer canvas must fit this many tokens (else the checkpoint's
                             # max_position_embeddings is the limit); a config that does not fit is an error


class Prompt(NamedTuple):
  """ids: the prompt token ids; kept: passages kept whole or in part; cut_tokens: passage
  tokens removed by the fitting rule (0 when everything fitted)."""

  ids: list[int]
  kept: int
  cut_tokens: int


def _render(tokenizer, spec: PromptSpec, passages: Sequence[str], question: str) -> list[int]:
  text = spec.template.format(passages=spec.passage_separator.join(passages), question=question)
  if spec.chat and getattr(tokenizer, "chat_template", None):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return list(ids)
  ids = tokenizer(text)["input_ids"]
  # BERT-style tokenizers append [SEP]: the canvas follows the prompt directly, so drop it.
  sep = getattr(tokenizer, "sep_token_id", None)
  if sep is not None and ids and ids[-1] == sep:
    ids = ids[:-1]
  return list(ids)


def build_prompt(tokenizer, spec: PromptSpec, question: str, passages: Sequence[str]) -> Prompt:
  """The prompt under spec.max_prompt_tokens, cut by the fitting rule (counted in `cut_tokens`)."""
  if not question.strip():
    raise ValueError("empty question: every record needs question text")
  bare = _render(tokenizer, spec, [], question)
  if len(bare) > spec.max_prompt_tokens:
    raise ValueError(f"the question alone takes {len(bare)} prompt tokens, more than max_prompt_tokens="
                     f"{spec.max_prompt_tokens} (the context window minus the answer canvas)")
  kept = list(passages)
  ids = _render(tokenizer, spec, kept, question)
  full = len(ids)
  while len(ids) > spec.max_prompt_tokens and kept:
    over = len(ids) - spec.max_prompt_tokens
    last = tokenizer(kept[-1], add_special_tokens=False)["input_ids"]
    if over >= len(last):
      kept.pop()
    else:
      kept[-1] = tokenizer.decode(last[:len(last) - over - 1])  # -1: re-tokenising can merge pieces
    ids = _render(tokenizer, spec, kept, question)
  return Prompt(ids, len(kept), full - len(ids))
