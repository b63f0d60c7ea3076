"""Sampling settings (host side) and the per-slot sampler that runs inside the jitted steps.

Every setting is a per-slot array in the state, so no value ever triggers a recompile. The
order follows vLLM: `process_logits` first masks stop ids until `min_tokens` tokens exist and
applies the repetition / frequency / presence penalties; then `sample` applies Hugging Face's
filter order: temperature, then top-k, top-p and min-p on the temperature-scaled distribution,
then one categorical draw with the slot's own key folded with its token index, so a seeded
request draws the same tokens whatever else is in the batch. `token_logprobs` reports the RAW
model distribution (log_softmax of the logits before any processing: vLLM's default
"raw_logprobs" mode), so logprobs do not depend on the sampling settings.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt32

from jaxinfer.errors import InvalidRequestError


# validate() checks every field with a specific message; keep the generic runtime type checker
# (on in the tests) from pre-empting it.
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    temperature 0 is greedy. top_k <= 0, top_p = 1 and min_p = 0 switch those filters off.
    seed None draws a fresh seed per request. stop_token_ids are added to the model's EOS ids
    unless ignore_eos.

    Penalties (vLLM semantics): repetition_penalty (1 = off) divides positive / multiplies
    negative logits of every token seen in the prompt or the output; presence_penalty and
    frequency_penalty (0 = off, in [-2, 2] as in OpenAI's API) subtract
    `presence * [count > 0] + frequency * count` over the OUTPUT tokens only. min_tokens masks
    the stop ids (EOS unless ignore_eos, and stop_token_ids) until that many tokens exist.
    logprobs=k (None = off) returns, per generated token, its logprob plus the top-k of the raw
    model distribution; prompt_logprobs=k the same for every prompt token after the first.
    stop: strings that end the request when they appear in the detokenized output (host side;
    the output text stops right before the stop string, which is not included).
    n: independent samples of the prompt (RequestOutput.samples); they share the prompt's pages.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False  # do not stop at the model's EOS (benchmarks); stop_token_ids still apply
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop: Sequence[str] = ()
    # Parallel sampling: n samples of one prompt share its KV pages (copy-on-write of the page
    # they write into). Sample i draws from RNG key (i, seed), so sample 0 equals the n=1 output.
    n: int = 1
    # Structured output (at most one; jaxinfer/structured.py, needs the engine's tokenizer and the
    # "structured" extra): the output matches a JSON schema (a dict or its JSON text), fully
    # matches a regex, or is exactly one of `choice`. Enforced on device inside the decode loop;
    # EOS is allowed only where the output is complete.
    json_schema: dict | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None

    def __post_init__(self):
        """Normalise, then validate (a frozen dataclass: values are replaced in place).

        Accepted with conversion: NumPy integer / floating scalars and 0-d arrays (np.int64(8),
        np.float32(0.5)) become Python numbers; integers are accepted for float fields; a lone
        string `stop` is one stop string (as vLLM and OpenAI accept it); NumPy bools for
        `ignore_eos`. Rejected with an InvalidRequestError naming the field: bools where a number
        is expected (temperature=True), strings where a number is expected ("5"), non-integral
        floats where an integer is expected, integers beyond int32 (they live in int32 arrays on
        the device), a `stop_token_ids` that is not a list/tuple/array of integer ids, and a
        `stop` that is not a string or a list of non-empty strings."""
        for field, kind in _FIELD_KINDS.items():
            value = getattr(self, field)
            object.__setattr__(self, field, _normalise(field, value, kind))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        self.validate()

    @property
    def constraint(self) -> tuple[str, object] | None:
        """(kind, spec) of the structured-output constraint: ("json", schema), ("regex", pattern),
        ("choice", strings), or None."""
        if self.json_schema is not None:
            return "json", self.json_schema
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", self.choice
        return None

    def validate(self, vocab_size: int | None = None, max_logprobs: int | None = None) -> None:
        """Range checks (types are normalised at construction); `vocab_size` and `max_logprobs`
        are the engine's, when it checks a request against its model."""
        def bad(field, value, expected):
            raise InvalidRequestError(f"SamplingParams.{field} = {value!r} is invalid: expected {expected}")

        # Types as __post_init__ leaves them (a field changed behind its back is caught here).
        for field, kind in _FIELD_KINDS.items():
            v = getattr(self, field)
            ok = {"int": lambda: type(v) is int, "int?": lambda: v is None or type(v) is int,
                  "float": lambda: type(v) in (int, float), "bool": lambda: type(v) is bool,
                  "ids": lambda: isinstance(v, tuple) and all(type(t) is int for t in v),
                  "strings": lambda: isinstance(v, tuple) and all(isinstance(x, str) and x for x in v)}[kind]()
            if not ok:
                bad(field, v, {"int": "an integer", "int?": "None or an integer", "float": "a number",
                               "bool": "True or False", "ids": "a tuple of integer token ids",
                               "strings": "a tuple of non-empty strings"}[kind])
        if not 1 <= self.max_tokens <= INT32_MAX:
            bad("max_tokens", self.max_tokens, f"an integer in [1, {INT32_MAX}]")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not -INT32_MAX <= self.top_k <= INT32_MAX:
            bad("top_k", self.top_k, f"an integer in [-{INT32_MAX}, {INT32_MAX}] (<= 0 disables top-k)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "a number in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "a number in [0, 1]")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            bad("seed", self.seed, "None or an integer in [0, 2**32)")
        for t in self.stop_token_ids:
            if t < 0 or (vocab_size is not None and t >= vocab_size) or t > INT32_MAX:
                bad("stop_token_ids", list(self.stop_token_ids), f"token ids in [0, {vocab_size or 'vocab_size'})")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 = off)")
        for field in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, field)
            if not -2 <= v <= 2:
                bad(field, v, "a number in [-2, 2] (0 = off)")
        if not 0 <= self.min_tokens <= INT32_MAX:
            bad("min_tokens", self.min_tokens, "an integer >= 0")
        elif self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"at most max_tokens ({self.max_tokens})")
        for field in ("logprobs", "prompt_logprobs"):
            v = getattr(self, field)
            top = "max_logprobs" if max_logprobs is None else max_logprobs
            if v is not None and (v < 0 or (max_logprobs is not None and v > max_logprobs) or v > INT32_MAX):
                bad(field, v, f"None or an integer in [0, {top}] (the engine's max_logprobs)")
        if not 1 <= self.n <= INT32_MAX:
            bad("n", self.n, "an integer >= 1")
        given = [f for f in ("json_schema", "regex", "choice") if getattr(self, f) is not None]
        if len(given) > 1:
            raise InvalidRequestError(f"SamplingParams: at most one of json_schema, regex, choice may be set, got {given}")
        if self.json_schema is not None and (isinstance(self.json_schema, bool)
                                             or not isinstance(self.json_schema, (dict, str))):
            bad("json_schema", self.json_schema, "a JSON schema: a dict or its JSON text")
        if self.regex is not None and not (isinstance(self.regex, str) and self.regex):
            bad("regex", self.regex, "a non-empty string")
        if self.choice is not None and not (isinstance(self.choice, tuple) and self.choice
                                            and all(isinstance(c, str) and c for c in self.choice)):
            bad("choice", self.choice, "a non-empty list of non-empty strings")


