"""What the three kernels share: the Hopper (sm_90) limits they are written for, the device
check that says whether they can run, the interpret-mode switch, the input checks the
references and the kernels' validators have in common, the masked softmax of the two
attention references (so both oracles mask identically) and the logit soft-cap of all four.

Sliding windows may be Python ints (static) or traced int32 scalars (one compiled program for
layers with different windows, e.g. Gemma's local and global layers inside one layer scan);
`NO_WINDOW` is the traced spelling of "no window" (larger than any sequence)."""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

HIGHEST = jax.lax.Precision.HIGHEST  # references: no TF32 on GPU, so the oracles stay exact
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # wgmma's 16-bit inputs
SMEM_BYTES = 227 * 1024  # sm_90 opt-in shared memory per block
NUM_SMS = 132  # H100 SXM; only the default split heuristics use it


def is_sm90(device=None) -> bool:
    """Whether `device` (default: JAX's first device) is a Hopper GPU, the kernels' target."""
    device = jax.devices()[0] if device is None else device
    return device.platform == "gpu" and getattr(device, "compute_capability", None) == "9.0"


def interpret_params(interpret: Any):
    """False/None -> compile for the GPU; True -> default GPU interpret params; else as given."""
    if interpret is None or interpret is False:
        return None
    if interpret is True:
        try:  # JAX 0.10.2 does not export it from plgpu.
            from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        except ImportError:  # pragma: no cover - later JAX versions
            from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
        return InterpretGPUParams()
    return interpret  # an InterpretGPUParams instance (e.g. detect_races=True)


def check_heads(q_heads: int, kv_heads: int, q_head_dim: int, kv_head_dim: int) -> None:
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if q_head_dim != kv_head_dim:
        raise ValueError(f"head_dim mismatch: q has {q_head_dim}, k/v have {kv_head_dim}")


NO_WINDOW = 2**30  # a traced window this large never hides a key (sequences are far shorter)


def check_window(sliding_window) -> None:
    """None, an int >= 1, or a traced/concrete int32 scalar (its value is the caller's to check)."""
    if sliding_window is None:
        return
    if isinstance(sliding_window, int) and not isinstance(sliding_window, bool):
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
        return
    if getattr(sliding_window, "shape", None) != () or not jnp.issubdtype(sliding_window.dtype, jnp.integer):
        raise ValueError(f"sliding_window must be None, an int >= 1 or an integer scalar array, got {sliding_window!r}")


def check_softcap(softcap) -> None:
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")


def soft_cap(scores: Float[Array, "*b"], softcap: float | None) -> Float[Array, "*b"]:
    """Gemma 2's attention-logit soft-capping, `cap * tanh(scores / cap)` on the scaled scores
    (transformers' order: scale, divide by cap, tanh, multiply by cap); identity for None."""
    if softcap is None:
        return scores
    return softcap * jnp.tanh(scores / softcap)


def tanh_via_exp2(x: Float[Array, "*b"]) -> Float[Array, "*b"]:
    """tanh(x) = 1 - 2 / (exp(2x) + 1), for the kernels: Mosaic GPU's approximate tanh
    (tanh.approx.f32) has a relative error of 2^-11, which a cap of 50 turns into 0.02 of score
    error; ex2.approx is accurate to ~2^-22. Saturates cleanly (exp2 -> inf or 0 gives +-1)."""
    return 1.0 - 2.0 / (jnp.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


def require_int(name: str, dtype: jnp.dtype) -> None:
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {dtype}")


def masked_softmax(
    scores: Float[Array, "*lead"], mask: Bool[Array, "*#lead"]
) -> Float[Array, "*lead"]:
    """Softmax over visible keys: exactly 0 where masked, all-zero rows where nothing is visible."""
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # empty row: max is -inf
    probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    return probs / jnp.where(denom > 0, denom, 1.0)
