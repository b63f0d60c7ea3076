"""The OpenAI API's request bodies (pydantic) and how they map onto jaxinfer.

Types are strict (a string is not a number, a bool is not an integer) and unknown fields are
rejected, as OpenAI's server does ("Unrecognized request argument supplied"). Ranges are left to
`SamplingParams`, whose errors name the field, so there is one range check for the API, the CLI
and HTTP. OpenAI fields jaxinfer does not implement (`logit_bias`, `suffix`, `best_of` != n,
`tools`, ...) are accepted only at their "off" value and otherwise rejected by name.
Extensions beyond OpenAI's schema, as vLLM names them: `top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, and `structured_outputs`
(`json` schema, `regex`, `choice`, `json_object`) on both endpoints. Chat's `response_format`
maps to the same constraints: `json_object` (any JSON object), `json_schema`
({"json_schema": {"name", "schema", "strict"}}), `text` (none).
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


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` request field (at most one constraint)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None

    def params(self) -> dict[str, Any]:
        given = {k: v for k, v in dict(json=self.json, regex=self.regex, choice=self.choice).items() if v is not None}
        if self.json_object:
            given["json_object"] = True
        if len(given) > 1:
            raise InvalidRequestError(f"structured_outputs: at most one of json, regex, choice, json_object, "
                                      f"got {sorted(given)}")
        if "json_object" in given:
            return {"json_schema": JSON_OBJECT}
        return {dict(json="json_schema", regex="regex", choice="choice")[k]: v for k, v in given.items()}


# response_format {"type": "json_object"}: any JSON object.
JSON_OBJECT = {"type": "object"}


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
    structured_outputs: StructuredOutputs | None = None

    def unsupported(self) -> dict[str, Any]:
        """Fields set to something jaxinfer does not do (each rejected by name)."""
        return {"logit_bias": self.logit_bias} if self.logit_bias else {}

    def constraint(self) -> dict[str, Any]:
        """The SamplingParams constraint field the request asks for ({} for none)."""
        return self.structured_outputs.params() if self.structured_outputs is not None else {}

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
                              ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              **self.constraint(), **opt)


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
        if self.tools:
            out["tools"] = self.tools
        if self.tool_choice not in (None, "none"):
            out["tool_choice"] = self.tool_choice
        return out

    def constraint(self) -> dict[str, Any]:
        """`structured_outputs`, or `response_format` mapped onto the same constraint."""
        out = super().constraint()
        rf = self.response_format
        if not rf or rf.get("type") == "text":
            return out
        if out:
            raise InvalidRequestError("response_format and structured_outputs cannot both set a constraint")
        kind = rf.get("type")
        if kind == "json_object":
            return {"json_schema": JSON_OBJECT}
        if kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, (dict, str)):
                raise InvalidRequestError("response_format = json_schema needs json_schema.schema (a JSON schema object)")
            return {"json_schema": schema}
        raise InvalidRequestError(f"response_format type {kind!r} is not supported: expected text, json_object or "
                                  "json_schema")

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
