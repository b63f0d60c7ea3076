"""Sliding-window perplexity of a checkpoint on a text file, optionally checked against transformers.

    python scripts/eval_perplexity.py --model ../shared/assets/stories260K \\
        --text ../shared/assets/text/tinyshakespeare.txt --max-tokens 512 --window 512
    python scripts/eval_perplexity.py --model DIR --text FILE --max-tokens 4096 --window 256 \\
        --stride 128 --batch 8 --compare-hf --json out.json

Tokens: the text is encoded with the checkpoint's tokenizer.json; BOS is prepended when the
tokenizer did not add it and the checkpoint has one; then the first --max-tokens tokens are kept.

Windows (Hugging Face's stride method, transformers docs "Perplexity of fixed-length models"):
window k covers tokens [begin, end) with begin = k * stride and end = min(begin + window, N),
stopping at the first window that reaches N. In each window only the tokens after the previous
window's end are scored (positions [prev_end, end)); the earlier ones are context. The first
token of the whole sequence has no context and is never scored, and neither is the first token of
a window that has no context either (stride == window: non-overlapping windows, as in HF), so
with stride < window exactly N - 1 tokens are scored, each once.

Mean NLL: the sum of the scored tokens' NLL over the number of scored tokens, an exact
token-weighted mean (not a mean of per-window means, which would over-weight the shorter last
window). HF's docs snippet weights each window's mean loss by `valid labels - 1`, which is one
token short whenever a window has context before its scored tokens; `hf_evaluate` keeps HF's
loop and loss but weights by the number of labels the loss really averaged, so both sides compute
the same quantity. perplexity = exp(mean NLL).

Compute: `jaxinfer.forward` (float32 logits) on batches of --batch windows, each padded to exactly
`window` tokens with token 0 at the end (causal attention: padding after a position cannot change
its logits; so there is one compiled shape, the last batch padded with empty rows). The per-token
NLL = logsumexp(logits) - logit[target] is taken on the device in float32 inside the same jit,
and only [batch, window-1] NLLs go back to the host, which sums them in float64. Float32 is
enough there: logsumexp subtracts the row max, so each token's NLL carries an absolute error of a
few float32 ulps of the logits (~1e-6), far below the 1e-4 agreement asked of the result, and
unbiased across tokens; moving [batch, window, vocab] logits to the host for a float64
log-softmax would cost (for a 128k vocabulary, window 2048, batch 8) 8 GiB per batch.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax

import jaxinfer
from bench_common import write_json
from jaxinfer.weights import SUPPORTED_DTYPES
from stride_perplexity import (  # noqa: F401  (Window, sliding_window_nll, stride_windows: used by tests)
    Window, check_settings, encode_text, evaluate, sliding_window_nll, stride_windows, text_tokenizer,
)


def hf_evaluate(model_dir: str | Path, token_ids: Sequence[int], window: int, stride: int) -> dict:
    """The same windows through transformers (float32, one window per call, loss from `labels`).

    HF's docs loop, with the loss weighted by the number of labels it really averaged (module
    docstring). Imports torch/transformers here only: they are test-time oracles, not dependencies.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    check_settings(len(token_ids), window, stride)
    # `dtype` since transformers 4.56 (`torch_dtype` before; deprecated with a warning in 5.x).
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **{dtype_kw: torch.float32})
    model.eval()
    ids = torch.tensor([list(map(int, token_ids))], dtype=torch.long)
    seq_len = ids.size(1)
    start = time.perf_counter()
    nll_sum, n_tokens, n_windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        n_windows += 1
        n = int((target_ids[:, 1:] != -100).sum())  # labels left after HF's internal shift
        if n:
            with torch.no_grad():
                loss = model(input_ids, labels=target_ids).loss
            nll_sum += float(loss) * n
            n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    seconds = time.perf_counter() - start
    nll = nll_sum / n_tokens
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": n_tokens, "windows": n_windows,
            "seconds": seconds}


