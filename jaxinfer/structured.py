"""Structured output, host side: a JSON schema, regex or choice list compiled to a token-level
automaton for one tokenizer, in the array layout the jitted decode reads (jaxinfer/grammar.py).

Compilation is `outlines-core`'s (the optional "structured" extra): `json_schema` ->
`build_regex_from_schema` -> regex, `Index(regex, Vocabulary)` -> a DFA over token ids (for
every state, the allowed tokens and the state each one leads to). Nothing here is a
regex-to-DFA compiler; what this module adds:
- the tokenizer's vocabulary as bytes (sentencepiece "▁" and `<0xXX>` byte-fallback tokens,
  byte-level BPE's unicode alphabet, plain tokens), special tokens left out;
- integer bounds (`minimum` / `maximum` / `exclusive*`), which outlines-core's schema
  conversion ignores: the integer is replaced by a placeholder constant before conversion and
  the placeholder in the regex by a digit-range regex (`_int_range_regex`), so every output
  validates against the schema (bounds on non-integer numbers are refused);
- the device layout (`Automaton`), and a cache keyed by (constraint, tokenizer).

Device layout: token equivalence classes. Two tokens are in one class when they lead to the
same next state from every state (both disallowed counting as the same). A JSON automaton over
Llama 2's 32000 tokens has ~20-110 states but only ~25-100 classes (most tokens are "any
string content" or "never"), so the automaton is `class_of[vocab]` (int32) plus a dense
`next[states, classes]` (int32, -1 = disallowed) and `accepting[states]`. Decode then needs no
search: the allowed-token mask of a slot is one gather `next[state][class_of]` (a [vocab] row,
as wide as the logits it masks) and the next state one more lookup. Alternatives considered: a
bitmask per state packed in uint32 is [states, vocab/32] (32000 / 32 * 4 B = 4 KB per state,
~0.4 MB for 110 states) and still needs a transition structure for the next state, e.g. a
sorted (state, token) list searched per step: its size is the number of transitions, ~140k
for a schema with a free string (every string-content token is a transition), ~1 MB, and a
binary search is ~17 dependent gathers per step. The class table of the same schema is
110 x 99 x 4 B = 44 KB + the 128 KB class map, and one gather.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import re
import threading
import time
import weakref

import numpy as np

from jaxinfer.errors import InvalidRequestError

# Compiled automata kept per process (LRU), keyed by (kind, canonical spec, tokenizer
# fingerprint, vocab size, eos ids).
CACHE_SIZE = 64
_cache: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
_vocab_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(eq=False)
class Automaton:
    """A compiled constraint: state 0 is the initial state. `class_of`, `next`, `accepting` are
    the device layout (see the module docstring): class 0 is "disallowed everywhere" (EOS and
    special tokens included: EOS is allowed in accepting states by the decode itself). `index`
    is outlines-core's Index, used by the host-mask fallback and by tests as the reference."""

    key: tuple
    regex: str
    class_of: np.ndarray | None  # int32 [vocab]; None: too many states for a table (host fallback)
    next: np.ndarray | None  # int32 [states, classes], -1 = disallowed
    accepting: np.ndarray  # bool [states]
    index: object
    state_ids: list[int]  # our state i is outlines-core state state_ids[i]
    compile_seconds: float = 0.0

    @property
    def num_states(self) -> int:
        return len(self.state_ids)

    @property
    def num_classes(self) -> int:
        return 0 if self.next is None else self.next.shape[1]

    def fits(self, max_states: int, max_classes: int) -> bool:
        """Whether the automaton fits a device table entry of that size."""
        return self.next is not None and self.num_states <= max_states and self.num_classes <= max_classes

    def step(self, state: int, token: int) -> int:
        """The state after `token` (-1: not allowed)."""
        if state < 0 or not 0 <= token < self.class_of.shape[0]:
            return -1
        return int(self.next[state, self.class_of[token]])

    def walk(self, tokens, state: int = 0) -> int:
        for t in tokens:
            state = self.step(state, int(t))
        return state

    def allowed(self, state: int) -> np.ndarray:
        """Bool [vocab]: the non-EOS tokens allowed in `state`."""
        return self.next[state][self.class_of] >= 0


