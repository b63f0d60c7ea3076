"""Peer runtimes for the CPU throughput benchmarks: llama.cpp, HF transformers and ONNX Runtime
serving the same token-id workload as jaxinfer (greedy, EOS ignored, every request exactly its
length).

    python scripts/bench_peers.py --model ../shared/assets/stories260K --peers hf,llamacpp,llamacpp-bf16
    python scripts/bench_peers.py --model ../shared/assets/stories260K --peers hf,onnxruntime --check
    python scripts/bench_peers.py --model benchmarks/tmp/llama21m --check

Library use (the benchmark scripts import it as `import bench_peers`):
    llamacpp_available()  -> None, or a one-line reason llama.cpp cannot be used here
    run_llamacpp(model_dir, prompts, output_lens, n_parallel=16, threads=2, dtype="f32", workdir=...)
    run_hf(model_dir, prompts, output_lens, batch_size=16, threads=2)
    run_onnxruntime(model_dir_or_model, prompts, output_lens, batch_size=16, threads=2)
All return {"tokens", "seconds", "output_tokens", "tok_per_s", ...}; "seconds" is the wall time
of generation only (model load, GGUF / ONNX conversion and a warm-up are excluded).

llama.cpp route: the low-level ctypes bindings of `llama-cpp-python` (which vendors llama.cpp and
builds it from source), driving a continuous-batching loop the way llama.cpp's own server does:
`n_parallel` sequences, each with its own KV-cache sequence id; every `llama_decode` call carries
one decode token per generating sequence plus the prompt tokens of newly admitted requests; a
finished sequence's cache is dropped (`llama_memory_seq_rm`) and the next request takes its seq id
in the next step. Greedy = numpy argmax of `llama_get_logits_ith`. By default the KV cache has
the weights' dtype, and flash attention is off for an f32 cache (see `attention_settings`: then
llama.cpp f32 matches HF fp32 logits to ~1e-6 relative). CLI peers: `llamacpp` (f32 weights),
`llamacpp-bf16`, `llamacpp-stock` (f32 weights, llama.cpp's own context defaults: f16 KV cache,
flash attention auto). Install (CPU, native ISA):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python --no-binary llama-cpp-python
    pip install gguf sentencepiece   # the converter's dependencies (torch, safetensors: already there)

GGUF: llama.cpp's own `convert_hf_to_gguf.py`, run as a subprocess from the llama.cpp sources of
the installed llama-cpp-python version (`$LLAMA_CPP_DIR`, else that version's sdist, downloaded
once with `pip download` into the work dir); it is never copied into this repository. It runs
with the `gguf-py` that sits next to it, which matches it (the PyPI `gguf` 0.19.0 lacks the
`LazyChunkedTensor` that the converter of llama-cpp-python 0.3.36 uses). A checkpoint without
`tokenizer.model` (random weights) gets a minimal SentencePiece model (<unk>, <s>, </s>, byte
pieces; the converter pads the rest of the vocab) in a temporary directory of links to the
checkpoint: only token ids are ever fed, so the vocab is a formality.
Files are cached in the work dir by a hash of the checkpoint's bytes and the output dtype.

HF route: transformers `generate`, requests in order in batches of `batch_size`, left padding,
greedy, min_new_tokens = max_new_tokens = the batch's longest output, with the model's EOS id
cleared for the call so that EOS neither stops nor is masked (see `hf_generate`); only each
request's own tokens are counted (otherwise the same baseline as scripts/benchmark.py).

ONNX Runtime route: the checkpoint exported once with `jaxinfer.export_onnx(kind="decode")` (the
KV cache as explicit past_key_values / present inputs and outputs, optimum's layout; cached in
the work dir by a hash of the checkpoint), run on the CPU execution provider with all graph
optimisations, `threads` intra-op threads. The serving loop is the plain one optimum's
`generate` runs (`jaxinfer.onnx_export.ort_generate`): requests in order in batches of
`batch_size`, left padding + attention_mask, one call to prefill the batch with an empty past,
then one call per token feeding the presents back, greedy argmax on the host; each batch runs to
its longest output and each request keeps its own tokens (the HF route's accounting). Needs the
"onnx" extra (`pip install -e ".[onnx]"`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

DEFAULT_WORKDIR = Path(__file__).resolve().parents[1] / "benchmarks" / "tmp" / "peers"
# llama.cpp symbols the continuous-batching driver needs (names as of llama-cpp-python 0.3.x)
REQUIRED_SYMBOLS = ("llama_batch_init", "llama_decode", "llama_get_logits_ith", "llama_get_memory",
                    "llama_memory_seq_rm", "llama_memory_clear", "llama_model_load_from_file",
                    "llama_init_from_model")
GGML_TYPES = {"f32": 0, "f16": 1, "bf16": 30}  # enum ggml_type, for the KV cache
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # enum llama_flash_attn_type
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- workload
def make_workload(vocab: int, num_requests: int = 48, seed: int = 0, input_len=(8, 96),
                  output_len=(8, 160)) -> tuple[list[list[int]], list[int]]:
    """Random token-id prompts and output lengths, uniform in the inclusive ranges; drawn in the
    same order as scripts/benchmark.py (`--input-len uniform:8:96 --output-len uniform:8:160`), so
    both scripts serve identical requests for the same seed."""
    rng = np.random.default_rng(seed)
    inp = rng.integers(input_len[0], input_len[1] + 1, num_requests)
    out = rng.integers(output_len[0], output_len[1] + 1, num_requests)
    low = min(3, vocab - 1)  # clear of the usual special ids 0..2
    prompts = [rng.integers(low, vocab, int(k)).tolist() for k in inp]
    return prompts, [int(x) for x in out]


def _result(tokens: list[list[int]], prompts, seconds: float, **extra) -> dict:
    out = sum(len(t) for t in tokens)
    return {"tokens": tokens, "seconds": seconds, "output_tokens": out, "input_tokens": sum(map(len, prompts)),
            "tok_per_s": out / seconds, **extra}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of identical sequences and mean fraction of the common greedy prefix."""
    prefix = []
    for x, y in zip(a, b):
        k = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(k / max(len(x), 1))
    return {"identical": sum(x == y for x, y in zip(a, b)) / len(a), "mean_common_prefix": float(np.mean(prefix)),
            "n": len(a)}


