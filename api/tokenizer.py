"""A torch-free stand-in for a Hugging Face tokenizer, enough for `modulora.data.validate_file`.

Uploads are checked with the default base model's tokenizer for token-length statistics, but
transformers' tokenizer classes import torch; this reads the same `tokenizer.json` through the
`tokenizers` package and renders the chat template with transformers' own renderer
(`transformers.utils.chat_template_utils`, torch-free), with the same special-token variables a
tokenizer's `apply_chat_template` passes, so an upload's report and training see the same text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers.utils.chat_template_utils import render_jinja_template

# The special tokens transformers hands a chat template (its `special_tokens_map` keys).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class LightTokenizer:
    def __init__(self, folder: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        self.special_tokens = {
            name: text for name in TEMPLATE_TOKENS if (text := _token_text(config.get(name))) is not None
        }
        self.eos_token: str = self.special_tokens.get("eos_token", "")
        self.bos_token: str = self.special_tokens.get("bos_token", "")
        self.chat_template: str | None = config.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            self.chat_template = template_file.read_text()

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
        **_: Any,
    ) -> str:
        rendered, _indices = render_jinja_template(
            [messages],
            tools=tools,
            chat_template=chat_template or self.chat_template or "",
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )
        return rendered[0]

    def __call__(
        self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False
    ) -> dict[str, list[Any]]:
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": list(encoding.ids), "offset_mapping": list(encoding.offsets)}


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds the files LightTokenizer reads."""
    return (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()


def load_light_tokenizer(folder: Path) -> LightTokenizer | None:
    """The tokenizer in `folder`, or None when the model has not been converted there yet."""
    return LightTokenizer(folder) if has_tokenizer(folder) else None
