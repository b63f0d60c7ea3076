"""Test-only patches of JAX's Mosaic GPU interpreter (CPU), imported by the kernel tests."""

import inspect

import jax
import numpy as np


# ---------------------------------------------------------------------------------------------
# Test-only patch of the JAX 0.10.2 GPU interpreter: wgmma with a trailing transpose_ref on an
# operand. The interpreter's wgmma callback turns operand transforms into index ranges and
# rejects TransposeTransform; this copy of it transposes the operand it read instead.
# Applied only when the installed callback does not already mention transposes; remove once
# the JAX pinned here handles it.
# ---------------------------------------------------------------------------------------------
def patch_interpreter_wgmma_transpose():
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as gcb
    from jax._src.state.types import TransposeTransform

    if getattr(gcb.wgmma, "_jaxinfer_patched", False) or "ranspose" in inspect.getsource(gcb.wgmma):
        return

    def split_transpose(transforms):
        transforms = tuple(gcb._remove_noop_transforms(transforms))
        if transforms and isinstance(transforms[-1], TransposeTransform):
            return transforms[:-1], transforms[-1].permutation
        assert not any(isinstance(t, TransposeTransform) for t in transforms), transforms
        return transforms, None

    def wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array,
              acc_transforms, acc_dtype, a_allocation_key_as_array, a_transforms,
              b_allocation_key_as_array, b_transforms, source_info=None):
        transforms, perms = zip(*(split_transpose(t) for t in (acc_transforms, a_transforms, b_transforms)))
        assert perms[0] is None, "transposed accumulator"
        keys = [gcb.HostAllocationKey.from_array(k) for k in
                (acc_allocation_key_as_array, a_allocation_key_as_array, b_allocation_key_as_array)]
        ranges = [gcb.interpret_utils.to_range(jax.tree.map(int, t)) for t in transforms]
        shm = gcb._get_shared_memory()
        gtid = shm.get_global_thread_id(int(device_id), int(thread_id))
        info = gcb.interpret_utils.GPULoggingInfo(
            device_id=int(device_id), grid_point_coords=tuple(int(x) for x in grid_point_coords),
            thread_id=int(thread_id), source_info=source_info)
        acc, a, b = (shm.get_buffer_content(k, r, gtid, logging_info=info)[0] for k, r in zip(keys, ranges))
        a, b = (x if p is None else np.transpose(x, p) for x, p in zip((a, b), perms[1:]))
        shm.store_buffer_content(keys[0], ranges[0], acc + np.matmul(a, b, dtype=acc_dtype), gtid,
                                 logging_info=info)
        return token

    wgmma._jaxinfer_patched = True
    gcb.wgmma = wgmma