# ---------------------------------------------------------------------------- llama.cpp: availability
def llamacpp_available() -> str | None:
    """None when llama-cpp-python's bindings load and have what the driver needs, else why not."""
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or OSError when the shared library does not load
        return f"llama-cpp-python not importable ({type(e).__name__}: {e}); install it with " \
               f"CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python --no-binary llama-cpp-python"
    missing = [s for s in REQUIRED_SYMBOLS if not hasattr(llama_cpp, s)]
    if missing:
        return f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} lacks {', '.join(missing)}"
    return None


# ---------------------------------------------------------------------------- HF -> GGUF
def find_converter(workdir: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: from $LLAMA_CPP_DIR (a llama.cpp checkout), else from the
    sdist of the installed llama-cpp-python version (its vendor/llama.cpp), fetched once."""
    if os.environ.get("LLAMA_CPP_DIR"):
        script = Path(os.environ["LLAMA_CPP_DIR"]) / "convert_hf_to_gguf.py"
        if not script.exists():
            raise FileNotFoundError(f"$LLAMA_CPP_DIR has no convert_hf_to_gguf.py: {script}")
        return script
    import llama_cpp

    version = llama_cpp.__version__
    src = workdir / "src"
    script = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.exists():
        src.mkdir(parents=True, exist_ok=True)
        log(f"fetching the llama-cpp-python {version} sdist for llama.cpp's converter ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(src)], check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(src / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(src, filter="data")
    return script


def _checkpoint_files(model_dir: Path) -> list[Path]:
    return sorted(f for f in model_dir.iterdir()
                  if f.is_file() and (f.suffix in (".json", ".safetensors") or f.name in TOKENIZER_FILES))


def _checkpoint_hash(model_dir: Path) -> str:
    """Hash of the checkpoint's bytes; remembered per (file, size, mtime) so that repeated runs in
    one process do not re-read the weights."""
    return _hash_files(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _checkpoint_files(model_dir)))


@functools.lru_cache(maxsize=None)
def _hash_files(files: tuple) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        h.update(Path(name).name.encode())
        with open(name, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def write_minimal_tokenizer(path: Path, vocab_size: int) -> None:
    """A SentencePiece model with <unk>, <s>, </s> and as many byte pieces as the vocab holds;
    the converter pads the remaining ids with unused [PADi] tokens."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    piece = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    for text, kind in (("<unk>", piece.UNKNOWN), ("<s>", piece.CONTROL), ("</s>", piece.CONTROL)):
        m.pieces.add(piece=text, score=0.0, type=kind)
    for b in range(min(256, vocab_size - 3)):  # byte pieces: llama.cpp looks up <0x0A> as newline
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=piece.BYTE)
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    path.write_bytes(m.SerializeToString())


