"""scripts/bench_kernels.py: FLOP/byte formulas, the CPU run's JSON, CUDA cross-lowering of the
benchmarked Mosaic GPU kernel calls."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from script_loader import load_script


bk = load_script("bench_kernels")
ON_CPU = jax.devices()[0].platform != "gpu"


# --- formulas -----------------------------------------------------------------------------------

def test_attention_flops_hand_computed():
    # b=1, h=1, s=2, d=1, not causal: QK^T is 2x2 outputs of 1 MAC = 4 MACs, PV the same: 8 MACs = 16 FLOPs
    assert bk.attention_flops(1, 2, 1, 1, causal=False) == 16
    assert bk.attention_flops(1, 2, 1, 1, causal=True) == 8
    # b=2, s=4096, h=32, d=128, causal: 2 * 2 * b * h * s * s * d / 2
    assert bk.attention_flops(2, 4096, 32, 128) == 2 * 2 * 2 * 32 * 4096 * 4096 * 128 // 2 == 274877906944
    shape = bk.FlashShape(batch=4, seq=2048, q_heads=32, kv_heads=8, head_dim=64)
    assert shape.flops == 4 * 4 * 32 * 2048 * 2048 * 64 // 2
    assert shape.score_bytes() == 4 * 4 * 32 * 2048 * 2048


def test_paged_decode_bytes_hand_computed():
    # two slots of 10 and 6 tokens, 1 kv head, head_dim 2, bf16: K+V = 16 tokens * 1 * 2 * 2 (K,V) * 2 B
    # = 128 B; q + out = 2 * 2 slots * 4 q heads * 2 * 2 B = 64 B
    assert bk.paged_decode_bytes([10, 6], q_heads=4, kv_heads=1, head_dim=2, itemsize=2) == 128 + 64
    # one slot of 8192 tokens, 8 kv heads, d 128, bf16: 32 MiB of K/V + 2 * 32 * 128 * 2 B of q/out
    assert bk.paged_decode_bytes([8192], 32, 8, 128, 2) == 8192 * 8 * 128 * 2 * 2 + 2 * 32 * 128 * 2
    shape = bk.PagedShape(slots=64, context=2000, page_size=16)
    assert shape.pages_per_seq == 125 and shape.num_pages == 64 * 125 + 1
    assert shape.bytes(2) == 64 * 2000 * 8 * 128 * 2 * 2 + 2 * 64 * 32 * 128 * 2


def test_roofline_formulas():
    assert bk.matmul_flops(8192, 8192, 8192) == 2 * 8192 ** 3
    assert bk.matmul_flops(2, 3, 4) == 48
    assert bk.copy_bytes(1 << 30) == 2 << 30


def test_paged_inputs_are_a_valid_scattered_table():
    shape = bk.PagedShape(slots=3, context=40, q_heads=4, kv_heads=2, head_dim=64, page_size=16)
    q, k_pages, v_pages, table, lengths = bk.make_paged_inputs(shape, jnp.bfloat16)
    assert k_pages.shape == (3 * 3 + 1, 16, 2, 64) and table.shape == (3, 3)
    flat = sorted(int(x) for x in table.reshape(-1))
    assert flat == list(range(1, 10))  # every real page once, the null page 0 never
    assert lengths.tolist() == [40, 40, 40]


def test_cli_rejects_bad_kernels():
    with pytest.raises(SystemExit):
        bk.main(["--kernels", "flash,nope"])


# --- the CPU run ----------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.skipif(not ON_CPU, reason="checks the CPU (references-only) behaviour")
def test_quick_cpu_run_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    out = bk.main(["--quick", "--iters", "2", "--warmup", "1", "--json", str(path), "--no-progress"])
    data = json.loads(path.read_text())
    assert data["rows"] == json.loads(json.dumps(out["rows"], default=str))
    assert data["jax_version"] == jax.__version__ and data["device"]["platform"] == "cpu"
    assert data["dtype"] == "bfloat16" and data["small"] is True
    assert data["gpu_kernels"].startswith("skipped")

    roof = data["rooflines"]
    assert roof["copy"]["gb_per_s"] > 0 and roof["copy"]["bytes_moved"] == 2 * roof["copy"]["array_bytes"]
    assert roof["matmul"]["tflops"] > 0 and roof["matmul"]["flops"] == 2 * roof["matmul"]["n"] ** 3

    rows = {(r["kernel"], r["impl"]): r for r in data["rows"]}
    for kernel in ("flash", "paged"):
        ref = rows[(kernel, bk.REFERENCE)]
        assert ref["status"] == "ok", ref
        assert 0 < ref["p10_ms"] <= ref["median_ms"] <= ref["p90_ms"] and ref["runs"] == 2
        assert ref["compile_s"] > 0 and ref["max_abs_err"] == 0.0
        assert ref["pct_roofline"] > 0
        ours = rows[(kernel, "jaxinfer pallas mosaic-gpu")]
        assert ours["status"] == "skipped" and "GPU" in ours["reason"]
        assert f"{kernel}/jaxinfer pallas mosaic-gpu" in data["errors"]
    flash_ref = rows[("flash", bk.REFERENCE)]
    shape = bk.FlashShape(**flash_ref["shape_params"])
    assert flash_ref["work"] == shape.flops
    assert flash_ref["tflops"] == pytest.approx(shape.flops / (flash_ref["median_ms"] * 1e-3) / 1e12)
    assert flash_ref["pct_roofline"] == pytest.approx(100 * flash_ref["tflops"] / roof["matmul"]["tflops"])
    paged_ref = rows[("paged", bk.REFERENCE)]
    pshape = bk.PagedShape(**paged_ref["shape_params"])
    assert paged_ref["work"] == pshape.bytes(2)
    assert paged_ref["pct_roofline"] == pytest.approx(100 * paged_ref["gb_per_s"] / roof["copy"]["gb_per_s"])

    xla = rows[("flash", "jax.nn dpa xla")]  # the XLA peer runs on CPU and agrees with the reference
    assert xla["status"] == "ok" and xla["max_abs_err"] < 0.05
    for kernel, impl in [("flash", "jax.nn dpa cudnn"), ("flash", "jax attention_mgpu"), ("flash", "tokamax"),
                         ("paged", "tokamax"), ("paged", "jax paged_attention mosaic-gpu")]:
        assert rows[(kernel, impl)]["status"] == "skipped" and rows[(kernel, impl)]["reason"], (kernel, impl)
    triton = [r for r in data["rows"] if "triton" in r["impl"]]
    assert triton and all(r["status"] == "skipped" and "deprecated" in r["impl"] for r in triton)

    printed = capsys.readouterr().out
    assert "NOTE:" in printed and "skipped" in printed and "rooflines:" in printed
    assert "TFLOP/s" in printed and "GB/s" in printed


# --- the benchmarked Mosaic GPU calls lower for sm_90 on a CPU machine ---------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("kernel,shape", [
    ("flash", bk.FlashShape(batch=1, seq=256, q_heads=8, kv_heads=2, head_dim=128)),
    ("paged", bk.PagedShape(slots=2, context=200, q_heads=8, kv_heads=2, head_dim=128, page_size=16)),
], ids=["flash", "paged"])
def test_benchmarked_kernel_calls_lower_for_cuda(kernel, shape):
    fn, specs = bk.build_kernel_call(kernel, shape, jnp.bfloat16)
    lowered = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text(), "no Mosaic GPU custom call in the lowered module"


def test_build_kernel_call_rejects_unknowns():
    with pytest.raises(ValueError):
        bk.build_kernel_call("nope", None, jnp.bfloat16)
    with pytest.raises(ValueError, match="tokamax"):
        bk.build_kernel_call("paged", bk.PagedShape(1, 64), jnp.bfloat16, impl="tokamax")
