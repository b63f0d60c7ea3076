"""Tokenizers and streaming detokenization.

`Tokenizer` wraps a HF `tokenizers` tokenizer.json (BPE, sentencepiece-style Metaspace/byte-fallback,
byte-level BPE, ...) so that encoding matches `transformers.AutoTokenizer` exactly. `ByteTokenizer` is a
file-free stand-in (raw UTF-8 bytes) for random-weight models. Both hand out an
`IncrementalDetokenizer`, which turns a stream of generated ids into text chunks that never split a
character and keep the spaces a one-shot decode would produce.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, SupportsInt, runtime_checkable

import tokenizers

from jaxinfer.errors import CheckpointError

# Token ids as callers have them: lists of ints, or numpy/jax int arrays (whose items are not `int`).
TokenIds = Iterable[SupportsInt]

_REPLACEMENT = "\ufffd"  # what lossy UTF-8 decoding yields for incomplete/invalid bytes
# Prompt tokens re-decoded as left context for the first generated token. A few suffice for the leading
# space (sentencepiece strips one leading space per decode; byte-level BPE spaces live in the token).
_PROMPT_CONTEXT = 5
# Extra steps the context start may move left to get off a multi-byte character (at most 4 bytes long).
_MAX_BACKTRACK = 4


@runtime_checkable  # so that runtime type checkers (beartype in the tests) can check it
class _Decodes(Protocol):
    def decode(self, ids: TokenIds, skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Streams text for generated ids, one `push` at a time (the prefix_offset/read_offset method of vLLM).

    Each step decodes a short window `ids[prefix_offset:]` and emits what it adds beyond the already-emitted
    `ids[prefix_offset:read_offset]`. Decoding with left context is what keeps sentencepiece's leading
    space on "▁word" tokens (a decode that starts at that token strips it) and joins byte tokens into
    characters; if the addition ends in U+FFFD, a character is still incomplete and nothing is emitted
    until a later token completes it (or `flush` gives up at the end of the request).

    Invariant (tested): for prompt ids P and generated ids G, the pushed chunks plus `flush()` concatenate to
    `decode(P + G)[len(decode(P)):]`, whenever `decode(P + G)` starts with `decode(P)` (with P empty: to
    `decode(G)`). Special tokens are skipped. One known exception, for byte-fallback tokenizers only:
    `tokenizers`' ByteFallback decoder turns a whole run of adjacent byte tokens into U+FFFDs if any part of
    the run is invalid, whereas the stream has already shown the run's valid characters. Ids produced by
    encoding text never contain such runs. A prompt that ends mid-character has that character emitted
    once generated ids complete it (nothing of it, if they never do).
    """

    def __init__(self, tokenizer: _Decodes, prompt_ids: TokenIds = ()) -> None:
        self._tok = tokenizer
        self._ids = [int(i) for i in prompt_ids]
        self._chunks: list[str] = []
        read = len(self._ids)
        prefix = max(read - _PROMPT_CONTEXT, 0)
        # The context must start on a character boundary, or its first character decodes as U+FFFD
        # (and, with byte fallback, can garble the whole byte run), so step left off continuation bytes.
        for _ in range(_MAX_BACKTRACK):
            if prefix == 0 or not self._decode(prefix, read).startswith(_REPLACEMENT):
                break
            prefix -= 1
        # A prompt that ends mid-character: leave its tail unread, so the character is emitted once a
        # generated token completes it (its U+FFFDs would otherwise throw off the length-based diff).
        for _ in range(_MAX_BACKTRACK - 1):
            if read == prefix or not self._decode(prefix, read).endswith(_REPLACEMENT):
                break
            read -= 1
        self._prefix, self._read = prefix, read
        self._prefix_text = self._decode(prefix, read)
        self._prompt_end, self._prompt_text = len(self._ids), self._decode(prefix)

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tok.decode(self._ids[start:stop], skip_special_tokens=True)

    def _step(self, final: bool) -> str:
        """Emits the text of the unread ids if complete (or `final`), then slides the window."""
        if self._read == len(self._ids):
            return ""
        full = self._decode(self._prefix)
        head = self._prefix_text
        if self._read < self._prompt_end and full.startswith(self._prompt_text):
            # The prompt's unread tail was not completed into a character (or was a literal U+FFFD): its
            # text belongs to the prompt, so it is not emitted.
            head = self._prompt_text
        new = full[len(head) :]
        if not final and (not new or new.endswith(_REPLACEMENT)):
            # Incomplete character, or nothing visible yet. The latter must wait too: a window starting at a
            # skipped special token would lose the space of the "▁word" after it to the decoder's strip.
            return ""
        # The just-read ids become the next window's context, so the window stays a few tokens long.
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._prefix)
        self._chunks.append(new)
        return new

    def push(self, token_ids: TokenIds) -> str:
        """Adds generated ids; returns the newly completed text (possibly "")."""
        out = []
        # One id at a time: a batch that ends mid-character must still emit the characters before it.
        for tid in token_ids:
            self._ids.append(int(tid))
            out.append(self._step(final=False))
        return "".join(out)

    def flush(self) -> str:
        """Ends the request: emits whatever was held back, U+FFFD and all."""
        return self._step(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)