def convert_to_gguf(model_dir, dtype: str = "f32", workdir=DEFAULT_WORKDIR) -> Path:
    """The checkpoint as a GGUF file in `workdir` (f32 or bf16), converted once per content hash."""
    if dtype not in ("f32", "bf16"):
        raise ValueError(f"dtype must be f32 or bf16, got {dtype!r}")
    model_dir, workdir = Path(model_dir).resolve(), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{model_dir.name}-{_checkpoint_hash(model_dir)}-{dtype}.gguf"
    if out.exists():
        return out
    # the converter reads a directory: links to the checkpoint, plus a tokenizer when it has none
    stage = workdir / f"stage-{out.stem}"
    stage.mkdir(exist_ok=True)
    has_spm = (model_dir / "tokenizer.model").exists()
    for f in model_dir.iterdir():
        if f.is_file() and (has_spm or f.name not in TOKENIZER_FILES) and not (stage / f.name).exists():
            (stage / f.name).symlink_to(f)
    if not has_spm:
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        write_minimal_tokenizer(stage / "tokenizer.model", vocab)
    script = find_converter(workdir)
    tmp = out.with_suffix(".partial")
    log(f"converting {model_dir} -> {out.name} with {script}")
    proc = subprocess.run([sys.executable, str(script), str(stage), "--outfile", str(tmp), "--outtype", dtype],
                          capture_output=True, text=True)
    shutil.rmtree(stage)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tmp.rename(out)  # atomic: a killed conversion never leaves a half file under the cached name
    return out


# ---------------------------------------------------------------------------- llama.cpp: driver
_LOG_CB = None  # keeps the ctypes callback alive while llama.cpp holds it


def _quiet_llamacpp(lib) -> None:
    """Silence llama.cpp's load/progress logging (it goes to stderr by default)."""
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = lib.llama_log_callback(lambda level, text, data: None)
        lib.llama_log_set(_LOG_CB, None)
        lib.llama_backend_init()


def attention_settings(dtype: str, kv_type: str | None = None, flash_attn: str | None = None) -> tuple[str, str]:
    """KV-cache type and flash-attention mode for a run: by default the cache has the weights'
    dtype, and flash attention is off for an f32 cache, else llama.cpp's "auto" (on for CPU).
    Why: llama.cpp's CPU flash attention rounds to f16 internally, so with it even an f32 cache
    leaves ~1e-3 logit error and is slower; off + f32 cache matches HF fp32 to ~2e-6. (llama.cpp's
    own defaults, flash attention auto + f16 cache, are one `kv_type="f16", flash_attn="auto"` away.)"""
    kv_type = kv_type or dtype
    return kv_type, flash_attn or ("off" if kv_type == "f32" else "auto")


