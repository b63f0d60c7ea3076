"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), offline on the host in float64 NumPy.

For one linear layer y = x @ W (W [K, N] in jaxinfer's layout, i.e. HF's weight transposed):

1. H = 2 X^T X / n from the calibration inputs X [n, K] of that layer (`hessian`).
2. Dead inputs (H[k, k] == 0) get H[k, k] = 1 and a zero weight row.
3. act_order: inputs are processed by descending diag(H) (perm), groups follow that order and
   `g_idx[k]` records the group of input row k.
4. Dampening: H += percdamp * mean(diag(H)) * I; U = upper Cholesky factor of H^-1.
5. Input rows are quantized one at a time (round to nearest on the affine grid of the current
   group, whose scale / zero are found from the weights as updated so far when the group starts),
   and each quantization error is spread over the not-yet-quantized rows:
   W[j] -= err * U[i, j] / U[i, i] for j > i. The updates are applied lazily in blocks of
   `blocksize` rows (within a block at once, to the rest of the matrix once per block), as the
   reference implementation does; group parameters are taken, as there, from the matrix with
   the block-level updates only.

The affine grid (the reference `Quantizer`, also used for round-to-nearest in quantize.py):
maxq = 2^bits - 1; xmin = min(min(w), 0), xmax = max(max(w), 0) per output column; symmetric:
xmax = max(|xmin|, xmax), xmin = -xmax; all-zero columns use [-1, 1]; scale = (xmax - xmin) / maxq;
zero = (maxq + 1) / 2 (symmetric) or round(-xmin / scale), scale rounded to float32 first (it is
stored so); code = clip(round(w / scale) + zero, 0, maxq);
w ~ (code - zero) * scale.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class GPTQResult(NamedTuple):
    codes: np.ndarray  # uint8 [K, N], one code per element (unpacked)
    scales: np.ndarray  # float32 [G, N]
    zeros: np.ndarray  # uint8 [G, N]
    g_idx: np.ndarray  # int32 [K]: group of each input row (k // group_size without act-order)


def affine_params(w: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point per column of w [rows, N] (the module docstring's grid)."""
    maxq = 2**bits - 1
    w = np.asarray(w, np.float64)
    xmin = np.minimum(w.min(axis=0), 0.0)
    xmax = np.maximum(w.max(axis=0), 0.0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = np.where(empty, -1.0, xmin)
    xmax = np.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).astype(np.float32).astype(np.float64)  # the stored float32 scale
    zero = np.full_like(scale, (maxq + 1) // 2) if sym else np.round(-xmin / scale)
    return scale, zero


def affine_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(np.asarray(w, np.float64) / scale) + zero, 0, 2**bits - 1)


def hessian(x: np.ndarray) -> np.ndarray:
    """H = 2 X^T X / n (float64 [K, K]) from inputs x [..., K]."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return 2.0 * (x.T @ x) / max(x.shape[0], 1)


def gptq_quantize(w: np.ndarray, h: np.ndarray, bits: int, group_size: int | None = None, sym: bool = True,
                  act_order: bool = False, percdamp: float = 0.01, blocksize: int = 128) -> GPTQResult:
    """GPTQ-quantize w [K, N] (jaxinfer layout) with Hessian h [K, K]; see the module docstring.

    group_size None (or >= K): one group per output column. A group size that does not divide K
    leaves a shorter last group (g_idx says which rows are in it).
    """
    W = np.array(np.asarray(w, np.float64).T)  # [N, K]: the reference's [rows, columns]
    H = np.array(np.asarray(h, np.float64))
    n, k = W.shape
    gs = k if group_size is None or group_size >= k else int(group_size)
    maxq = 2**bits - 1

    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    W = W[:, perm]
    H = H[perm][:, perm]
    H[np.diag_indices(k)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1

    groups = -(-k // gs)
    scales = np.zeros((groups, n))
    zeros = np.zeros((groups, n))
    Q = np.zeros((n, k))
    scale = zero = None
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                scale, zero = affine_params(W[:, col:col + gs].T, bits, sym)
                scales[col // gs], zeros[col // gs] = scale, zero
            wcol = W1[:, i]
            q = np.clip(np.round(wcol / scale) + zero, 0, maxq)
            Q[:, col] = q
            err = (wcol - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = np.argsort(perm)
    codes = Q[:, inv].T.astype(np.uint8)  # back to input order, [K, N]
    g_idx = (np.arange(k) // gs)[inv].astype(np.int32)
    return GPTQResult(codes, scales.astype(np.float32), zeros.astype(np.uint8), g_idx)
