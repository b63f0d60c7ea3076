"""What the three kernels share: the Hopper (sm_90) limits they are written for, the device
check that says whether they can run, the interpret-mode switch, the input checks the
references and the kernels' validators have in common, and the masked softmax of the two
attention references (so both oracles mask identically)."""

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


def check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")


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