class LlamaCpp:
    """A loaded GGUF model plus a context for `n_parallel` sequences of up to `seq_len` tokens
    each (kv_unified off: each sequence attends only to its own cache stream, the setting
    llama.cpp recommends for unrelated sequences)."""

    def __init__(self, gguf: Path, n_parallel: int, seq_len: int, threads: int, kv_type: str = "f32",
                 flash_attn: str = "off", n_batch: int = 2048):
        import llama_cpp as lib

        _quiet_llamacpp(lib)
        self.lib, self.n_batch, self.n_parallel = lib, n_batch, n_parallel
        mparams = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = lib.llama_context_default_params()
        per_seq = -(-seq_len // 256) * 256  # llama.cpp pads context sizes to 256
        cparams.n_ctx, cparams.n_seq_max = per_seq * n_parallel, n_parallel
        cparams.n_batch, cparams.n_ubatch = n_batch, min(512, n_batch)  # llama-server's defaults
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified, cparams.no_perf = False, True
        cparams.type_k = cparams.type_v = GGML_TYPES[kv_type]
        cparams.flash_attn_type = FLASH_ATTN[flash_attn]
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.decode_calls = 0

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, seq id, wants logits) entries."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} on a batch of {len(entries)} tokens")
        self.decode_calls += 1

    def logits(self, i: int) -> np.ndarray:
        """Logits of the i-th batch entry of the last decode (a view into llama.cpp's buffer)."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def drop(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)


class _Slot:
    """One sequence of the continuous batch: the request it serves and how far it has got."""

    def __init__(self, req: int, prompt: list[int]):
        self.req, self.prompt, self.pos, self.last = req, prompt, 0, None

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)


def serve(llm: LlamaCpp, prompts: list[list[int]], output_lens: list[int]) -> list[list[int]]:
    """Continuous batching as llama-server does it: at the top of each step free sequences take
    the next requests (in order); the batch holds one decode token per generating sequence first,
    then prompt tokens of prefilling sequences up to n_batch (a prompt may span steps; only its
    last token asks for logits); greedy tokens come from the logits of the marked entries."""
    if min(output_lens) < 1:
        raise ValueError("every request must generate at least one token")
    queue = collections.deque(range(len(prompts)))
    slots: list[_Slot | None] = [None] * llm.n_parallel
    tokens: list[list[int]] = [[] for _ in prompts]
    while queue or any(slots):
        for s in range(llm.n_parallel):
            if slots[s] is None and queue:
                r = queue.popleft()
                slots[s] = _Slot(r, prompts[r])
        entries, sampled = [], []  # sampled: (slot, batch index) whose logits give a token
        for s, slot in enumerate(slots):
            if slot is not None and not slot.prefilling:
                sampled.append((s, len(entries)))
                entries.append((slot.last, slot.pos, s, True))
                slot.pos += 1
        for s, slot in enumerate(slots):
            if slot is None or not slot.prefilling or len(entries) >= llm.n_batch:
                continue
            chunk = slot.prompt[slot.pos: slot.pos + llm.n_batch - len(entries)]
            for j, tok in enumerate(chunk):
                last = slot.pos + j == len(slot.prompt) - 1
                if last:
                    sampled.append((s, len(entries)))
                entries.append((tok, slot.pos + j, s, last))
            slot.pos += len(chunk)
        llm.decode(entries)
        for s, i in sampled:
            slot = slots[s]
            slot.last = int(np.argmax(llm.logits(i)))
            tokens[slot.req].append(slot.last)
            if len(tokens[slot.req]) == output_lens[slot.req]:
                llm.drop(s)  # free its cache cells: the next request reuses seq id s from position 0
                slots[s] = None
    return tokens


def _warm_up(llm: LlamaCpp, vocab: int) -> None:
    """Run every sequence once (prefill + a few decode steps) so buffer allocation and thread-pool
    start-up are not timed, then empty the cache."""
    rng = np.random.default_rng(1)
    n = llm.n_parallel
    serve(llm, [rng.integers(3, vocab, 16).tolist() for _ in range(n)], [4] * n)
    llm.clear()


def run_llamacpp(model_dir, prompts: list[list[int]], output_lens: list[int], *, n_parallel: int = 16,
                 threads: int = 2, dtype: str = "f32", workdir=DEFAULT_WORKDIR, kv_type: str | None = None,
                 flash_attn: str | None = None) -> dict:
    """Serve the requests through llama.cpp with continuous batching over `n_parallel` sequences
    (greedy, EOS ignored: request i produces exactly output_lens[i] tokens). kv_type / flash_attn:
    see `attention_settings`."""
    reason = llamacpp_available()
    if reason:
        raise RuntimeError(reason)
    gguf = convert_to_gguf(model_dir, dtype, workdir)
    kv_type, flash_attn = attention_settings(dtype, kv_type, flash_attn)
    seq_len = max(len(p) + o for p, o in zip(prompts, output_lens))
    with LlamaCpp(gguf, n_parallel, seq_len, threads, kv_type, flash_attn) as llm:
        _warm_up(llm, llm.n_vocab)
        calls = llm.decode_calls
        t0 = time.perf_counter()
        tokens = serve(llm, prompts, output_lens)
        seconds = time.perf_counter() - t0
        calls = llm.decode_calls - calls
    return _result(tokens, prompts, seconds, peer=f"llamacpp-{dtype}", threads=threads, n_parallel=n_parallel,
                   dtype=dtype, kv_type=kv_type, flash_attn=flash_attn, decode_calls=calls, gguf=str(gguf))


def llamacpp_prompt_logits(model_dir, prompts: list[list[int]], *, dtype: str = "f32", threads: int = 2,
                           workdir=DEFAULT_WORKDIR, kv_type: str | None = None,
                           flash_attn: str | None = None) -> np.ndarray:
    """Logits at each prompt's last position ([n, vocab]), all prompts in one batch: a direct check
    of the GGUF conversion (weights, q/k row order for RoPE, tied embeddings)."""
    gguf = convert_to_gguf(model_dir, dtype, workdir)
    kv_type, flash_attn = attention_settings(dtype, kv_type, flash_attn)
    with LlamaCpp(gguf, len(prompts), max(map(len, prompts)), threads, kv_type, flash_attn) as llm:
        entries, last = [], []
        for s, p in enumerate(prompts):
            entries += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
            last.append(len(entries) - 1)
        llm.decode(entries)
        return np.stack([llm.logits(i).copy() for i in last])


# ---------------------------------------------------------------------------- HF transformers
def load_hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def hf_generate(hf, prompts: list[list[int]], new_tokens: int):
    """One left-padded greedy batch; returns the generated ids ([batch, new_tokens])."""
    import copy

    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    gc = copy.deepcopy(hf.generation_config)
    gc.eos_token_id = None  # like ignore_eos: never stop early, never mask EOS
    gc.do_sample, gc.num_beams, gc.pad_token_id = False, 1, 0
    gc.max_new_tokens = gc.min_new_tokens = new_tokens
    # generate() fills a None eos_token_id from the model's own generation config, and with
    # min_new_tokens it then masks EOS (logit -inf) instead of ignoring it: llama.cpp and jaxinfer
    # can emit EOS as an ordinary token, so clear the model's EOS for the call
    saved, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
    try:
        with torch.inference_mode():
            return hf.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, width:]
    finally:
        hf.generation_config.eos_token_id = saved


def run_hf(model_dir, prompts: list[list[int]], output_lens: list[int], *, batch_size: int = 16,
           threads: int = 2, model=None) -> dict:
    """HF `generate` over the requests in order, `batch_size` at a time; each batch runs to its
    longest output and each request keeps its own output_lens[i] tokens. `model`: an already
    loaded transformers model (skips loading)."""
    import torch

    torch.set_num_threads(threads)
    hf = model if model is not None else load_hf(model_dir)
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    hf_generate(hf, [prompts[i] for i in batches[0][:2]], 4)  # warm-up: allocator, OpenMP threads
    tokens: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    for rows in batches:
        out = hf_generate(hf, [prompts[i] for i in rows], max(output_lens[i] for i in rows))
        for r, i in enumerate(rows):
            tokens[i] = out[r, : output_lens[i]].tolist()
    seconds = time.perf_counter() - t0
    padded = sum(len(rows) * max(output_lens[i] for i in rows) for rows in batches)
    return _result(tokens, prompts, seconds, peer="hf", threads=threads, batch_size=batch_size,
                   generated_tokens_incl_padding=padded)


def hf_prompt_logits(hf, prompts: list[list[int]]) -> np.ndarray:
    """Logits at each prompt's last position, each prompt alone (no padding)."""
    import torch

    with torch.inference_mode():
        return np.stack([hf(torch.tensor([p])).logits[0, -1].float().numpy() for p in prompts])


