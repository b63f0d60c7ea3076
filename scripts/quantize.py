"""Quantize an HF-format checkpoint with jaxinfer and write it as a jaxinfer orbax checkpoint.

    python scripts/quantize.py --model ../shared/assets/stories260K --method gptq --bits 4 \\
        --group-size 32 --calibration ../shared/assets/text/tinyshakespeare.txt --out /tmp/stories-gptq4

Methods: int8, int4, nf4, gptq, llm_int8 (see jaxinfer/quant/quantize.py). GPTQ needs
--calibration: a UTF-8 text file, tokenized with the model's tokenizer.json and cut into
--calib-samples sequences of --calib-seq-len tokens. The output directory holds an orbax
checkpoint plus `jaxinfer_quant.json`; load it back, without re-quantizing, with

    model = jaxinfer.quant.load_quantized_orbax(out)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF-format checkpoint dir (config.json, safetensors[, tokenizer.json])")
    ap.add_argument("--method", required=True, choices=["int8", "int4", "nf4", "gptq", "llm_int8"])
    ap.add_argument("--bits", type=int, help="code width (int4 / gptq: 2, 3, 4, 8; default: the method's)")
    ap.add_argument("--group-size", type=int,
                    help="input rows per scale (default: the method's; 0 or -1: one group per output channel)")
    ap.add_argument("--asym", action="store_true", help="asymmetric (zero-point) grid for int8 / int4 / gptq")
    ap.add_argument("--act-order", action="store_true", help="GPTQ: process columns by descending Hessian diagonal")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean diag(H) (default 0.01)")
    ap.add_argument("--threshold", type=float, default=6.0, help="llm_int8 outlier threshold (default 6.0)")
    ap.add_argument("--calibration", help="GPTQ: UTF-8 text file for calibration")
    ap.add_argument("--calib-samples", type=int, default=32, help="GPTQ: calibration sequences (default 32)")
    ap.add_argument("--calib-seq-len", type=int, default=256, help="GPTQ: tokens per sequence (default 256)")
    ap.add_argument("--out", required=True, help="output directory (orbax checkpoint + jaxinfer_quant.json)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def calibration_tokens(model_dir: str | Path, text_file: str | Path, samples: int, seq_len: int) -> np.ndarray:
    """int32 [n, seq_len]: the text's tokens cut into at most `samples` consecutive sequences."""
    import jaxinfer

    tok = jaxinfer.load_tokenizer(model_dir)
    if tok is None:
        raise SystemExit(f"quantize: no tokenizer.json in {model_dir}: cannot tokenize --calibration")
    ids = tok.encode(Path(text_file).read_text(encoding="utf-8"))
    n = min(samples, len(ids) // seq_len)
    if n < 1:
        raise SystemExit(f"quantize: {text_file} has {len(ids)} tokens, fewer than --calib-seq-len {seq_len}")
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import jaxinfer
    from jaxinfer.quant import load_quantized_orbax, quantize, save_quantized

    if args.method == "gptq" and not args.calibration:
        raise SystemExit("quantize: --method gptq needs --calibration TEXT_FILE")
    show = not args.no_progress
    start = time.perf_counter()
    print(f"loading {args.model}", file=sys.stderr)
    model = jaxinfer.load_model(args.model, progress=show)
    options: dict = {"sym": not args.asym, "act_order": args.act_order, "damp": args.damp,
                     "threshold": args.threshold, "progress": show}
    if args.bits is not None:
        options["bits"] = args.bits
    if args.group_size is not None:
        options["group_size"] = None if args.group_size <= 0 else args.group_size
    if args.calibration:
        options["calibration"] = calibration_tokens(args.model, args.calibration, args.calib_samples, args.calib_seq_len)
        print(f"calibration: {options['calibration'].shape[0]} x {options['calibration'].shape[1]} tokens", file=sys.stderr)
    qmodel = quantize(model, args.method, **options)
    print(f"saving {args.out}", file=sys.stderr)
    save_quantized(qmodel, args.out)
    load_quantized_orbax(args.out)  # check it reads back
    w = qmodel.params["layers"]["wq"]
    summary = {"model": str(args.model), "method": args.method, "bits": w.bits, "group_size": w.group_size,
               "kind": w.kind, "out": str(args.out), "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
