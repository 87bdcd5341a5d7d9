"""A torch-free stand-in for a Hugging Face tokenizer, enough for `modulora.data.validate_file`.

Uploads are checked with the default base model's tokenizer for token-length statistics, but
transformers imports torch; this reads the same `tokenizer.json` and chat template through the
`tokenizers` and `jinja2` packages instead.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer


class LightTokenizer:
    def __init__(self, folder: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        self.eos_token: str = _token_text(config.get("eos_token")) or ""
        self.bos_token: str = _token_text(config.get("bos_token")) or ""
        self.chat_template: str | None = config.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            self.chat_template = template_file.read_text()
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        # Compiling a template costs ~7 ms; an upload renders every row with the same one.
        self._compile = functools.lru_cache(maxsize=4)(env.from_string)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        **_: Any,
    ) -> str:
        template = self._compile(chat_template or self.chat_template or "")
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

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