# ---------------------------------------------------------------------------- ONNX Runtime
def onnx_decode_model(model_dir_or_model, workdir=DEFAULT_WORKDIR) -> Path:
    """The kind="decode" ONNX export of a checkpoint dir (cached in `workdir` by a hash of its
    bytes) or of a jaxinfer Model (cached by a hash of its config and weights)."""
    import jaxinfer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(model_dir_or_model, (str, Path)):
        model_dir = Path(model_dir_or_model).resolve()
        out = workdir / f"{model_dir.name}-{_checkpoint_hash(model_dir)}-decode.onnx"
        model = None
    else:
        model = model_dir_or_model
        h = hashlib.sha256(json.dumps(jaxinfer.config_to_hf(model.config), sort_keys=True).encode())
        for leaf in _host_leaves(model.params):
            h.update(np.ascontiguousarray(leaf).tobytes())
        out = workdir / f"model-{h.hexdigest()[:16]}-decode.onnx"
    if not out.exists():
        if model is None:
            model = jaxinfer.load_model(model_dir, dtype="float32")
        tmp = out.with_name(out.stem + ".partial.onnx")
        log(f"exporting {out.name} (jaxinfer.export_onnx, kind='decode')")
        jaxinfer.export_onnx(model, tmp, kind="decode")
        tmp.rename(out)  # atomic: a killed export never leaves a half file under the cached name
    return out


