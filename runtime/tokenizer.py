"""Tokenizer (the `tokenizers` library) and chat-template rendering (sandboxed jinja2).

A bundle's chat template is untrusted text: it is rendered in jinja2's
immutable sandbox, so it cannot reach Python objects or the file system.
"""
from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from inducekv.core.errors import BundleError

DEFAULT_TEMPLATE = (  # used when a bundle has no chat template: plain ChatML
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# what ikv-export records for a model with no chat template and no ChatML tokens (a base model
# such as Gemma 3 270M): plain text a base model continues; the answer follows "Answer:"
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Question: ' + m['content'] + '\\nAnswer:' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + '\\n' }}"
    "{% else %}{{ m['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
)


def _raise(message):
    raise TemplateError(message)


class ChatTokenizer:
    def __init__(self, path: Path, chat_template: str | None, bos_token_id: int | None, add_bos: bool):
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise BundleError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}; re-export the bundle") from None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(chat_template or DEFAULT_TEMPLATE)
        except TemplateError as e:
            raise BundleError(f"the bundle's chat template does not parse: {e}") from None
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise BundleError(f"the bundle's chat template failed: {e}") from None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of already-rendered text; special tokens in the text are parsed.
        ``bos=False`` for a piece that continues earlier text."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)
