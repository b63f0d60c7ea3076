"""Structured output, device side: the constraint table in the EngineState and the two pure
functions decode uses, `constrain` (mask) and `advance` (next automaton state).

The table (see jaxinfer/structured.py for why this layout) has `max_slots` entries, each one
compiled constraint padded to the static sizes `EngineConfig.grammar_states` x
`grammar_classes` (no recompile per constraint):
- `grammar_class [entries, vocab]` token -> its class in that entry's automaton (class 0 =
  never allowed; EOS is there);
- `grammar_next [entries, states, classes]` next state, -1 = disallowed;
- `grammar_flags [entries, states]` ACCEPTING (EOS / the slot's stop ids allowed), STALL (the
  host-mask fallback: the slot waits for the host to write its next mask).
Per slot: `grammar` (entry, -1 = unconstrained) and `grammar_state`.

Order inside a decode step (vLLM's): min_tokens + penalties (`process_logits`), then this mask
(disallowed tokens -> -inf; stop ids allowed only in accepting states), then temperature /
top-k / top-p / min-p and the draw. A constrained slot whose state allows no token at all is a
dead end: it finishes with reason "dead_end" without emitting a token. The whole mask is
behind a `lax.cond`: a batch without a running constrained slot does none of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

NONE, ACCEPTING, STALL = 0, 1, 2  # grammar_flags values


def constrain(
    logits: Float[Array, "slots vocab"],
    constrained: Bool[Array, "slots"],
    entry: Int[Array, "slots"],
    state: Int[Array, "slots"],
    stop_ids: Int[Array, "slots max_stops"],
    grammar_class: Int[Array, "grammars vocab"],
    grammar_next: Int[Array, "grammars grammar_states grammar_classes"],
    grammar_flags: Int[Array, "grammars grammar_states"],
) -> tuple[Float[Array, "slots vocab"], Bool[Array, "slots"]]:
    """(logits with the tokens the slot's automaton disallows at -inf, dead ends): rows not
    `constrained` are untouched. Skipped entirely (lax.cond) when no row is constrained."""
    s, v = logits.shape

    def apply(z):
        e, st = jnp.maximum(entry, 0), jnp.maximum(state, 0)
        row = grammar_next[e, st]  # [slots, classes]
        allowed = jnp.take_along_axis(row, grammar_class[e], axis=1) >= 0  # [slots, vocab]
        allowed = allowed & (state >= 0)[:, None]  # -1: off the automaton (cannot happen; be safe)
        accepting = grammar_flags[e, st] == ACCEPTING
        cols = jnp.where(accepting[:, None] & (stop_ids >= 0), stop_ids, v)
        allowed = allowed.at[jnp.arange(s)[:, None], cols].set(True, mode="drop")
        allowed = allowed | ~constrained[:, None]
        z = jnp.where(allowed, z, -jnp.inf)
        dead = constrained & ~jnp.any(z > -jnp.inf, axis=-1)
        return z, dead

    return jax.lax.cond(jnp.any(constrained), apply, lambda z: (z, jnp.zeros((s,), bool)), logits)


def advance(
    token: Int[Array, "slots"],
    moved: Bool[Array, "slots"],
    entry: Int[Array, "slots"],
    state: Int[Array, "slots"],
    grammar_class: Int[Array, "grammars vocab"],
    grammar_next: Int[Array, "grammars grammar_states grammar_classes"],
) -> Int[Array, "slots"]:
    """The automaton state after `token` for constrained slots that `moved` (sampled it)."""
    e, st = jnp.maximum(entry, 0), jnp.maximum(state, 0)
    nxt = grammar_next[e, st, grammar_class[e, token]]
    return jnp.where(moved & (entry >= 0), nxt, state)


def stalled(entry: Int[Array, "slots"], state: Int[Array, "slots"],
            grammar_flags: Int[Array, "grammars grammar_states"]) -> Bool[Array, "slots"]:
    """Slots waiting for the host's next mask (host-mask fallback)."""
    return (entry >= 0) & (grammar_flags[jnp.maximum(entry, 0), jnp.maximum(state, 0)] == STALL)