def _host_leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def run_onnxruntime(model_dir_or_model, prompts: list[list[int]], output_lens: list[int], *, batch_size: int = 16,
                    threads: int = 2, workdir=DEFAULT_WORKDIR) -> dict:
    """ONNX Runtime (CPU EP) over the requests in order, `batch_size` at a time, through the
    exported decode step (`onnx_export.ort_generate`: left padding, prefill call, one call per
    token, greedy); each batch runs to its longest output and each request keeps its own
    output_lens[i] tokens."""
    import onnxruntime
    from jaxinfer.onnx_export import ort_generate, ort_session

    path = onnx_decode_model(model_dir_or_model, workdir)
    sess = ort_session(path, threads=threads)
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    ort_generate(sess, [prompts[i] for i in batches[0]], 4)  # warm-up: allocator, thread pool
    tokens: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    for rows in batches:
        out = ort_generate(sess, [prompts[i] for i in rows], max(output_lens[i] for i in rows))
        for r, i in enumerate(rows):
            tokens[i] = out[r][: output_lens[i]]
    seconds = time.perf_counter() - t0
    padded = sum(len(rows) * max(output_lens[i] for i in rows) for rows in batches)
    return _result(tokens, prompts, seconds, peer="onnxruntime", threads=threads, batch_size=batch_size,
                   generated_tokens_incl_padding=padded, onnx=str(path), onnxruntime_version=onnxruntime.__version__)