INT32_MAX = 2**31 - 1
# How each field is normalised: "int", "float", "bool", "int?" (None allowed), "ids", "strings".
_FIELD_KINDS = {
    "max_tokens": "int", "temperature": "float", "top_k": "int", "top_p": "float", "min_p": "float",
    "seed": "int?", "stop_token_ids": "ids", "ignore_eos": "bool", "repetition_penalty": "float",
    "presence_penalty": "float", "frequency_penalty": "float", "min_tokens": "int", "logprobs": "int?",
    "prompt_logprobs": "int?", "stop": "strings", "n": "int",
}


def _normalise(field: str, value, kind: str):
    """One field's value as the plain Python type the engine uses, or InvalidRequestError."""
    def bad(expected):
        raise InvalidRequestError(
            f"SamplingParams.{field} = {value!r} ({type(value).__name__}) is invalid: expected {expected}")

    if kind == "int?" and value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0 and kind in ("int", "int?", "float", "bool"):
        value = value[()]
    if kind in ("int", "int?"):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            bad("an integer" + (" or None" if kind == "int?" else ""))
        return int(value)
    if kind == "float":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            bad("a number")
        return float(value)
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            bad("True or False")
        return bool(value)
    if kind == "ids":
        if isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.integer):
            return tuple(int(v) for v in value)
        if not isinstance(value, (list, tuple)):
            bad("a list of integer token ids")
        if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) for v in value):
            bad("a list of integer token ids")
        return tuple(int(v) for v in value)
    # "strings"
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) and x for x in value):
        bad("a string or a list of non-empty strings")
    return tuple(value)


def _filter_and_draw(
    logits: Float[Array, "vocab"],
    temperature: Float[Array, ""],
    top_k: Int[Array, ""],
    top_p: Float[Array, ""],
    min_p: Float[Array, ""],
    key: UInt32[Array, "2"],
) -> Int[Array, ""]:
    # One descending sort serves all three filters. Each filter sees the distribution the
    # previous one left, renormalised, as in HF's warper chain: top-k is a rank test; top-p a
    # test on the mass strictly before a token (the most likely token always survives); min-p a
    # ratio to the top probability (which renormalisation does not change).
    order, masked = _filtered_sorted(logits, temperature, top_k, top_p, min_p)
    choice = jax.random.categorical(jax.random.wrap_key_data(key, impl="threefry2x32"), masked)
    return order[choice].astype(jnp.int32)


