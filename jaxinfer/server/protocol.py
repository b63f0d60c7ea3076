"""The OpenAI API's request bodies (pydantic) and how they map onto jaxinfer.

Types are strict (a string is not a number, a bool is not an integer) and unknown fields are
rejected, as OpenAI's server does ("Unrecognized request argument supplied"). Ranges are left to
`SamplingParams`, whose errors name the field, so there is one range check for the API, the CLI
and HTTP. OpenAI fields jaxinfer does not implement (`logit_bias`, `suffix`, `best_of` != n,
`tools`, `response_format`, ...) are accepted only at their "off" value and otherwise rejected
by name. Extensions beyond OpenAI's schema, as vLLM names them: `top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    """The fields completions and chat share."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM's names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def unsupported(self) -> dict[str, Any]:
        """Fields set to something jaxinfer does not do (each rejected by name)."""
        return {"logit_bias": self.logit_bias} if self.logit_bias else {}

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        for name, value in self.unsupported().items():
            raise InvalidRequestError(f"{name} = {value!r} is not supported by jaxinfer")
        opt = {k: v for k, v in dict(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty).items() if v is not None}
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(max_tokens=max_tokens, n=self.n, seed=self.seed, stop=tuple(stop),
                              stop_token_ids=tuple(self.stop_token_ids or ()), min_tokens=self.min_tokens,
                              ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs, **opt)


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = 16  # OpenAI's default; None: up to the engine's max_seq_len
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> dict[str, Any]:
        out = super().unsupported()
        if self.suffix:
            out["suffix"] = self.suffix
        if self.best_of is not None and self.best_of != self.n:
            out["best_of"] = self.best_of
        return out

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list; an empty prompt or list is a 400 naming `prompt`."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise InvalidRequestError("prompt is empty: expected a non-empty string or token-id list")
        return p


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def plain(self) -> dict:
        """The message as the chat template sees it (text parts joined, as transformers does)."""
        text = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        out = {"role": self.role, "content": text or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True

    def unsupported(self) -> dict[str, Any]:
        out = super().unsupported()
        for name in ("tools", "response_format"):
            value = getattr(self, name)
            if value and not (name == "response_format" and value.get("type") == "text"):
                out[name] = value
        if self.tool_choice not in (None, "none"):
            out["tool_choice"] = self.tool_choice
        return out

    def logprob_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs = true")
        return (self.top_logprobs or 0) if self.logprobs else None


def error_param(message: str) -> str | None:
    """The request field an InvalidRequestError names, for the error's `param`."""
    m = re.search(r"SamplingParams\.(\w+)", message) or re.match(r"(?:request \d+: )?(\w+)[ =]", message)
    if m and m.group(1) in set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields):
        return m.group(1)
    return None


def clean_message(message: str) -> str:
    return message.replace("SamplingParams.", "")
