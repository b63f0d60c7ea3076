"""Export a checkpoint to ONNX with `jaxinfer.export_onnx` (jax2onnx underneath) and check it
under ONNX Runtime's CPU execution provider.

    python scripts/export_onnx.py --model ../shared/assets/stories260K --out model.onnx
    python scripts/export_onnx.py --model ../shared/assets/stories260K --kind decode --out decode.onnx
    python scripts/export_onnx.py --model DIR --quantize int8 --out model-int8.onnx
    python scripts/export_onnx.py --model /tmp/stories-gptq4 --out gptq.onnx     # a scripts/quantize.py output

--kind forward (default): one input `input_ids` int64 [batch_size, sequence_length], first output
`logits` float32 [batch_size, sequence_length, vocab]. --kind decode: one step with the KV cache
as explicit `past_key_values.{i}.key/.value` inputs and `present.{i}.key/.value` outputs
(optimum / ONNX Runtime GenAI layout; see jaxinfer/onnx_export.py). `--out` names the file.

--model: an HF-format checkpoint dir, or a jaxinfer quantized orbax checkpoint
(scripts/quantize.py --out); --quantize METHOD quantizes a dense checkpoint in memory first
(int8, int4, nf4; `--group-size`). Quantized weights export as dequantize-then-MatMul.

Unless --no-verify, the file is loaded into an ONNX Runtime session and its logits for random
token ids ([2, 17]) are compared with `jaxinfer.forward` of the same model (printed as
max |diff| / max |logit|; the script fails above --tolerance, default 1e-4). --ort-levels also
prints the node counts ONNX Runtime leaves at each graph optimisation level (disable, basic,
extended, all: docs/graph-optimisation.md). Prints one JSON line.
Needs the "onnx" extra: pip install -e ".[onnx]".
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
    ap.add_argument("--model", required=True, help="HF-format checkpoint dir, or a jaxinfer quantized orbax dir")
    ap.add_argument("--out", required=True, help="the .onnx file to write")
    ap.add_argument("--kind", choices=["forward", "decode"], default="forward",
                    help="forward: full-sequence logits; decode: one step with an explicit KV cache")
    ap.add_argument("--quantize", choices=["int8", "int4", "nf4"], help="quantize the dense model in memory first")
    ap.add_argument("--group-size", type=int, help="--quantize group size (default: the method's)")
    ap.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21)")
    ap.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs jaxinfer logits check")
    ap.add_argument("--ort-levels", action="store_true",
                    help="also print the graph's op counts after each ONNX Runtime optimisation level")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="max |ORT - jaxinfer| / max |logit| allowed by the check (default 1e-4: fp32)")
    return ap


def load(model_dir: str):
    import jaxinfer
    from jaxinfer.quant import is_quantized_orbax, load_quantized_orbax

    if is_quantized_orbax(model_dir):
        return load_quantized_orbax(model_dir)
    return jaxinfer.load_model(model_dir, dtype="float32")


def verify(model, path: Path, kind: str) -> float:
    """max |ORT logits - jaxinfer.forward logits| / max |logit| on random ids [2, 17]."""
    import jaxinfer
    from jaxinfer import onnx_export as ox

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 17))
    ref = np.asarray(jaxinfer.forward(model, ids))
    sess = ox.ort_session(path)
    if kind == "forward":
        got = ox.ort_forward(sess, ids)
    else:
        layers, kvh, d = ox._cache_shape(sess)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.broadcast_to(
            np.arange(ids.shape[1]), ids.shape).astype(np.int64),
            **{n: np.zeros((2, kvh, 0, d), np.float32) for n in ox.past_names(layers)}}
        got = sess.run(["logits"], feed)[0]
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def ort_levels(path: Path) -> dict:
    """{level: {"ops": n, "op_counts": {...}}} of the graph as ONNX Runtime's CPU EP leaves it at
    each graph optimisation level (`SessionOptions.optimized_model_filepath`)."""
    import tempfile

    from jaxinfer import onnx_export as ox

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in ("disable", "basic", "extended", "all"):
            opt = Path(tmp) / f"{level}.onnx"
            ox.ort_session(path, optimization=level, optimized_model_path=opt)
            counts = ox.op_counts(opt)
            out[level] = {"ops": sum(counts.values()), "op_counts": counts}
    return out


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import jaxinfer
    from jaxinfer import onnx_export as ox

    if (reason := ox.onnx_available()) is not None:
        raise SystemExit(f"export_onnx: {reason}")
    t0 = time.perf_counter()
    model = load(args.model)
    if args.quantize:
        opts = {} if args.group_size is None else {"group_size": args.group_size}
        model = jaxinfer.quantize(model, args.quantize, **opts)
    path = jaxinfer.export_onnx(model, args.out, kind=args.kind, opset=args.opset)
    summary = {"model": str(args.model), "out": str(path), "kind": args.kind, "quantize": args.quantize,
               "bytes": path.stat().st_size, "ops": sum(ox.op_counts(path).values()),
               "export_seconds": round(time.perf_counter() - t0, 2)}
    if not args.no_verify:
        diff = verify(model, path, args.kind)
        summary["logits_max_rel_diff"] = diff
        print(f"onnxruntime vs jaxinfer.forward: max |diff| / max |logit| = {diff:.2e}", file=sys.stderr)
        if diff > args.tolerance:
            print(json.dumps(summary))
            raise SystemExit(f"export_onnx: ONNX Runtime logits differ from jaxinfer's by {diff:.2e} "
                             f"> --tolerance {args.tolerance:g}")
    if args.ort_levels:
        summary["ort_levels"] = ort_levels(path)
        for level, r in summary["ort_levels"].items():
            top = ", ".join(f"{k} {v}" for k, v in list(r["op_counts"].items())[:10])
            print(f"ORT level {level:8s}: {r['ops']:5d} nodes ({top})", file=sys.stderr)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
