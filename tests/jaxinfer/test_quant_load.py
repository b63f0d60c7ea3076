"""Quantized checkpoints made by real tools (shared assets quant_oracles/) load and reproduce
those tools' own logits; malformed ones fail with errors naming the tensor / field.

Tolerances (max absolute logit difference on reference_logits.npz, logits of order 1):
- GPTQ: 2e-3 (the reference kernel, TorchCpuAvx512Linear, dequantizes through float16; measured
  ~7e-4 / 8e-4, while the fp32 base model is ~0.2 away, so a wrong zero or group would show).
- bitsandbytes NF4 / FP4 (+ double quant): 1e-4 (same float32 dequantize-then-matmul; ~1e-6).
- bitsandbytes int8: see test_bnb_int8_logits.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxinfer import forward, load_model
from jaxinfer.config import config_from_hf
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.quant import QuantizedWeight

ORACLES = {
    "gptq_4bit_g32_nodesc_sym_gptq": 2e-3,
    "gptq_4bit_g32_nodesc_sym_gptq_v2": 2e-3,
    "gptq_4bit_g64_desc_asym_gptq": 2e-3,
    "bnb_nf4": 1e-4,
    "bnb_fp4": 1e-4,
    "bnb_nf4_dq": 1e-4,
}
LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def oracle(assets_dir, name):
    path = assets_dir / "quant_oracles" / name
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


def max_diff(model, ref):
    return float(np.abs(np.asarray(forward(model, ref["input_ids"])) - ref["logits"]).max())


@pytest.mark.parametrize("name, tol", ORACLES.items())
def test_oracle_logits(assets_dir, name, tol):
    path = oracle(assets_dir, name)
    model = load_model(path)
    for key in LINEARS:
        w = model.params["layers"][key]
        assert isinstance(w, QuantizedWeight) and w.bits == 4
        assert w.codes.shape[0] == model.config.num_layers
    wq = model.params["layers"]["wq"]
    assert wq.kind == ("affine" if name.startswith("gptq") else "table")
    # act-order keeps its g_idx; the trivial k // group_size grouping is dropped.
    assert (wq.g_idx is not None) == ("desc" in name and "nodesc" not in name)
    assert not isinstance(model.params["lm_head"], QuantizedWeight)
    ref = np.load(path / "reference_logits.npz")
    assert max_diff(model, ref) <= tol


def test_bnb_int8_logits(assets_dir):
    """The oracle ran LLM.int8 (outlier decomposition at threshold 6.0, int8 activations), which
    `QuantizedWeight` implements as kind "llm_int8". Measured: 0.0142 max abs from the oracle,
    weight-only dequantization 0.0162, the fp32 base model 0.0395. Bound: 0.02, and closer to
    the oracle than the unquantized model is (so the int8 weights are read right; a wrong scale
    or sign would be far off)."""
    path = oracle(assets_dir, "bnb_int8")
    base_ref = np.load(oracle(assets_dir, "base") / "reference_logits.npz")
    model = load_model(path)
    w = model.params["layers"]["wq"]
    assert w.kind == "llm_int8" and w.threshold == 6.0 and w.bits == 8
    for ref in (np.load(path / "reference_logits.npz"),
                np.load(oracle(assets_dir, "base") / "llm_int8_reference_logits.npz")):
        np.testing.assert_array_equal(ref["input_ids"], base_ref["input_ids"])
        base_distance = float(np.abs(base_ref["logits"] - ref["logits"]).max())
        ours = max_diff(model, ref)
        assert ours <= 0.02 and ours < base_distance
        layers = {k: v.replace(kind="affine", threshold=0.0) if isinstance(v, QuantizedWeight) else v
                  for k, v in model.params["layers"].items()}
        weight_only = model.replace(params={**model.params, "layers": layers})
        assert max_diff(weight_only, ref) <= 0.02


# ---------------------------------------------------------------------------------------------
# Malformed checkpoints


def copy_oracle(assets_dir, name, tmp_path):
    src = oracle(assets_dir, name)
    dst = tmp_path / name
    dst.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, dst / f)
    return dst


def edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(raw))


GPTQ = "gptq_4bit_g64_desc_asym_gptq"
Q0 = "model.layers.0.self_attn.q_proj"


def test_wrong_qweight_shape(assets_dir, tmp_path):
    path = copy_oracle(assets_dir, GPTQ, tmp_path)
    edit_tensors(path, lambda t: t.update({f"{Q0}.qweight": t[f"{Q0}.qweight"][:8]}))
    with pytest.raises(CheckpointError, match=rf"(?s)wrong shape.*{Q0}\.qweight: found \[8, 128\], expected \[16, 128\]"):
        load_model(path)


def test_missing_scales(assets_dir, tmp_path):
    path = copy_oracle(assets_dir, GPTQ, tmp_path)
    edit_tensors(path, lambda t: t.pop(f"{Q0}.scales"))
    with pytest.raises(CheckpointError, match=rf"missing tensors \(1\): {Q0}\.scales"):
        load_model(path)


def test_wrong_dtype_and_every_problem_at_once(assets_dir, tmp_path):
    path = copy_oracle(assets_dir, GPTQ, tmp_path)

    def edit(t):
        t[f"{Q0}.qzeros"] = t[f"{Q0}.qzeros"].astype(np.float32)
        t.pop("model.layers.1.mlp.up_proj.g_idx")
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((384, 128), np.float32)

    edit_tensors(path, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert f"{Q0}.qzeros: F32 (expected I32)" in msg
    assert "missing tensors (1): model.layers.1.mlp.up_proj.g_idx" in msg  # desc_act needs g_idx
    assert "unexpected tensors (1): model.layers.0.mlp.up_proj.weight" in msg


def test_g_idx_out_of_range(assets_dir, tmp_path):
    path = copy_oracle(assets_dir, GPTQ, tmp_path)
    edit_tensors(path, lambda t: t[f"{Q0}.g_idx"].__setitem__(3, 2))  # 2 groups: 0 and 1
    with pytest.raises(CheckpointError, match=rf"{Q0}\.g_idx: group indices must lie in \[0, 2\)"):
        load_model(path)


def test_unsupported_bits(assets_dir, tmp_path):
    path = copy_oracle(assets_dir, GPTQ, tmp_path)
    edit_config(path, bits=5)
    with pytest.raises(ConfigError, match=r"quantization_config\.bits = 5 is not supported"):
        load_model(path)


def test_group_size_not_dividing_k(assets_dir, tmp_path):
    path = copy_oracle(assets_dir, GPTQ, tmp_path)
    edit_config(path, group_size=48)
    with pytest.raises(ConfigError, match=r"quantization_config\.group_size = 48 does not divide hidden_size = 128"):
        load_model(path)


def test_bits_mismatching_tensors(assets_dir, tmp_path):
    path = copy_oracle(assets_dir, GPTQ, tmp_path)
    edit_config(path, bits=8)  # a supported width, but the tensors are packed 4-bit
    with pytest.raises(CheckpointError, match=rf"{Q0}\.qweight: found \[16, 128\], expected \[32, 128\]"):
        load_model(path)


def test_bnb_4bit_missing_absmax_and_bad_quant_state(assets_dir, tmp_path):
    path = copy_oracle(assets_dir, "bnb_nf4", tmp_path)
    edit_tensors(path, lambda t: t.pop(f"{Q0}.weight.absmax"))
    with pytest.raises(CheckpointError, match=rf"missing tensors \(1\): {Q0}\.weight\.absmax"):
        load_model(path)

    path = copy_oracle(assets_dir, "bnb_fp4", tmp_path)
    state_name = f"{Q0}.weight.quant_state.bitsandbytes__fp4"

    def edit(t):
        state = json.loads(bytes(t[state_name]).decode())
        state["blocksize"] = 128
        t[state_name] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()

    edit_tensors(path, edit)
    with pytest.raises(CheckpointError, match=rf"{state_name}: blocksize = 128, expected 64"):
        load_model(path)


def test_bnb_double_quant_needs_nested_tensors(assets_dir, tmp_path):
    path = copy_oracle(assets_dir, "bnb_nf4", tmp_path)
    edit_config(path, bnb_4bit_use_double_quant=True)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert f"{Q0}.weight.nested_absmax" in str(e.value) and f"{Q0}.weight.absmax: F32 (expected U8)" in str(e.value)


# ---------------------------------------------------------------------------------------------
# quantization_config parsing


def oracle_config(assets_dir, name):
    return json.loads((oracle(assets_dir, name) / "config.json").read_text())


def test_quant_config_parsed(assets_dir):
    q = config_from_hf(oracle_config(assets_dir, GPTQ)).quant
    assert (q.method, q.bits, q.group_size, q.sym, q.desc_act, q.checkpoint_format) == ("gptq", 4, 64, False, True, "gptq")
    q = config_from_hf(oracle_config(assets_dir, "gptq_4bit_g32_nodesc_sym_gptq_v2")).quant
    assert (q.group_size, q.sym, q.desc_act, q.checkpoint_format) == (32, True, False, "gptq_v2")
    q = config_from_hf(oracle_config(assets_dir, "bnb_nf4_dq")).quant
    assert (q.method, q.bits, q.quant_type, q.double_quant, q.group_size) == ("bitsandbytes", 4, "nf4", True, 64)
    q = config_from_hf(oracle_config(assets_dir, "bnb_int8")).quant
    assert (q.bits, q.int8_threshold) == (8, 6.0)
    assert config_from_hf(oracle_config(assets_dir, "base")).quant is None


@pytest.mark.parametrize(
    "folder, change, message",
    [
        (GPTQ, {"quant_method": "awq"}, r"quant_method = 'awq' is not supported"),
        (GPTQ, {"checkpoint_format": "marlin", "format": "marlin"}, r"checkpoint_format = 'marlin' is not supported"),
        (GPTQ, {"format": "gptq_v2"}, r"format = 'gptq_v2' contradicts checkpoint_format"),
        (GPTQ, {"lm_head": True}, r"lm_head = true"),
        (GPTQ, {"new_knob": 1}, r"unsupported quantization_config field\(s\) \['new_knob'\]"),
        (GPTQ, {"group_size": 0}, r"group_size = 0 must be"),
        ("bnb_nf4", {"bnb_4bit_quant_type": "int4"}, r"bnb_4bit_quant_type = 'int4' is not supported"),
        ("bnb_nf4", {"load_in_8bit": True, "_load_in_8bit": True}, r"exactly one of load_in_4bit"),
        ("bnb_int8", {"llm_int8_has_fp16_weight": True}, r"llm_int8_has_fp16_weight"),
        ("bnb_int8", {"llm_int8_skip_modules": ["q_proj"]}, r"llm_int8_skip_modules"),
    ],
)
def test_bad_quant_config(assets_dir, folder, change, message):
    raw = oracle_config(assets_dir, folder)
    raw["quantization_config"].update(change)
    with pytest.raises(ConfigError, match=message):
        config_from_hf(raw)
