"""Sampling settings (host side) and the per-slot sampler that runs inside the jitted steps.

Every setting is a per-slot array in the state, so no value ever triggers a recompile. The
filters follow Hugging Face's order: temperature, then top-k, top-p and min-p on the
temperature-scaled distribution, then one categorical draw with the slot's own key folded with
its token index, so a seeded request draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt32

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
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False  # do not stop at the model's EOS (benchmarks); stop_token_ids still apply

    def __post_init__(self):
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(field, value, expected):
            raise InvalidRequestError(f"SamplingParams.{field} = {value!r} is invalid: expected {expected}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            bad("top_k", self.top_k, "an integer (<= 0 disables top-k)")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            bad("top_p", self.top_p, "a number in (0, 1]")
        if not isinstance(self.min_p, (int, float)) or not (0 <= self.min_p <= 1):
            bad("min_p", self.min_p, "a number in [0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
            bad("seed", self.seed, "None or an integer in [0, 2**32)")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", self.ignore_eos, "a bool")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                bad("stop_token_ids", list(self.stop_token_ids), f"token ids in [0, {vocab_size or 'vocab_size'})")


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
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    rank = jnp.arange(logits.shape[0])
    keep = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf))
    keep &= (jnp.cumsum(probs) - probs) < top_p
    keep &= probs >= min_p * probs[0]
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(jax.random.wrap_key_data(key, impl="threefry2x32"), masked)
    return order[choice].astype(jnp.int32)


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


def seed_to_key(seed: int) -> UInt32[Array, "2"]:
    return jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))
