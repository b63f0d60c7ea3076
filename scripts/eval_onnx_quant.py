"""ONNX Runtime's dynamic int8 quantization vs jaxinfer's int8, on quality (perplexity) and speed.

    python scripts/eval_onnx_quant.py                       # stories260K + tinyshakespeare (shared assets)
    python scripts/eval_onnx_quant.py --model DIR --text FILE --max-tokens 4096 --window 256 --stride 128 \\
        --decode-batch 8 --decode-tokens 64 --threads 2 --json out.json

Rows (every one scored on the same tokens with scripts/eval_perplexity.py's stride method):

- jaxinfer fp32: `jaxinfer.forward` / `jaxinfer.Engine` of the dense checkpoint.
- jaxinfer int8: `jaxinfer.quantize(model, "int8")`: RTN, symmetric, one scale per output
  channel, the seven linear weights of every layer; activations stay float (weight-only).
- ORT fp32: the checkpoint exported with `jaxinfer.export_onnx` (forward and decode graphs) on
  ONNX Runtime's CPU execution provider, all graph optimisations on.
- ORT int8 dynamic: `onnxruntime.quantization.quantize_dynamic` of those graphs with its defaults
  (QInt8 weights, per tensor, its default op types): weights int8, activations quantized to uint8
  at run time per tensor (DynamicQuantizeLinear -> MatMulInteger), i.e. W8A8.
- ORT int8 dynamic, per channel, MatMul only: `per_channel=True, op_types_to_quantize=["MatMul"]`,
  the weight grid closest to jaxinfer int8's (the same 7 x layers weights: the attention
  MatMuls have no constant weight, and the tied lm_head is an Einsum, so neither side quantizes
  them), still W8A8.

Quality: perplexity and its change vs the same runtime's fp32. Speed: (a) scored tokens/s of the
perplexity forward ([--batch, --window] windows), best of --repeats after a warm-up pass, and (b)
greedy decode tokens/s: --decode-batch prompts of --prompt-len tokens (taken from the text),
--decode-tokens new tokens each, EOS ignored; jaxinfer through `Engine.generate` (max_slots =
--decode-batch), ORT through `onnx_export.ort_generate` (the plain batched loop over the exported
decode step); best of --repeats after a warm-up run; plus the fraction of each quantized row's
greedy tokens equal to its fp32 row's. Threads: ORT gets --threads intra-op threads; XLA:CPU
uses the cores it finds (run with taskset to pin both to the same cores). Needs the "onnx" extra.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

import jaxinfer
import stride_perplexity as sp
from bench_common import write_json
from jaxinfer import onnx_export as ox

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"


def ort_nll(session):
    """score_batch for stride_perplexity: NLL [batch, window - 1] from the forward session's logits
    (log-softmax in float64 on the host)."""

    def score(tokens: np.ndarray) -> np.ndarray:
        logits = ox.ort_forward(session, tokens)[:, :-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
        return lse - np.take_along_axis(logits, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]

    return score


def perplexity(score, ids, window, stride, batch, repeats) -> dict:
    width = min(window, len(ids))
    score(np.zeros((min(batch, len(sp.stride_windows(len(ids), window, stride))), width), np.int32))  # warm-up
    res = sp.sliding_window_nll(score, ids, window, stride, batch)
    best = res["seconds"]
    for _ in range(repeats - 1):
        best = min(best, sp.sliding_window_nll(score, ids, window, stride, batch)["seconds"])
    return {"perplexity": res["perplexity"], "nll": res["nll"], "scored_tokens": res["tokens"],
            "ppl_seconds": best, "ppl_tokens_per_s": res["tokens"] / best}


def timed(fn, repeats: int):
    """(result, best seconds) of fn() after one warm-up call."""
    fn()
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def engine_decode(model, prompts, new_tokens, repeats):
    max_seq = 1 << (max(map(len, prompts)) + new_tokens).bit_length()
    engine = jaxinfer.Engine(model, max_slots=len(prompts), page_size=16,
                             num_pages=len(prompts) * (max_seq // 16) + 1, max_seq_len=max_seq, seed=0)
    params = jaxinfer.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outs, seconds = timed(lambda: engine.generate(prompts, params), repeats)
    return [list(map(int, o.token_ids)) for o in outs], seconds


def quantize_ort(src: Path, dst: Path, per_channel_matmul: bool) -> Path:
    # optional dependency: onnxruntime (the "onnx" extra)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    opts = {"per_channel": True, "op_types_to_quantize": ["MatMul"]} if per_channel_matmul else {}
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, **opts)
    return dst


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "stories260K"), help="HF-format checkpoint dir")
    ap.add_argument("--text", default=str(ASSETS / "text" / "tinyshakespeare.txt"), help="UTF-8 text to score")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward call")
    ap.add_argument("--decode-batch", type=int, default=8, help="prompts decoded together (0: skip decode speed)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "tmp" / "onnx"), help="exported graphs go here")
    ap.add_argument("--json", help="write the results here")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if (reason := ox.onnx_available()) is not None:
        raise SystemExit(f"eval_onnx_quant: {reason}")
    import onnxruntime

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = jaxinfer.load_model(args.model, dtype="float32")
    ids = np.asarray(sp.encode_text(sp.text_tokenizer(args.model), args.text)[0][: args.max_tokens], np.int32)
    prompts = [ids[i * args.prompt_len: (i + 1) * args.prompt_len].tolist() for i in range(args.decode_batch)]
    graphs = {k: jaxinfer.export_onnx(model, work / f"fp32-{k}.onnx", kind=k) for k in ox.KINDS}
    ort_rows = {"ORT fp32": graphs,
                "ORT int8 dynamic": {k: quantize_ort(p, work / f"int8-{k}.onnx", False) for k, p in graphs.items()},
                "ORT int8 dynamic, per channel, MatMul only": {
                    k: quantize_ort(p, work / f"int8pc-{k}.onnx", True) for k, p in graphs.items()}}
    rows: dict[str, dict] = {}
    for name, m in (("jaxinfer fp32", model), ("jaxinfer int8", jaxinfer.quantize(model, "int8"))):
        print(f"{name} ...", file=sys.stderr)
        r = rows[name] = perplexity(lambda t, m=m: sp.token_nll(m, t), ids, args.window, args.stride, args.batch,
                                    args.repeats)
        if args.decode_batch:
            r["tokens"], secs = engine_decode(m, prompts, args.decode_tokens, args.repeats)
            r.update(decode_seconds=secs, decode_tokens_per_s=args.decode_batch * args.decode_tokens / secs)
    for name, files in ort_rows.items():
        print(f"{name} ...", file=sys.stderr)
        fwd = ox.ort_session(files["forward"], threads=args.threads)
        r = rows[name] = perplexity(ort_nll(fwd), ids, args.window, args.stride, args.batch, args.repeats)
        counts = ox.op_counts(files["forward"])
        r.update(matmul_integer_nodes=counts.get("MatMulInteger", 0), fp32_matmul_nodes=counts.get("MatMul", 0),
                 file_bytes=files["forward"].stat().st_size)
        if args.decode_batch:
            dec = ox.ort_session(files["decode"], threads=args.threads)
            r["tokens"], secs = timed(lambda: ox.ort_generate(dec, prompts, args.decode_tokens), args.repeats)
            r.update(decode_seconds=secs, decode_tokens_per_s=args.decode_batch * args.decode_tokens / secs)
    for name, r in rows.items():
        base = rows["jaxinfer fp32" if name.startswith("jaxinfer") else "ORT fp32"]
        r["ppl_change_pct_vs_fp32"] = 100 * (r["perplexity"] / base["perplexity"] - 1)
        if "tokens" in r:
            same = [a == b for a, b in zip(r["tokens"], base["tokens"])]
            r["greedy_identical_to_fp32"] = sum(same) / len(same)
    print(f"\n{'row':44s} {'ppl':>8s} {'vs fp32':>8s} {'ppl tok/s':>10s} {'decode tok/s':>12s} {'greedy = fp32':>13s}")
    for name, r in rows.items():
        print(f"{name:44s} {r['perplexity']:8.3f} {r['ppl_change_pct_vs_fp32']:+7.2f}% {r['ppl_tokens_per_s']:10.0f} "
              f"{r.get('decode_tokens_per_s', float('nan')):12.0f} {r.get('greedy_identical_to_fp32', float('nan')):13.0%}")
    out = {"command": "python scripts/eval_onnx_quant.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": str(args.model), "text": str(args.text), "max_tokens": args.max_tokens, "window": args.window,
           "stride": args.stride, "batch": args.batch, "decode_batch": args.decode_batch,
           "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens, "ort_threads": args.threads,
           "repeats": args.repeats, "onnxruntime": onnxruntime.__version__, "jax": jax.__version__, "platform": platform.platform(),
           "rows": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()}}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