def load_token_ids(model_dir: str | Path, text_file: str | Path, max_tokens: int | None = None) -> tuple[list[int], bool]:
    """(ids, bos_prepended): the text encoded with the checkpoint's tokenizer, BOS first, cut to max_tokens."""
    ids, prepend = encode_text(text_tokenizer(model_dir), text_file)
    return ids[:max_tokens] if max_tokens is not None else ids, prepend


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF-format checkpoint dir (config.json, safetensors, tokenizer.json)")
    ap.add_argument("--text", required=True, help="UTF-8 text file to score")
    ap.add_argument("--max-tokens", type=int, help="score only the first N tokens (BOS included; default: all)")
    ap.add_argument("--window", type=int,
                    help="tokens per window (default: the model's max_position_embeddings, at most 1024)")
    ap.add_argument("--stride", type=int, help="step between window starts (default: window // 2)")
    ap.add_argument("--batch", type=int, default=4, help="windows per forward call (default: 4)")
    ap.add_argument("--dtype", default="float32", choices=SUPPORTED_DTYPES, help="compute dtype (default: float32)")
    ap.add_argument("--compare-hf", action="store_true",
                    help="also run the same windows through transformers (float32) and report the difference")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    model_dir, text_file = Path(args.model), Path(args.text)
    try:  # the explicit settings, before anything is loaded (the defaults depend on the model)
        stride = args.stride if args.stride is not None else 1
        check_settings(2, args.window if args.window is not None else max(stride, 2), stride, args.batch)
    except ValueError as e:
        ap.error(str(e))
    if not (model_dir / "config.json").is_file():
        ap.error(f"--model {model_dir}: no config.json there")
    if not text_file.is_file():
        ap.error(f"--text {text_file}: no such file")
    if args.max_tokens is not None and args.max_tokens < 2:
        ap.error(f"--max-tokens must be at least 2, got {args.max_tokens}")

    model = jaxinfer.load_model(model_dir, dtype=args.dtype)
    window = args.window if args.window is not None else min(model.config.max_position_embeddings, 1024)
    stride = args.stride if args.stride is not None else max(window // 2, 1)
    try:
        ids, prepended = load_token_ids(model_dir, text_file, args.max_tokens)
        check_settings(len(ids), window, stride, args.batch)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if min(window, len(ids)) > model.config.max_position_embeddings:
        print(f"warning: window {window} exceeds the model's max_position_embeddings "
              f"({model.config.max_position_embeddings})", file=sys.stderr)

    res = evaluate(model, ids, window, stride, args.batch, progress=not args.no_progress)
    out = {"model": str(model_dir), "text": str(text_file), "dtype": args.dtype, "max_tokens": args.max_tokens,
           "input_tokens": len(ids), "bos_prepended": prepended, **res,
           "backend": jax.default_backend(), "machine": platform.platform()}
    if args.compare_hf:
        hf = hf_evaluate(model_dir, ids, window, stride)
        if hf["tokens"] != res["tokens"] or hf["windows"] != res["windows"]:
            raise RuntimeError(f"HF scored {hf['tokens']} tokens in {hf['windows']} windows, "
                               f"jaxinfer {res['tokens']} in {res['windows']}")
        out.update(hf_nll=hf["nll"], hf_perplexity=hf["perplexity"], hf_seconds=hf["seconds"],
                   rel_diff=abs(res["nll"] - hf["nll"]) / abs(hf["nll"]))

    print(f"model: {model_dir} ({args.dtype}, backend {out['backend']}); text: {text_file}")
    print(f"{len(ids)} tokens (BOS {'prepended' if prepended else 'from the tokenizer or none'}), "
          f"{res['windows']} windows of {window}, stride {stride}, batch {args.batch}; "
          f"{res['tokens']} tokens scored")
    print(f"{'impl':<14}{'mean NLL':>12}{'perplexity':>13}{'seconds':>10}{'tok/s':>10}")
    print(f"{'jaxinfer':<14}{res['nll']:>12.6f}{res['perplexity']:>13.4f}{res['seconds']:>10.2f}"
          f"{res['tokens_per_s']:>10.0f}")
    print(f"  (jaxinfer seconds include compilation: the first batch took {res['first_batch_seconds']:.2f} s)")
    if args.compare_hf:
        print(f"{'transformers':<14}{out['hf_nll']:>12.6f}{out['hf_perplexity']:>13.4f}{out['hf_seconds']:>10.2f}"
              f"{res['tokens'] / out['hf_seconds']:>10.0f}")
        print(f"relative difference of the mean NLL: {out['rel_diff']:.3e}")
    if args.json:
        write_json(args.json, out, indent=2)
    return out


if __name__ == "__main__":
    main()