# ----------------------------------------------------------------------------- the vocabulary
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> dict[int, bytes]:
    """id -> the bytes the token adds to the text, for every non-special token. Understands
    tokenizer.json's sentencepiece style (Metaspace "▁" = space, `<0xXX>` byte fallback) and
    byte-level BPE; other tokens are their UTF-8. `ByteTokenizer` ids 0-255 are their byte."""
    cached = _vocab_cache.get(tokenizer)
    if cached is not None:
        return cached
    inner = getattr(tokenizer, "_tok", None)
    out: dict[int, bytes] = {}
    if inner is None:  # ByteTokenizer: raw bytes
        out = {i: bytes([i]) for i in range(256)}
    else:
        spec = json.loads(inner.to_str())
        special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
        decoder = json.dumps(spec.get("decoder"))
        byte_level = '"ByteLevel"' in decoder
        table = _bytes_to_unicode() if byte_level else None
        for tok, i in inner.get_vocab(with_added_tokens=True).items():
            if i in special:
                continue
            if byte_level:
                try:
                    out[i] = bytes(table[c] for c in tok)
                except KeyError:  # an added non-special token written in plain text
                    out[i] = tok.encode()
                continue
            m = _BYTE_TOKEN.match(tok)
            out[i] = bytes([int(m.group(1), 16)]) if m else tok.replace("\u2581", " ").encode()
    out = {i: b for i, b in out.items() if b}
    try:
        _vocab_cache[tokenizer] = out
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return out