def onnxruntime_prompt_logits(model_dir_or_model, prompts: list[list[int]], *, threads: int = 2,
                              workdir=DEFAULT_WORKDIR) -> np.ndarray:
    """Logits at each prompt's last position ([n, vocab]), each prompt alone through the exported
    decode step with an empty past."""
    from jaxinfer.onnx_export import ort_session, past_names

    sess = ort_session(onnx_decode_model(model_dir_or_model, workdir), threads=threads)
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    _, kvh, _, d = pasts[0].shape
    out = []
    for p in prompts:
        n = len(p)
        feed = {"input_ids": np.asarray([p], np.int64), "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None],
                **{name: np.zeros((1, kvh, 0, d), np.float32) for name in past_names(len(pasts) // 2)}}
        out.append(sess.run(["logits"], feed)[0][0, -1])
    return np.stack(out)


# ---------------------------------------------------------------------------- CLI
# llama.cpp peers: (weights dtype, KV-cache type, flash attention); None = `attention_settings`
LLAMACPP_PEERS = {"llamacpp": ("f32", None, None), "llamacpp-bf16": ("bf16", None, None),
                  "llamacpp-stock": ("f32", "f16", "auto")}  # stock: llama.cpp's own context defaults
PEERS = ("hf", *LLAMACPP_PEERS, "onnxruntime")


def llamacpp_settings(peer: str, args) -> dict:
    dtype, kv, fa = LLAMACPP_PEERS[peer]
    return {"dtype": dtype, "kv_type": args.llamacpp_kv or kv, "flash_attn": args.llamacpp_flash_attn or fa}


def run_peer(peer: str, args, prompts, output_lens, threads: int, hf_model=None) -> dict:
    if peer == "hf":
        return run_hf(args.model, prompts, output_lens, batch_size=args.n_parallel, threads=threads, model=hf_model)
    if peer == "onnxruntime":
        return run_onnxruntime(args.model, prompts, output_lens, batch_size=args.n_parallel, threads=threads,
                               workdir=args.workdir)
    return run_llamacpp(args.model, prompts, output_lens, n_parallel=args.n_parallel, threads=threads,
                        workdir=args.workdir, **llamacpp_settings(peer, args))


def check(args, vocab: int) -> dict:
    """Greedy outputs of llama.cpp (each requested dtype) and ONNX Runtime vs HF on the first
    requests of the workload with short outputs, plus last-prompt-position logits of both."""
    prompts, lens = make_workload(vocab, args.check_requests, args.seed)
    lens = [min(n, args.check_output_len) for n in lens]
    hf = load_hf(args.model)
    ref = run_hf(args.model, prompts, lens, batch_size=args.n_parallel, threads=1, model=hf)
    ref_logits = hf_prompt_logits(hf, prompts)
    report = {}
    for peer in [p for p in args.peers if p != "hf"]:
        if peer == "onnxruntime":
            got = run_peer(peer, args, prompts, lens, 1)
            logits = onnxruntime_prompt_logits(args.model, prompts, threads=1, workdir=args.workdir)
            diff = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
            r = report[peer] = {**agreement(got["tokens"], ref["tokens"]), "logits_max_rel_diff": float(diff),
                                "first_token_same": float(np.mean(logits.argmax(1) == ref_logits.argmax(1)))}
            print(f"onnxruntime (fp32, exported decode step) vs hf: {r['identical']:.0%} of {r['n']} sequences "
                  f"identical (outputs <= {args.check_output_len}), mean common prefix {r['mean_common_prefix']:.0%};"
                  f" last-prompt logits max |diff| / max |logit| {diff:.1e}")
            continue
        settings = llamacpp_settings(peer, args)
        got = run_peer(peer, args, prompts, lens, 1)
        logits = llamacpp_prompt_logits(args.model, prompts, threads=1, workdir=args.workdir, **settings)
        diff = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
        r = report[peer] = {**{k: got[k] for k in ("dtype", "kv_type", "flash_attn")},
                            **agreement(got["tokens"], ref["tokens"]), "logits_max_rel_diff": float(diff),
                            "first_token_same": float(np.mean(logits.argmax(1) == ref_logits.argmax(1)))}
        print(f"{peer} ({got['dtype']} weights, {got['kv_type']} KV cache, flash attention {got['flash_attn']}) vs hf:"
              f" {r['identical']:.0%} of {r['n']} sequences identical (outputs <= {args.check_output_len}),"
              f" mean common prefix {r['mean_common_prefix']:.0%}; last-prompt logits max |diff| / max |logit|"
              f" {diff:.1e}, first-token argmax same {r['first_token_same']:.0%}")
    return report


def bench(args, vocab: int) -> dict:
    """Interleaved repeats of every (peer, threads); median tok/s each, best over threads."""
    prompts, lens = make_workload(vocab, args.num_requests, args.seed)
    log(f"workload: {len(prompts)} requests, {sum(map(len, prompts))} prompt + {sum(lens)} output tokens")
    hf_model = load_hf(args.model) if "hf" in args.peers else None
    runs: dict[str, dict[int, list[dict]]] = {p: {t: [] for t in args.threads} for p in args.peers}
    for rep in range(args.repeat):
        for peer in args.peers:
            for t in args.threads:
                r = run_peer(peer, args, prompts, lens, t, hf_model)
                runs[peer][t].append(r)
                log(f"repeat {rep + 1}/{args.repeat} {peer:<14} threads {t}: {r['tok_per_s']:8.1f} tok/s "
                    f"({r['seconds']:.2f} s)")
    summary = {}
    for peer, by_t in runs.items():
        med = {t: statistics.median(r["tok_per_s"] for r in rs) for t, rs in by_t.items()}
        best = max(med, key=med.get)
        summary[peer] = {"median_tok_per_s": med, "best_threads": best, "best_tok_per_s": med[best],
                         "repeats_tok_per_s": {t: [r["tok_per_s"] for r in rs] for t, rs in by_t.items()}}
    tokens = {p: by_t[args.threads[0]][0]["tokens"] for p, by_t in runs.items()}
    agree = {f"{p} vs hf": agreement(tokens[p], tokens["hf"]) for p in tokens if p != "hf" and "hf" in tokens}
    print(f"\n{Path(args.model).name}: {len(prompts)} requests, median of {args.repeat} interleaved repeats (tok/s)")
    print(f"{'peer':<16}" + "".join(f"{'threads ' + str(t):>12}" for t in args.threads) + f"{'best':>10}")
    for peer, s in summary.items():
        print(f"{peer:<16}" + "".join(f"{s['median_tok_per_s'][t]:>12.1f}" for t in args.threads)
              + f"{s['best_tok_per_s']:>10.1f}")
    for name, a in agree.items():
        print(f"{name}: {a['identical']:.0%} of sequences identical, mean common prefix {a['mean_common_prefix']:.0%}")
    return {"summary": summary, "agreement": agree,
            "runs": {p: {t: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for t, rs in by_t.items()}
                     for p, by_t in runs.items()}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint dir (config.json + model.safetensors)")
    ap.add_argument("--peers", default="hf,llamacpp", help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts; the best is reported")
    ap.add_argument("--n-parallel", type=int, default=16, help="llama.cpp sequences = HF and ONNX Runtime batch size")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats; medians are reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare llama.cpp and HF greedy outputs instead")
    ap.add_argument("--check-requests", type=int, default=16)
    ap.add_argument("--check-output-len", type=int, default=32, help="cap on output lengths in --check")
    ap.add_argument("--llamacpp-kv", choices=sorted(GGML_TYPES), help="KV-cache type of every llama.cpp peer "
                    "(default: the weights' dtype; llamacpp-stock: f16)")
    ap.add_argument("--llamacpp-flash-attn", choices=sorted(FLASH_ATTN), help="flash attention of every llama.cpp "
                    "peer (default: off for an f32 KV cache, else auto)")
    ap.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="GGUF / ONNX cache and converter sources")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in args.peers if p not in PEERS]
    if bad:
        ap.error(f"unknown peer {bad[0]!r}; choose from {', '.join(PEERS)}")
    args.threads = [int(t) for t in args.threads.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if any(p.startswith("llamacpp") for p in args.peers) and (reason := llamacpp_available()):
        raise SystemExit(f"llama.cpp unavailable: {reason}")
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    result = {"model": str(args.model), "args": vars(args), "machine": {"platform": platform.platform(),
                                                                        "cpus": os.cpu_count()}}
    if any(p.startswith("llamacpp") for p in args.peers):
        import llama_cpp

        result["llama_cpp"] = {"version": llama_cpp.__version__,
                               "system_info": llama_cpp.llama_print_system_info().decode().strip()}
    result["check" if args.check else "bench"] = check(args, vocab) if args.check else bench(args, vocab)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
