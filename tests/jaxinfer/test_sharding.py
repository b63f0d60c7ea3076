"""Tensor and data parallelism (jaxinfer/sharding.py, replicas.py) on XLA's fake CPU devices.

The suite runs with 8 host devices (tests/conftest.py sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts). Every check compares a
sharded model or engine with the one-device one.

Tolerance: 1e-5 relative to the largest |logit| (float32). Sharding changes only the order of
float32 sums (a row-parallel matmul sums tp partial products, then the all-reduce adds them),
an error of a few ulps of the logits' scale; 1e-5 is ~80 ulps at float32's 1.2e-7.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxinfer
from jaxinfer import checkpoint
from jaxinfer.decode import decode_forward
from jaxinfer.errors import ConfigError
from jaxinfer.kv_smoothing import k_channel_scale
from jaxinfer.sharding import MODEL, TPLayout, make_mesh, param_specs
from jaxinfer.state import EngineConfig, init_state
from jaxinfer.steps import insert, make_requests
from tests.jaxinfer.hf_oracle import make_checkpoint


REL = 1e-5
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices: XLA_FLAGS from conftest.py")

# GQA with kv_heads < tp (2 KV heads on 4 or 8 devices: replicated), tied embeddings with a
# vocabulary 8 does not divide (padded), Qwen2's q/k/v bias.
CASES = {
    "llama_gqa": ("llama_gqa", dict(num_attention_heads=8, num_key_value_heads=2)),
    "llama_mha_tied_odd_vocab": ("llama_mha_tied", dict(num_attention_heads=8, num_key_value_heads=8,
                                                        vocab_size=101)),
    "qwen2_bias": ("qwen2_bias", {}),
}


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for case, (name, overrides) in CASES.items():
        path = tmp_path_factory.mktemp(case)
        make_checkpoint(path, name, seed=1, **overrides)
        out[case] = path
    return out


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_one_device(checkpoints, case, tp):
    one = jaxinfer.load_model(checkpoints[case])
    sharded = jaxinfer.load_model(checkpoints[case], mesh=make_mesh(tp=tp))
    tokens = np.random.default_rng(tp).integers(0, one.config.vocab_size, (2, 11))
    ref = jaxinfer.forward(one, tokens)
    out = jaxinfer.forward(sharded, tokens)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < REL


def _prefill_decode_logits(model, mesh, backend, prompts, steps=3, page_size=4, kv_dtype="auto"):
    """Logits of `steps` teacher-forced decode steps after prefilling `prompts` (insert)."""
    cfg = EngineConfig(max_slots=4, page_size=page_size, num_pages=32, max_seq_len=64, attention_backend=backend,
                       kv_dtype=kv_dtype)
    k_channel = k_channel_scale(model, cfg.max_seq_len) if kv_dtype == "int8" else None
    state = init_state(cfg, model.config, model.dtype, mesh, k_channel)
    sp = jaxinfer.SamplingParams(max_tokens=8, temperature=0.0)
    req = make_requests(cfg, prompts, [sp] * len(prompts), list(range(len(prompts))), 4, 16)
    state, _ = jax.jit(insert, static_argnums=0)(cfg, model, state, req)
    step = jax.jit(decode_forward, static_argnums=0)
    out = []
    for i in range(steps):
        state = state.replace(last_token=jax.numpy.full((4,), 7 + i, np.int32))
        state, logits, _ = step(cfg, model, state)
        out.append(np.asarray(logits))
    return np.stack(out)


@pytest.mark.parametrize("tp, backend", [(2, "xla"), (4, "reference"), (8, "xla")])
def test_prefill_and_paged_decode_equal_one_device(checkpoints, tp, backend):
    path = checkpoints["llama_gqa"]
    prompts = [[3, 9, 4, 17, 5, 2, 8, 30, 11], [5, 6, 7], [40, 41, 42, 43, 44, 45]]
    ref = _prefill_decode_logits(jaxinfer.load_model(path), None, backend, prompts)
    mesh = make_mesh(tp=tp)
    out = _prefill_decode_logits(jaxinfer.load_model(path, mesh=mesh), mesh, backend, prompts)
    assert rel_err(out[:, :3], ref[:, :3]) < REL


def test_int8_kv_pool_sharded(checkpoints):
    """An int8 KV pool on tp = 4 with 2 KV heads (each replicated twice): its pages, per-token
    scales and per-channel K smoothing (calibrated by the sharded forward itself) split over KV
    heads. Tolerance 1e-4, not 1e-5: a K/V element whose float32 value lands within an ulp of an
    int8 rounding boundary may round to the neighbouring level on one side (one step, max/127,
    of one element); none does here, but the check should not hinge on it."""
    path = checkpoints["llama_gqa"]
    prompts = [[3, 9, 4, 17, 5, 2, 8, 30, 11], [5, 6, 7], [40, 41, 42, 43, 44, 45]]
    ref = _prefill_decode_logits(jaxinfer.load_model(path), None, "xla", prompts, kv_dtype="int8")
    mesh = make_mesh(tp=4)
    out = _prefill_decode_logits(jaxinfer.load_model(path, mesh=mesh), mesh, "xla", prompts, kv_dtype="int8")
    assert rel_err(out[:, :3], ref[:, :3]) < 1e-4


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_gptq_checkpoint_sharded(assets_dir, tp):
    """A real GPTQ checkpoint (group 32, and act-order group 64) split over tp: row-parallel
    codes and groups split together; act-order keeps the scales whole and splits g_idx. (Group
    32 on tp = 8 would put 16 rows of a group on each device: refused, tested below.)"""
    names = ["gptq_4bit_g64_desc_asym_gptq"] + (["gptq_4bit_g32_nodesc_sym_gptq"] if tp < 8 else [])
    for name in names:
        path = assets_dir / "quant_oracles" / name
        tokens = np.load(path / "reference_logits.npz")["input_ids"]
        ref = jaxinfer.forward(jaxinfer.load_model(path), tokens)
        out = jaxinfer.forward(jaxinfer.load_model(path, mesh=make_mesh(tp=tp)), tokens)
        assert rel_err(out, ref) < REL, name


def test_int8_quantized_sharded(checkpoints):
    model = jaxinfer.quantize(jaxinfer.load_model(checkpoints["llama_gqa"]), "int8")
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9))
    ref = jaxinfer.forward(model, tokens)
    for tp in (2, 4, 8):
        out = jaxinfer.forward(model.on_mesh(make_mesh(tp=tp)), tokens)
        assert rel_err(out, ref) < REL, tp


def test_group_straddling_devices_is_refused(assets_dir):
    path = assets_dir / "quant_oracles" / "gptq_4bit_g32_nodesc_sym_gptq"
    with pytest.raises(ConfigError, match="straddle devices"):
        jaxinfer.load_model(path, mesh=make_mesh(tp=8))


def test_unshardable_config_is_refused():
    cfg = jaxinfer.get_preset("tiny")  # 4 heads, 2 KV heads
    with pytest.raises(ConfigError, match="num_attention_heads = 4 is not a multiple of tp = 8"):
        TPLayout.plan(cfg, 8)
    with pytest.raises(ValueError, match="devices wanted"):
        make_mesh(tp=16)
    with pytest.raises(ValueError, match="mesh axes"):
        jaxinfer.Engine(jaxinfer.dummy_model(cfg), mesh=jax.make_mesh((2,), ("x",)))


def test_weights_and_pool_are_split_and_decode_gathers_neither(checkpoints):
    tp = 4
    mesh = make_mesh(tp=tp)
    model = jaxinfer.load_model(checkpoints["llama_gqa"], mesh=mesh)
    engine = jaxinfer.Engine(model, max_slots=4, page_size=4, num_pages=32, max_seq_len=64,
                             attention_backend="xla", precompile=False)
    leaves = jax.tree.leaves(model.params) + [engine.state.k_pages, engine.state.v_pages]
    specs = param_specs(model.params, tp) + [P(None, None, None, MODEL)] * 2
    split = 0
    for x, spec in zip(leaves, specs):
        shards = x.addressable_shards
        assert len(shards) == tp
        if MODEL in spec:
            split += 1
            axis = list(spec).index(MODEL)
            assert all(s.data.shape[axis] * tp == x.shape[axis] for s in shards)
            assert all(s.data.size * tp == x.size for s in shards)
            # the shards are different slices, not copies
            assert len({str(s.index) for s in shards}) == tp
        else:
            assert all(s.data.shape == x.shape for s in shards)
    assert split >= 9  # embed, lm_head, wq, wk, wv, wo, w_gate, w_up, w_down (+ the pool)

    engine.generate([[1, 2, 3, 4, 5]], jaxinfer.SamplingParams(max_tokens=3, temperature=0.0))
    name = "decode_steps"
    compiled = [v for k, v in engine._steps._mem.items() if k[0] == name]
    assert compiled
    hlo = compiled[0].as_text()
    gathers = re.findall(r"= (\S+) all-gather\(", hlo)
    vocab = model.params["lm_head"].shape[-1]
    # The only all-gather is the logits' (over the vocabulary): [slots, vocab].
    assert gathers and all(re.fullmatch(rf"f32\[\d+,{vocab}\](\{{[^}}]*\}})?", g) for g in gathers), gathers
    weight_shapes = {tuple(x.shape) for x in jax.tree.leaves(model.params)} | {tuple(engine.state.k_pages.shape)}
    for g in gathers:
        dims = tuple(int(d) for d in re.match(r"\w+\[([\d,]*)\]", g).group(1).split(","))
        assert dims not in weight_shapes
    # Two all-reduces per layer in the scanned layer body (wo, w_down) plus the embedding's.
    assert len(re.findall(r" all-reduce\(", hlo)) == 3


def test_engine_dp2_tp4_equals_one_device(checkpoints):
    path = checkpoints["llama_gqa"]
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(3, 96, int(rng.integers(2, 20))))) for _ in range(16)]
    sp = jaxinfer.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    kw = dict(max_slots=4, page_size=4, num_pages=64, max_seq_len=64, attention_backend="xla", precompile=False)
    ref = [o.samples[0].token_ids for o in jaxinfer.Engine(jaxinfer.load_model(path), **kw).generate(prompts, sp)]
    mesh = make_mesh(tp=4, dp=2)
    engine = jaxinfer.Engine(jaxinfer.load_model(path, mesh=mesh), mesh=mesh, **kw)
    assert isinstance(engine, jaxinfer.ReplicatedEngine) and len(engine.replicas) == 2
    out = [o.samples[0].token_ids for o in engine.generate(prompts, sp)]
    assert out == ref
    stats = engine.stats()
    assert stats["pages_used"] == 0 and not engine.has_unfinished()
    assert all(s["prompt_tokens"] > 0 for s in stats["replicas"])  # both replicas served
    # add_request / step and stream go through the replicas too
    rid = engine.add_request(prompts[0], sp)
    engine.run_until_idle()
    assert engine.outputs()[-1].request_id == rid and engine.outputs()[-1].samples[0].token_ids == ref[0]
    with engine.stream(prompts[:3], sp) as stream:
        got = {}
        for d in stream:
            got.setdefault(d.index, []).extend(d.token_ids)
    assert [got[i] for i in range(3)] == ref[:3]
    assert engine.stats()["pages_used"] == 0


def _cli(args, env, timeout=420):
    return subprocess.run([sys.executable, "-m", "jaxinfer", "generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket  # local: only this test needs it

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """Two processes x 4 CPU devices joined by jax.distributed (gloo), tp = 8 across both,
    generate what one process does; each process reads only its half of every split tensor."""
    path = tmp_path / "ckpt"
    make_checkpoint(path, "llama_gqa", seed=2, num_attention_heads=8, num_key_value_heads=8)
    env = {**os.environ, "JAXINFER_CACHE_DIR": "0", "XLA_FLAGS": ""}
    args = ["--model", str(path), "--prompt", "5 9 12 3", "--prompt", "40 2", "--max-tokens", "6", "--verbose",
            "--max-seq-len", "128"]
    one = _cli(args, env)
    assert one.returncode == 0, one.stderr
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "jaxinfer", "generate", *args, "--tp", "8", "--cpu-devices", "4",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=420) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    # stdout is the output alone: gloo's connection notes (printed by C++ threads) go to stderr.
    assert results[0][0].strip() == one.stdout.strip() and "---" in one.stdout
    assert results[1][0] == ""  # process 1 reports nothing
    # Bytes each process read: its half of every tensor split over "model", all of the others.
    config = jaxinfer.load_config(path)
    expected = 0
    with checkpoint.open_checkpoint(path, checkpoint.weight_files(path)) as found:
        for name, spec in checkpoint.hf_tensor_specs(config).items():
            shape, dtype = found[name][1], found[name][2]
            nbytes = int(np.prod(shape)) * {"F32": 4, "BF16": 2, "F16": 2}[dtype]
            split = spec.key not in ("attn_norm", "mlp_norm", "final_norm", "bo", "b_down")
            expected += nbytes // 2 if split else nbytes
    for _, err in results:
        read = int(re.search(r"read (\d+) bytes of checkpoint", err).group(1))
        assert read == expected


def test_sharded_load_peak_memory(tmp_path):
    """An 8-way sharded load keeps the process's peak RSS below 1.3x the checkpoint's size
    beyond what it held before loading (on CPU the devices' memory is host memory: the shards
    themselves are 1x; no whole tensor is built beside them)."""
    path = tmp_path / "big"
    cfg = jaxinfer.ModelConfig(model_type="llama", vocab_size=4096, hidden_size=512, intermediate_size=2048,
                               num_layers=6, num_heads=8, num_kv_heads=8, head_dim=64)
    jaxinfer.save_model(jaxinfer.dummy_model(cfg), path)
    size = (path / "model.safetensors").stat().st_size
    code = f"""
import jaxinfer, jax
mesh = jaxinfer.make_mesh(tp=8)
jax.block_until_ready(jax.device_put(1.0))
def status(key):  # VmRSS: now; VmHWM: this process's peak (ru_maxrss would include the parent's)
    line = [ln for ln in open('/proc/self/status') if ln.startswith(key + ':')][0]
    return int(line.split()[1]) * 1024
before = status('VmHWM')
model = jaxinfer.load_model({str(path)!r}, mesh=mesh)
jax.block_until_ready(model.params)
print(before, status('VmHWM'), status('VmRSS'))
"""
    env = {**os.environ, "JAXINFER_CACHE_DIR": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, peak, after = map(int, out.stdout.split())
    growth = peak - before
    print(f"checkpoint {size / 2**20:.1f} MiB; peak RSS growth {growth / 2**20:.1f} MiB ({growth / size:.2f}x)")
    assert growth < 1.3 * size
