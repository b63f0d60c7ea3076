"""Quantization quality / size / speed table: one checkpoint, several quantization modes.

    python scripts/eval_quant.py                       # stories260K + tinyshakespeare (shared assets)
    python scripts/eval_quant.py --model DIR --text FILE --max-tokens 4096 --window 256 --stride 128 \\
        --modes fp32,int8,int4-g32,gptq4-g32,nf4,llm_int8 --calib-samples 32 --calib-seq-len 128 \\
        --json out/eval_quant.json

The dense checkpoint is quantized in memory with `jaxinfer.quantize` once per mode and every
mode is scored on the same tokens with scripts/eval_perplexity.py's stride method (text encoded
with the checkpoint's tokenizer.json, BOS prepended, first --max-tokens tokens). One table row per
mode: perplexity and mean NLL, the perplexity change vs fp32 in %, the bytes of the seven linear
weights of every layer (codes + scales + zeros + g_idx + code table) vs their fp32 bytes,
quantization time, and speed.

Modes (comma-separated; options are dash-separated suffixes):
    fp32                  the dense model (always evaluated: it is the baseline)
    int8                  RTN 8-bit, per output channel          (-g<N>: groups of N input rows)
    int4 / int<B>         RTN B-bit (2, 3, 4, 8), groups of 128  (-g<N>, -pc: per output channel)
    gptq / gptq<B>        GPTQ B-bit (default 4), groups of 128  (-g<N>, -pc, -act: act-order)
    nf4                   bitsandbytes NF4, blocks of 64         (-g<N>)
    llm_int8              bitsandbytes LLM.int8 (outlier threshold 6; -t<X> to change it)
  every affine mode takes -asym (zero-point grid; default symmetric).
  e.g. int4-g32, gptq4-g32, gptq4-g64-act, gptq3-g32-asym, nf4-g32.

Group sizes need not divide the input dims: the quantizer gives the last group of a row range the
remaining rows (e.g. stories260K's w_down has K = 172: g32 is 5 groups of 32 plus one of 12),
recorded per row in g_idx, without padding; the table says which weights have such a shorter
last group. 4-bit codes are packed two per byte and need an even K.

GPTQ calibration: --calib-samples sequences of --calib-seq-len consecutive tokens from a slice of
the text that does NOT overlap the evaluated tokens: from --calib-offset (default: token 8192, or
the end of the evaluated tokens if that is later), or from --calib-text (a separate file, from its
start by default).

Speed: tokens/s of the perplexity forward ([batch, window] windows through `jaxinfer.forward`),
timed after a warm-up call that compiles it; with --decode-tokens N > 0 (default 64) also greedy
decode tokens/s through `jaxinfer.Engine` (one request, N new tokens, after an identical warm-up
run); each is the best of --repeats timed passes. On CPU the quantized path dequantizes the
weights in XLA inside every matmul (QuantizedWeight.matmul, the plain-jnp reference), so quantized
speed there is NOT representative of fused GPU kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxinfer
import stride_perplexity as sp
from bench_common import write_json
from jaxinfer.quant import QuantizedWeight
from jaxinfer.quant.quantize import LINEAR_KEYS

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
DEFAULT_MODEL = ASSETS / "stories260K"
DEFAULT_TEXT = ASSETS / "text" / "tinyshakespeare.txt"
DEFAULT_MODES = "fp32,int8,int4-g32,gptq4-g32,nf4,llm_int8"
DEFAULT_CALIB_OFFSET = 8192
CPU_NOTE = ("note: on CPU the quantized linears dequantize their weights in XLA inside every matmul "
            "(the plain-jnp reference path), so the quantized speeds are not representative of fused GPU kernels.")


@dataclasses.dataclass(frozen=True)
class Mode:
    """One parsed --modes entry: the jaxinfer.quantize method (None: dense fp32) and its options."""

    name: str
    method: str | None
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def group_size(self) -> int | None:
        """The requested group size (None: per output channel / not applicable)."""
        if self.method is None:
            return None
        return self.options.get("group_size", {"int8": None, "int4": 128, "gptq": 128, "nf4": 64,
                                               "llm_int8": None}[self.method])

    @property
    def bits(self) -> int:
        if self.method is None:
            return 32
        return self.options.get("bits", {"int8": 8, "int4": 4, "gptq": 4, "nf4": 4, "llm_int8": 8}[self.method])


_MODE_RE = re.compile(r"^(fp32|llm_int8|nf4|int\d|gptq\d?)((?:-[a-z0-9.]+)*)$")


def parse_mode(spec: str) -> Mode:
    """'gptq4-g32-act' -> Mode('gptq4-g32-act', 'gptq', {bits: 4, group_size: 32, act_order: True})."""
    name = spec.strip().lower()
    m = _MODE_RE.match(name)
    if not m:
        raise ValueError(f"unknown mode {spec!r}: expected fp32, int8, int<B>[-g<N>|-pc], gptq[<B>][-g<N>|-pc][-act], "
                         "nf4[-g<N>], llm_int8[-t<X>], affine modes with optional -asym")
    base, suffixes = m.group(1), [s for s in m.group(2).split("-") if s]
    if base == "fp32":
        if suffixes:
            raise ValueError(f"mode {spec!r}: fp32 takes no options")
        return Mode(name, None)
    opts: dict = {}
    if base.startswith("int"):
        method, bits = ("int8" if base == "int8" else "int4"), int(base[3:])
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"mode {spec!r}: bits must be 2, 3, 4 or 8")
        opts["bits"] = bits
    elif base.startswith("gptq"):
        method = "gptq"
        opts["bits"] = int(base[4:]) if len(base) > 4 else 4
        if opts["bits"] not in (2, 3, 4, 8):
            raise ValueError(f"mode {spec!r}: bits must be 2, 3, 4 or 8")
    else:
        method = base
    for s in suffixes:
        if re.fullmatch(r"g\d+", s):
            if int(s[1:]) < 1:
                raise ValueError(f"mode {spec!r}: group size must be positive")
            opts["group_size"] = int(s[1:])
        elif s == "pc" and method in ("int8", "int4", "gptq"):
            opts["group_size"] = None
        elif s == "asym" and method in ("int8", "int4", "gptq"):
            opts["sym"] = False
        elif s == "act" and method == "gptq":
            opts["act_order"] = True
        elif re.fullmatch(r"t\d+(\.\d+)?", s) and method == "llm_int8":
            opts["threshold"] = float(s[1:])
        else:
            raise ValueError(f"mode {spec!r}: option -{s} does not apply to {method}")
    if method == "llm_int8" and "group_size" in opts:
        raise ValueError(f"mode {spec!r}: llm_int8 is per output row; it takes no group size")
    return Mode(name, method, opts)


def parse_modes(text: str) -> list[Mode]:
    modes = [parse_mode(s) for s in text.split(",") if s.strip()]
    names = [m.name for m in modes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"mode(s) given twice: {', '.join(dup)}")
    if "fp32" not in names:
        modes.insert(0, parse_mode("fp32"))  # the baseline of every delta
    return modes


# ---------------------------------------------------------------------------------------------
# Sizes


def _nbytes(a) -> int:
    return 0 if a is None else int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize


def weight_sizes(model: jaxinfer.Model) -> dict:
    """Bytes of the seven linear weights of every layer as stored, and as fp32, plus the weights
    whose group size leaves a shorter last group."""
    layers = model.params["layers"]
    stored = dense = numel = 0
    ragged = []
    for key in LINEAR_KEYS:
        w = layers[key]
        if isinstance(w, QuantizedWeight):
            stored += sum(_nbytes(a) for a in (w.codes, w.scales, w.zeros, w.g_idx, w.table))
            n = int(np.prod(w.shape))
            k = w.in_features
            if w.kind != "llm_int8" and w.group_size < k and k % w.group_size:
                ragged.append(f"{key} (K={k}: {k // w.group_size}x{w.group_size}+{k % w.group_size})")
        else:
            n = int(np.prod(w.shape))
            stored += n * 4
        dense += n * 4
        numel += n
    return {"weight_bytes": stored, "fp32_weight_bytes": dense, "size_ratio": dense / stored,
            "bits_per_weight": 8 * stored / numel, "num_weights": numel, "ragged_groups": ragged}


# ---------------------------------------------------------------------------------------------
# Speed


def timed_perplexity(model: jaxinfer.Model, ids: np.ndarray, window: int, stride: int, batch: int,
                     repeats: int = 1) -> dict:
    """stride_perplexity.evaluate after a warm-up call of the same compiled shape (compile excluded);
    tokens_per_s is the best of `repeats` passes (the first one gives the NLL)."""
    rows = min(batch, len(sp.stride_windows(len(ids), window, stride)))
    width = min(window, len(ids))
    t0 = time.perf_counter()
    jax.block_until_ready(sp.token_nll(model, jnp.zeros((rows, width), jnp.int32)))
    compile_s = time.perf_counter() - t0
    res = sp.evaluate(model, ids, window, stride, batch)
    best = res["seconds"]
    for _ in range(repeats - 1):
        best = min(best, sp.evaluate(model, ids, window, stride, batch)["seconds"])
    res.update(compile_seconds=compile_s, best_seconds=best, tokens_per_s=res["tokens"] / best)
    return res


def decode_speed(model: jaxinfer.Model, prompt: list[int], new_tokens: int, repeats: int = 1) -> dict:
    """Greedy decode tokens/s through jaxinfer.Engine (one request; prefill included), best of
    `repeats` runs after an identical warm-up run."""
    max_seq = min(model.config.max_position_embeddings, 1 << (len(prompt) + new_tokens + 1).bit_length())
    engine = jaxinfer.Engine(model, max_slots=1, page_size=16, num_pages=max_seq // 16 + 2, max_seq_len=max_seq,
                             decode_steps=8, seed=0)
    params = jaxinfer.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([prompt], params)  # compiles insert / decode_steps / evict
    seconds = math.inf
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        seconds = min(seconds, time.perf_counter() - t0)
    n = len(out.token_ids)
    return {"decode_tokens": n, "decode_seconds": seconds, "decode_tokens_per_s": n / seconds,
            "decode_token_ids": list(map(int, out.token_ids))}


# ---------------------------------------------------------------------------------------------
# Driver


def calibration_slice(all_ids: list[int], offset: int, samples: int, seq_len: int) -> np.ndarray:
    """int32 [n, seq_len]: up to `samples` consecutive sequences of all_ids[offset:]."""
    rest = all_ids[offset:]
    n = min(samples, len(rest) // seq_len)
    if n < 1:
        raise ValueError(f"only {len(rest)} calibration tokens from offset {offset}, fewer than --calib-seq-len "
                         f"{seq_len}; lower --calib-offset / --max-tokens or pass --calib-text")
    return np.asarray(rest[: n * seq_len], np.int32).reshape(n, seq_len)


def run(model_dir, text_file, modes: list[Mode], *, max_tokens: int | None = 4096, window: int = 256,
        stride: int = 128, batch: int = 8, calib_text=None, calib_offset: int | None = None,
        calib_samples: int = 32, calib_seq_len: int = 128, damp: float = 0.01, decode_tokens: int = 0,
        repeats: int = 1, progress: bool = True) -> dict:
    """Quantize and evaluate every mode; returns the JSON-able results (see main for the table)."""
    model_dir, text_file = Path(model_dir), Path(text_file)
    t_start = time.perf_counter()
    model = jaxinfer.load_model(model_dir, dtype="float32")
    tok = sp.text_tokenizer(model_dir)

    def encode(path: Path) -> list[int]:
        return sp.encode_text(tok, path)[0]

    all_ids = encode(text_file)
    ids = np.asarray(all_ids[:max_tokens] if max_tokens is not None else all_ids, np.int32)
    sp.check_settings(len(ids), window, stride, batch)

    calib, calib_info = None, None
    if any(m.method == "gptq" for m in modes):
        if calib_text is not None:
            source, offset = encode(Path(calib_text)), calib_offset or 0
        else:
            source = all_ids
            offset = max(DEFAULT_CALIB_OFFSET, len(ids)) if calib_offset is None else calib_offset
            if offset < len(ids):
                raise ValueError(f"--calib-offset {offset} overlaps the {len(ids)} evaluated tokens")
        calib = calibration_slice(source, offset, calib_samples, calib_seq_len)
        calib_info = {"text": str(calib_text or text_file), "offset": offset, "samples": int(calib.shape[0]),
                      "seq_len": int(calib.shape[1])}

    prompt = list(map(int, ids[:16]))
    results = []
    bar = tqdm(modes, desc="eval_quant", unit="mode", disable=not progress, file=sys.stderr)
    for mode in bar:
        bar.set_postfix_str(mode.name)
        t0 = time.perf_counter()
        if mode.method is None:
            qmodel = model
        else:
            opts = dict(mode.options)
            if mode.method == "gptq":
                opts.update(calibration=calib, damp=damp)
            qmodel = jaxinfer.quantize(model, mode.method, **opts)
            jax.block_until_ready(qmodel.params)
        quant_s = time.perf_counter() - t0
        res = timed_perplexity(qmodel, ids, window, stride, batch, repeats)
        row = {"mode": mode.name, "method": mode.method or "fp32", "bits": mode.bits,
               "group_size": mode.group_size,
               "sym": mode.options.get("sym", True) if mode.method not in (None, "nf4", "llm_int8") else None,
               "options": {k: v for k, v in mode.options.items()},
               "nll": res["nll"], "perplexity": res["perplexity"], "tokens_scored": res["tokens"],
               "quantize_seconds": quant_s, "compile_seconds": res["compile_seconds"],
               "eval_seconds": res["seconds"], "tokens_per_s": res["tokens_per_s"], **weight_sizes(qmodel)}
        if decode_tokens > 0:
            row.update(decode_speed(qmodel, prompt, decode_tokens, repeats))
        results.append(row)
    bar.close()
    base = next(r for r in results if r["mode"] == "fp32")
    for r in results:
        r["ppl_delta_pct"] = 100.0 * (r["perplexity"] / base["perplexity"] - 1.0)
        r["nll_delta"] = r["nll"] - base["nll"]
    return {"model": str(model_dir), "text": str(text_file), "max_tokens": max_tokens, "input_tokens": int(len(ids)),
            "window": window, "stride": stride, "batch": batch, "calibration": calib_info, "damp": damp,
            "decode_tokens": decode_tokens, "repeats": repeats, "backend": jax.default_backend(),
            "devices": str(jax.devices()[0]),
            "machine": platform.platform(), "jax": jax.__version__, "total_seconds": time.perf_counter() - t_start,
            "modes": {r["mode"]: r for r in results}}


def kv_rows(model: jaxinfer.Model, ids: np.ndarray, kv_dtypes: list[str], seq: int = 500, chunk: int = 128) -> dict:
    """KV-cache quantization rows: per Engine kv_dtype, the perplexity of `ids` scored in
    consecutive prompts of `seq` tokens through the engine's prompt logprobs (chunked prefill of
    `chunk` tokens, so later chunks read earlier chunks' 8-bit pages), its change vs float KV
    ("auto"), the max |logprob error| of the scored tokens vs float KV over those long prompts
    (the error the KV quantization puts into the model's log-probabilities), teacher-forced
    top-1 agreement with float KV, and the pool's bytes per token."""
    kv_dtypes = ["auto"] + [d for d in kv_dtypes if d != "auto"]
    pieces = [list(map(int, ids[i:i + seq])) for i in range(0, len(ids) - 1, seq) if len(ids[i:i + seq]) > 1]
    rows = {}
    for d in kv_dtypes:
        e = jaxinfer.Engine(model, max_slots=1, page_size=16, num_pages=-(-seq // 16) + 4, max_seq_len=seq + 1,
                            kv_dtype=d, prefill_chunk=chunk, prefix_caching=False)
        lps, tops = [], []
        for p in pieces:
            out = e.generate([p], jaxinfer.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))[0]
            lps += [out.prompt_logprobs[i][t] for i, t in enumerate(p) if i > 0]
            tops += [max(out.prompt_logprobs[i], key=out.prompt_logprobs[i].get) for i in range(1, len(p))]
        rows[d] = {"kv_dtype": d, "pool_dtype": e.stats()["kv_dtype"], "kv_bytes_per_token": e.stats()["kv_bytes_per_token"],
                   "nll": -float(np.mean(lps)), "perplexity": float(np.exp(-np.mean(lps))),
                   "tokens_scored": len(lps), "_lps": np.asarray(lps), "_tops": np.asarray(tops)}
    base = {k: rows["auto"][k] for k in ("perplexity", "_lps", "_tops")}
    for r in rows.values():
        r["ppl_delta_pct"] = 100.0 * (r["perplexity"] / base["perplexity"] - 1.0)
        r["max_logprob_error"] = float(np.abs(r["_lps"] - base["_lps"]).max())
        r["top1_agreement"] = float(np.mean(r.pop("_tops") == base["_tops"]))
    for r in rows.values():
        r.pop("_lps")
    return {"seq": seq, "chunk": chunk, "rows": rows}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(out: dict) -> str:
    rows = list(out["modes"].values())
    decode = out["decode_tokens"] > 0
    head = (f"{'mode':<16}{'bits':>5}{'group':>7}{'ppl':>10}{'nll':>9}{'Δppl%':>8}{'weights':>11}"
            f"{'vs fp32':>9}{'bits/w':>8}{'quant s':>9}{'ppl tok/s':>11}" + (f"{'dec tok/s':>11}" if decode else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        group = "-" if r["method"] == "fp32" else ("ch" if r["group_size"] is None else str(r["group_size"]))
        lines.append(
            f"{r['mode']:<16}{r['bits']:>5}{group:>7}{r['perplexity']:>10.3f}{r['nll']:>9.5f}"
            f"{r['ppl_delta_pct']:>+8.2f}{_fmt_bytes(r['weight_bytes']):>11}{r['size_ratio']:>8.2f}x"
            f"{r['bits_per_weight']:>8.2f}{r['quantize_seconds']:>9.2f}{r['tokens_per_s']:>11.0f}"
            + (f"{r['decode_tokens_per_s']:>11.1f}" if decode else ""))
    return "\n".join(lines)


def summary_lines(out: dict) -> list[str]:
    cal = out["calibration"]
    lines = [f"model: {out['model']}  text: {out['text']}  backend: {out['backend']} ({out['devices']})",
             f"{out['input_tokens']} tokens (BOS first), window {out['window']}, stride {out['stride']}, "
             f"batch {out['batch']}; {next(iter(out['modes'].values()))['tokens_scored']} tokens scored"]
    if cal:
        lines.append(f"GPTQ calibration: {cal['samples']} x {cal['seq_len']} tokens of {cal['text']} from token "
                     f"{cal['offset']} (disjoint from the evaluated tokens), damp {out['damp']}")
    lines.append("weights: the 7 linear weights of every layer (codes + scales + zeros + g_idx + table) vs fp32; "
                 "'group': input rows per scale ('ch': per output channel; a group larger than K is one group of K); "
                 "embeddings / norms / lm_head stay fp32")
    ragged = {r["mode"]: r["ragged_groups"] for r in out["modes"].values() if r["ragged_groups"]}
    for mode, keys in ragged.items():
        lines.append(f"  {mode}: shorter last group (group size does not divide K, no padding): {', '.join(keys)}")
    speed = (f"ppl tok/s: scored tokens/s of the perplexity forward, compile excluded (warm-up call first), "
             f"best of {out['repeats']}")
    if out["decode_tokens"]:
        speed += (f"; dec tok/s: greedy Engine decode of {out['decode_tokens']} tokens from a 16-token prompt, "
                  f"batch 1, after a warm-up run, best of {out['repeats']}")
    lines.append(speed)
    if out["backend"] == "cpu":
        lines.append(CPU_NOTE)
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL.is_dir() else None,
                    help=f"dense HF-format checkpoint dir (default: {DEFAULT_MODEL} when present)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else None,
                    help=f"UTF-8 text to score (default: {DEFAULT_TEXT} when present)")
    ap.add_argument("--max-tokens", type=int, default=4096,
                    help="score the first N tokens, BOS included (default 4096; 0: all)")
    ap.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    ap.add_argument("--stride", type=int, default=128, help="step between window starts (default 128)")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward call (default 8)")
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated modes (default {DEFAULT_MODES}); "
                    "fp32 is added when missing")
    ap.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration sequences (default 32)")
    ap.add_argument("--calib-seq-len", type=int, default=128, help="GPTQ tokens per calibration sequence (default 128)")
    ap.add_argument("--calib-offset", type=int,
                    help=f"first calibration token (default: {DEFAULT_CALIB_OFFSET}, or the end of the evaluated "
                         "tokens if later; with --calib-text: 0)")
    ap.add_argument("--calib-text", help="take GPTQ calibration from this file instead of --text")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening (fraction of mean diag(H), default 0.01)")
    ap.add_argument("--decode-tokens", type=int, default=64,
                    help="greedy decode tokens/s through jaxinfer.Engine for N new tokens (default 64; 0: skip)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed passes per speed measurement, the best is reported (default 2)")
    ap.add_argument("--kv-dtypes", default="",
                    help="also score the model with these Engine kv_dtypes (e.g. auto,int8,fp8_e4m3): KV rows")
    ap.add_argument("--kv-seq", type=int, default=500, help="tokens per KV-row prompt (default 500)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.model is None:
        ap.error(f"--model is required (the default {DEFAULT_MODEL} is not there)")
    if args.text is None:
        ap.error(f"--text is required (the default {DEFAULT_TEXT} is not there)")
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there")
    if not Path(args.text).is_file():
        ap.error(f"--text {args.text}: no such file")
    if args.calib_text is not None and not Path(args.calib_text).is_file():
        ap.error(f"--calib-text {args.calib_text}: no such file")
    if args.max_tokens < 0 or args.max_tokens == 1:
        ap.error(f"--max-tokens must be 0 (all) or at least 2, got {args.max_tokens}")
    if args.calib_samples < 1 or args.calib_seq_len < 1:
        ap.error("--calib-samples and --calib-seq-len must be positive")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.decode_tokens < 0:
        ap.error("--decode-tokens must be >= 0")
    try:
        modes = parse_modes(args.modes)
        sp.check_settings(2, args.window, args.stride, args.batch)
        out = run(args.model, args.text, modes, max_tokens=args.max_tokens or None, window=args.window,
                  stride=args.stride, batch=args.batch, calib_text=args.calib_text, calib_offset=args.calib_offset,
                  calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, damp=args.damp,
                  decode_tokens=args.decode_tokens, repeats=args.repeats, progress=not args.no_progress)
    except ValueError as e:
        ap.error(str(e))
    if args.kv_dtypes:
        model = jaxinfer.load_model(args.model, dtype="float32")
        ids = np.asarray(sp.encode_text(sp.text_tokenizer(Path(args.model)), Path(args.text))[0], np.int32)
        ids = ids[: args.max_tokens or None]
        out["kv"] = kv_rows(model, ids, args.kv_dtypes.split(","), seq=args.kv_seq)
        for r in out["kv"]["rows"].values():
            print(f"KV {r['kv_dtype']:>9} ({r['pool_dtype']}, {r['kv_bytes_per_token']} B/token): perplexity "
                  f"{r['perplexity']:.4f} ({r['ppl_delta_pct']:+.3f}%), max |logprob error| "
                  f"{r['max_logprob_error']:.4f}, top-1 agreement {r['top1_agreement']:.3f}")
    print("\n".join(summary_lines(out)))
    print(format_table(out))
    print(f"total {out['total_seconds']:.1f} s")
    if args.json:
        write_json(args.json, out, indent=2)
    return out


if __name__ == "__main__":
    main()