class Tokenizer:
    """A tokenizer.json (HF `tokenizers`) plus the model's BOS/EOS ids."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_id: int | None = None, eos_ids: Iterable[int] = ()) -> None:
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))  # de-duplicated, order kept

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Loads `path/tokenizer.json`; special ids from generation_config, tokenizer_config, then config.json."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (expected {tok_file})")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{tok_file} is not a valid Hugging Face tokenizer.json: {e}") from e
        gen, tok_cfg, cfg = (
            _read_json(path / name) for name in ("generation_config.json", "tokenizer_config.json", "config.json")
        )

        def token_id(entry: Any) -> int | None:
            # tokenizer_config stores tokens as strings or as AddedToken dicts {"content": ...}.
            content = entry.get("content") if isinstance(entry, dict) else entry
            return tok.token_to_id(content) if isinstance(content, str) else None

        bos_ids = [*_ids(gen.get("bos_token_id")), token_id(tok_cfg.get("bos_token")), *_ids(cfg.get("bos_token_id"))]
        bos_id = next((i for i in bos_ids if i is not None), None)
        eos_ids = [*_ids(gen.get("eos_token_id")), token_id(tok_cfg.get("eos_token"))]
        eos_ids = [i for i in eos_ids if i is not None] or _ids(cfg.get("eos_token_id"))
        return cls(tok, bos_id, eos_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Whether BOS is added is up to tokenizer.json's post-processor (as in HF)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: TokenIds, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_ids: TokenIds = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids)


class ByteTokenizer:
    """Raw UTF-8 bytes as ids 0..255, plus BOS (256) and EOS (257); needs no files."""

    bos_id: int | None = 256
    eos_ids: tuple[int, ...] = (257,)
    vocab_size: int = 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([256] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids: TokenIds, skip_special_tokens: bool = True) -> str:
        # Bytes are collected per run between special tokens so that a special token never splices into a
        # multi-byte character; invalid bytes become U+FFFD just as in `tokenizers`' byte-level decoder.
        parts, run = [], bytearray()
        for i in map(int, ids):
            if 0 <= i < 256:
                run.append(i)
            elif not skip_special_tokens and i in (256, 257):
                parts += [run.decode("utf-8", errors="replace"), "<s>" if i == 256 else "</s>"]
                run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")

    def detokenizer(self, prompt_ids: TokenIds = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """`Tokenizer.from_dir(path)`, or None if `path` has no tokenizer.json (the caller picks a fallback)."""
    return Tokenizer.from_dir(path) if (Path(path) / "tokenizer.json").is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, {} when absent; CheckpointError naming the file when it is not one."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _ids(value: Any) -> list[int]:
    """A config's token id field (int, list of ints, or null) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise CheckpointError(f"a special token id must be an integer or a list of integers, got {value!r}")
    return [int(v) for v in values]