_fp_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the token bytes: the tokenizer half of the cache key."""
    fp = _fp_cache.get(tokenizer)
    if fp is None:
        tb = token_bytes(tokenizer)
        h = hashlib.sha256()
        for i in sorted(tb):
            h.update(i.to_bytes(4, "little") + len(tb[i]).to_bytes(2, "little") + tb[i])
        fp = h.hexdigest()[:16]
        try:
            _fp_cache[tokenizer] = fp
        except TypeError:  # not weak-referenceable
            pass
    return fp


# ----------------------------------------------------------------------------- integer bounds
def _fixed(a: str, b: str) -> str:
    """Regex for the digit strings of one length between a and b (a <= b)."""
    if a == b:
        return a
    if len(a) == 1:
        return f"[{a}-{b}]"
    if a[0] == b[0]:
        return a[0] + _fixed(a[1:], b[1:])
    n = len(a) - 1
    parts, lo, hi = [], int(a[0]), int(b[0])
    if a[1:] != "0" * n:
        parts.append(a[0] + _fixed(a[1:], "9" * n))
        lo += 1
    tail = None
    if b[1:] != "9" * n:
        tail = b[0] + _fixed("0" * n, b[1:])
        hi -= 1
    if lo <= hi:
        parts.append(f"[{lo}-{hi}][0-9]{{{n}}}")
    if tail is not None:
        parts.append(tail)
    return "(" + "|".join(parts) + ")"


def _nonneg(lo: int, hi: int | None) -> list[str]:
    """Alternatives for the integers in [lo, hi] (hi None: unbounded), lo >= 0, no leading 0."""
    top = hi if hi is not None else 10 ** len(str(lo)) - 1
    out = []
    for n in range(len(str(lo)), len(str(top)) + 1):
        a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(top, 10 ** n - 1)
        if a <= b:
            out.append(_fixed(str(a), str(b)))
    if hi is None:
        out.append(f"[1-9][0-9]{{{len(str(lo))},}}")
    return out


def _int_range_regex(lo: int | None, hi: int | None) -> str:
    """A regex matching exactly the JSON integers in [lo, hi] (None = unbounded)."""
    alts = []
    if lo is None or lo < 0:  # negatives -m, m in [max(1, -hi), -lo]
        m_lo = 1 if hi is None or hi >= 0 else -hi
        m_hi = None if lo is None else -lo
        if m_hi is None or m_lo <= m_hi:
            alts += ["-" + a for a in _nonneg(m_lo, m_hi)]
    if hi is None or hi >= 0:
        alts += _nonneg(max(lo, 0) if lo is not None else 0, hi)
    return "(" + "|".join(alts) + ")"


def _int_bounds(schema: dict) -> tuple[int | None, int | None]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    lo = None if lo is None else math.ceil(lo)
    hi = None if hi is None else math.floor(hi)
    xl, xh = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(xl, bool):  # draft 4: a flag on minimum
        lo = None if lo is None else lo + (1 if xl and schema["minimum"] == lo else 0)
    elif xl is not None:
        lo = max(lo if lo is not None else -(10 ** 30), math.floor(xl) + 1)
    if isinstance(xh, bool):
        hi = None if hi is None else hi - (1 if xh and schema["maximum"] == hi else 0)
    elif xh is not None:
        hi = min(hi if hi is not None else 10 ** 30, math.ceil(xh) - 1)
    return lo, hi


_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _rewrite_bounds(schema, ranges: dict[str, str]):
    """A copy of `schema` with every bounded integer replaced by a placeholder constant; the
    placeholder -> range regex map goes into `ranges`."""
    if isinstance(schema, list):
        return [_rewrite_bounds(s, ranges) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if any(k in schema for k in _BOUND_KEYS):
        if schema.get("type") != "integer":
            raise InvalidRequestError(
                "SamplingParams.json_schema is invalid: minimum/maximum bounds are supported on integers only "
                f"(got them on {schema.get('type', 'an untyped schema')!r})")
        lo, hi = _int_bounds(schema)
        if lo is not None and hi is not None and lo > hi:
            raise InvalidRequestError(f"SamplingParams.json_schema is invalid: integer bounds [{lo}, {hi}] are empty")
        name = f"JXINTRANGE{len(ranges)}Q"
        ranges[name] = _int_range_regex(lo, hi)
        return {"const": name}
    return {k: _rewrite_bounds(v, ranges) if k not in ("enum", "const") else v for k, v in schema.items()}


# ----------------------------------------------------------------------------- compilation
_RUST_META = set("\\.+*?()|[]{}^$#&-~")


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _RUST_META else c for c in text)


def constraint_regex(kind: str, spec) -> str:
    """The regex of a constraint: `kind` "json" (a dict or JSON text), "regex" or "choice"."""
    # outlines-core is optional (the "structured" extra): imported only when a constraint is used
    from outlines_core.json_schema import build_regex_from_schema

    if kind == "regex":
        try:
            re.compile(spec)
        except re.error as e:
            raise InvalidRequestError(f"SamplingParams.regex = {spec!r} is invalid: {e}") from None
        return spec
    if kind == "choice":
        return "(" + "|".join(_escape(c) for c in spec) + ")"
    schema = json.loads(spec) if isinstance(spec, str) else spec
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"SamplingParams.json_schema is invalid: expected a JSON object, got {schema!r}")
    ranges: dict[str, str] = {}
    schema = _rewrite_bounds(schema, ranges)
    try:
        rx = build_regex_from_schema(json.dumps(schema))
    except (ValueError, TypeError, RuntimeError) as e:
        raise InvalidRequestError(f"SamplingParams.json_schema is invalid: {e}") from None
    for name, sub in ranges.items():
        rx = rx.replace(f'"{name}"', sub)
    return rx


# Automata with more states are not laid out for the device (the dense [states, vocab] pass
# that finds the classes would be too big); they run with the host-mask fallback.
MAX_TABLE_STATES = 4096


def _tables(index, vocab_size: int, eos: set[int]):
    """Dense per-state transitions -> (class_of, next, accepting, outlines state ids); class_of
    and next are None for an automaton with more than MAX_TABLE_STATES states."""
    transitions = index.get_transitions()
    init = index.get_initial_state()
    finals = index.get_final_states()
    ids = sorted(set(transitions) | {n for d in transitions.values() for n in d.values()} | {init})
    ids.remove(init)
    ids = [init] + ids
    local = {s: i for i, s in enumerate(ids)}
    accepting = np.array([s in finals for s in ids])
    if len(ids) > MAX_TABLE_STATES:
        return None, None, accepting, ids
    dense = np.full((len(ids), vocab_size), -1, np.int32)
    for s, d in transitions.items():
        toks = [t for t in d if t not in eos and t < vocab_size]
        dense[local[s], toks] = [local[d[t]] for t in toks]
    columns, class_of = np.unique(dense.T, axis=0, return_inverse=True)
    # Class 0 = disallowed everywhere (present: EOS is in it).
    never = np.nonzero(np.all(columns == -1, axis=1))[0]
    if never.size == 0:
        columns = np.concatenate([np.full((1, len(ids)), -1, np.int32), columns])
        class_of = class_of + 1
    elif never[0] != 0:
        order = np.r_[never[0], np.delete(np.arange(columns.shape[0]), never[0])]
        columns = columns[order]
        class_of = np.argsort(order)[class_of]
    return class_of.astype(np.int32).ravel(), np.ascontiguousarray(columns.T), accepting, ids


def compile_constraint(kind: str, spec, tokenizer, vocab_size: int, eos_ids) -> Automaton:
    """The automaton of a constraint for `tokenizer` (cached by (constraint, tokenizer)). Raises
    InvalidRequestError naming the field for an invalid schema or regex, or without the
    outlines-core library."""
    try:
        # outlines-core is optional (the "structured" extra): imported only when a constraint is used
        from outlines_core import Index, Vocabulary
    except ImportError:
        raise InvalidRequestError("structured output needs outlines-core: pip install 'jaxinfer[structured]'") from None
    if tokenizer is None:
        raise InvalidRequestError(f"SamplingParams.{_FIELD[kind]} (structured output) needs a tokenizer: "
                                  "Engine(tokenizer=...)")
    # The key keeps the schema's property order (it is the order of the output's keys).
    canon = json.dumps(spec) if kind == "json" and not isinstance(spec, str) else spec
    if kind == "json" and isinstance(spec, str):
        try:
            canon = json.dumps(json.loads(spec))
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"SamplingParams.json_schema is not valid JSON: {e}") from None
    tb, fp = token_bytes(tokenizer), _tokenizer_fingerprint(tokenizer)
    eos = tuple(int(e) for e in eos_ids)
    key = (kind, canon if kind != "choice" else tuple(spec), fp, vocab_size, eos)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    t0 = time.perf_counter()
    rx = constraint_regex(kind, json.loads(canon) if kind == "json" else spec)
    eos_set = set(eos)
    words: dict[bytes, list[int]] = {}
    for i, b in tb.items():
        if i not in eos_set and i < vocab_size:
            words.setdefault(b, []).append(i)
    vocab = Vocabulary(eos[0] if eos else vocab_size, words)
    try:
        index = Index(rx, vocab)
    except (ValueError, RuntimeError) as e:
        raise InvalidRequestError(f"SamplingParams.{_FIELD[kind]} is invalid: {e}") from None
    class_of, nxt, accepting, ids = _tables(index, vocab_size, eos_set)
    auto = Automaton(key, rx, class_of, nxt, accepting, index, ids, time.perf_counter() - t0)
    with _lock:
        _cache[key] = auto
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return auto


_FIELD = {"json": "json_schema", "regex": "regex", "choice": "choice"}