def _filtered_sorted(logits, temperature, top_k, top_p, min_p):
    """(descending order, the filtered scaled logits in that order, -inf where dropped)."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    rank = jnp.arange(logits.shape[0])
    keep = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf))
    keep &= (jnp.cumsum(probs) - probs) < top_p
    keep &= probs >= min_p * probs[0]
    return order, jnp.where(keep, sorted_logits, -jnp.inf)


def filtered_probs(
    logits: Float[Array, "slots vocab"],
    temperature: Float[Array, "slots"],
    top_k: Int[Array, "slots"],
    top_p: Float[Array, "slots"],
    min_p: Float[Array, "slots"],
) -> Float[Array, "slots vocab"]:
    """The distribution `sample` draws from (temperature, then top-k, top-p, min-p, as
    `_filter_and_draw`), in vocabulary order: speculative decoding's target p."""
    def one(lg, t, k, p, m):
        order, masked = _filtered_sorted(lg, t, k, p, m)
        return jnp.zeros_like(lg).at[order].set(jax.nn.softmax(masked))
    return jax.vmap(one)(logits, temperature, top_k, top_p, min_p)


def sample(
    logits: Float[Array, "slots vocab"],
    temperature: Float[Array, "slots"],
    top_k: Int[Array, "slots"],
    top_p: Float[Array, "slots"],
    min_p: Float[Array, "slots"],
    rng: UInt32[Array, "slots 2"],
    step: Int[Array, "slots"],
) -> Int[Array, "slots"]:
    """Next token per slot; greedy where temperature == 0. `step` is the token's index in its
    request (folded into the request's key)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(_):
        keys = jax.vmap(
            lambda k, i: jax.random.key_data(
                jax.random.fold_in(jax.random.wrap_key_data(k, impl="threefry2x32"), i)
            )
        )(rng, step)
        drawn = jax.vmap(_filter_and_draw)(logits, temperature, top_k, top_p, min_p, keys)
        return jnp.where(temperature > 0, drawn, greedy)

    # The sort is the expensive part; an all-greedy batch skips it.
    return jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda _: greedy, None)


def process_logits(
    logits: Float[Array, "slots vocab"],
    num_generated: Int[Array, "slots"],
    min_tokens: Int[Array, "slots"],
    stop_ids: Int[Array, "slots max_stops"],
    seen: Bool[Array, "slots vocab"],
    counts: Int[Array, "slots vocab"],
    repetition_penalty: Float[Array, "slots"],
    presence_penalty: Float[Array, "slots"],
    frequency_penalty: Float[Array, "slots"],
) -> Float[Array, "slots vocab"]:
    """vLLM's logits processing before `sample`: min_tokens stop-id masking, then penalties.
    `num_generated` counts the tokens generated before the one being sampled; `seen` marks
    prompt + output tokens (repetition penalty) and `counts` counts output tokens only
    (presence / frequency penalties)."""
    s, v = logits.shape
    # Stop ids -> -inf while too few tokens exist. Padding (-1) and slots past their minimum
    # point at column `v`, out of bounds, and the scatter drops them.
    early = (num_generated < min_tokens)[:, None] & (stop_ids >= 0)
    cols = jnp.where(early, stop_ids, v)
    logits = logits.at[jnp.arange(s)[:, None], cols].set(-jnp.inf, mode="drop")

    def penalize(z):
        rep = repetition_penalty[:, None]
        z = jnp.where(seen, jnp.where(z > 0, z / rep, z * rep), z)
        c = counts.astype(z.dtype)
        return z - frequency_penalty[:, None] * c - presence_penalty[:, None] * (c > 0)

    # Three [slots, vocab] passes; a batch where no slot uses a penalty skips them.
    used = jnp.any((repetition_penalty != 1) | (presence_penalty != 0) | (frequency_penalty != 0))
    return jax.lax.cond(used, penalize, lambda z: z, logits)


def token_logprobs(
    logits: Float[Array, "*b vocab"],
    token: Int[Array, "*b"],
    num_top: int,
    wanted: Bool[Array, ""],
) -> tuple[Float[Array, "*b"], Int[Array, "*b max_logprobs"], Float[Array, "*b max_logprobs"]]:
    """(logprob of `token`, top-`num_top` ids, their logprobs) under log_softmax(logits), the raw
    model distribution. `num_top` is static (EngineConfig.max_logprobs; the host keeps each
    request's k <= num_top). When not `wanted` (no request asked) the log_softmax and top-k are
    skipped and zeros returned: default requests pay nothing."""
    lead = token.shape

    def compute(_):
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(lp, token[..., None], axis=-1)[..., 0]
        if num_top == 0:
            return chosen, jnp.zeros(lead + (0,), jnp.int32), jnp.zeros(lead + (0,), jnp.float32)
        top_lp, top_ids = jax.lax.top_k(lp, num_top)
        return chosen, top_ids.astype(jnp.int32), top_lp

    def skip(_):
        return (jnp.zeros(lead, jnp.float32), jnp.zeros(lead + (num_top,), jnp.int32),
                jnp.zeros(lead + (num_top,), jnp.float32))

    return jax.lax.cond(wanted, compute, skip, None)


def sample_key(seed: int, index: int = 0) -> np.ndarray:
    """Threefry key data of sample `index` of a request with `seed`: (index, seed). Sample 0 is
    what jax.random.key(seed) makes for a 32-bit seed, so n=1 and sample 0 of n>1 agree."""
    return np.array([index, seed % 2**32], np.uint32)
