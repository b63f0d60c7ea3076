"""Sliding-window perplexity with Hugging Face's stride method, shared by scripts/eval_perplexity.py
(one checkpoint) and scripts/eval_quant.py (every quantization mode of one checkpoint). The method
(windows, which tokens are scored, the token-weighted mean NLL, float32 NLLs on the device) is
described in `python scripts/eval_perplexity.py --help`.

Not a CLI: imported by those scripts as `import stride_perplexity`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxinfer


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; targets at positions [score_start, end) are scored."""

    begin: int
    end: int
    score_start: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_start


def check_settings(num_tokens: int, window: int, stride: int, batch: int = 1) -> None:
    """Raises ValueError for settings the stride method cannot run."""
    if window < 2:
        raise ValueError(f"--window must be at least 2 (a token and its context), got {window}")
    if stride < 1:
        raise ValueError(f"--stride must be at least 1, got {stride}")
    if stride > window:
        raise ValueError(f"--stride ({stride}) must not exceed --window ({window}): "
                         "tokens between windows would never be scored")
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {num_tokens}")


def stride_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows of HF's stride loop over `num_tokens` tokens (scripts/eval_perplexity.py --help)."""
    check_settings(num_tokens, window, stride)
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        # A target needs at least one token of context inside its window: position begin is never scored.
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


# score_batch(tokens int32 [batch, window]) -> NLL [batch, window - 1]: entry [b, j] is the NLL of
# tokens[b, j + 1] given tokens[b, :j + 1].
ScoreFn = Callable[[np.ndarray], np.ndarray]


def sliding_window_nll(score_batch: ScoreFn, token_ids: Sequence[int], window: int, stride: int, batch: int,
                       progress: bool = False) -> dict:
    """The stride method over any scoring function; model-free, so the bookkeeping is testable alone."""
    ids = np.asarray(token_ids, dtype=np.int32)
    check_settings(len(ids), window, stride, batch)
    windows = stride_windows(len(ids), window, stride)
    width = min(window, len(ids))  # one compiled shape: every window padded to this
    rows = min(batch, len(windows))
    total, count = 0.0, 0
    pending: list[tuple[list[Window], object]] = []  # one batch in flight while the next is dispatched
    start = time.perf_counter()
    first_batch_s = None
    bar = tqdm(total=len(windows), unit="window", desc="perplexity", disable=not progress, file=sys.stderr)

    def collect():
        nonlocal total, count, first_batch_s
        group, out = pending.pop(0)
        nll = np.asarray(out, dtype=np.float64)
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
        for r, w in enumerate(group):
            # Target position p is entry p - begin - 1 of its row.
            scored = nll[r, w.score_start - w.begin - 1 : w.end - w.begin - 1]
            total += math.fsum(scored)
            count += scored.size
        bar.update(len(group))

    for i in range(0, len(windows), rows):
        group = windows[i : i + rows]
        tokens = np.zeros((rows, width), np.int32)  # token 0 pads each row's end and the unused rows
        for r, w in enumerate(group):
            tokens[r, : w.end - w.begin] = ids[w.begin : w.end]
        pending.append((group, score_batch(tokens)))
        if len(pending) > 1:
            collect()
    while pending:
        collect()
    bar.close()
    nll = total / count
    seconds = time.perf_counter() - start
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": count, "windows": len(windows),
            "window": window, "stride": stride, "batch": batch, "total_nll": total, "seconds": seconds,
            "first_batch_seconds": first_batch_s, "tokens_per_s": count / seconds}


@jax.jit
def token_nll(model: jaxinfer.Model, tokens: jax.Array) -> jax.Array:
    logits = jaxinfer.forward(model, tokens)[:, :-1]  # float32 [batch, window - 1, vocab]
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


def evaluate(model: jaxinfer.Model, token_ids: Sequence[int], window: int, stride: int, batch: int,
             progress: bool = False) -> dict:
    """Mean NLL / perplexity of `token_ids` under `model` with the stride method
    (scripts/eval_perplexity.py --help)."""
    ids = np.asarray(token_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= model.config.vocab_size):
        raise ValueError(f"token ids must lie in [0, {model.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
    return sliding_window_nll(lambda t: token_nll(model, jnp.asarray(t)), ids, window, stride, batch, progress)


def text_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer (tokenizer.json); FileNotFoundError when it has none."""
    tok = jaxinfer.load_tokenizer(model_dir)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}: cannot tokenize the text")
    return tok


def encode_text(tok, text_file: str | Path) -> tuple[list[int], bool]:
    """(ids, bos_prepended): the UTF-8 file encoded with `tok`, BOS first when the tokenizer did
    not add it and has one."""
    ids = tok.encode(Path(text_file).read_text(encoding="utf-8"))
    prepend = tok.bos_id is not None and (not ids or ids[0] != tok.bos_id)
    if prepend:
        ids = [tok.bos_id, *ids]
    return ids, prepend
