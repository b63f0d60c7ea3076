"""Chat messages -> prompt text, with the checkpoint's own chat template, rendered the way
`transformers`' `apply_chat_template` renders it (so a chat request gets exactly the prompt the
model was trained on).

Where the template comes from, in order: `--chat-template FILE`; `chat_template.jinja` in the
checkpoint (what transformers >= 4.50 writes); `chat_template` in `tokenizer_config.json` (a
string, or a list of `{"name", "template"}` of which "default" is taken). The rendering matches
transformers': a sandboxed jinja2 environment with `trim_blocks`/`lstrip_blocks` and the loop
controls extension, `raise_exception`, `strftime_now` and a `tojson` that does not escape HTML,
and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables. The rendered
text already holds the special tokens, so it is encoded without adding any (as
transformers' `apply_chat_template(tokenize=True)` does).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxinfer.errors import ConfigError, InvalidRequestError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplate:
    """A compiled chat template and the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str):
        self.source, self.special_tokens, self.origin = source, special_tokens, origin
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"the chat template from {origin} is not valid jinja2: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:  # raise_exception() in the template: the messages don't fit it
            raise InvalidRequestError(f"the model's chat template rejected the messages: {e}") from e


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _token_text(entry) -> str | None:
    content = entry.get("content") if isinstance(entry, dict) else entry  # AddedToken dicts or strings
    return content if isinstance(content, str) else None


def load_chat_template(model_dir: str | Path | None, override: str | Path | None = None) -> ChatTemplate | None:
    """The checkpoint's chat template (or `override`, a file), or None if it has none."""
    tok_cfg = {}
    if model_dir is not None and (Path(model_dir) / "tokenizer_config.json").is_file():
        file = Path(model_dir) / "tokenizer_config.json"
        try:
            tok_cfg = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from e
    special = {k: t for k in SPECIAL_TOKENS if (t := _token_text(tok_cfg.get(k))) is not None}
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"--chat-template: no file at {path}")
        return ChatTemplate(path.read_text(), special, str(path))
    if model_dir is None:
        return None
    jinja_file = Path(model_dir) / "chat_template.jinja"
    if jinja_file.is_file():
        return ChatTemplate(jinja_file.read_text(), special, str(jinja_file))
    source = tok_cfg.get("chat_template")
    if isinstance(source, list):  # named templates: the default one serves plain chat
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ConfigError(f"{Path(model_dir) / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                          f"{{name, template}}, got {type(source).__name__}")
    return ChatTemplate(source, special, f"{Path(model_dir) / 'tokenizer_config.json'}")
