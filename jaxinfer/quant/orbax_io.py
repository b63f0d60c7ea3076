"""Save / restore a (quantized) `Model` with orbax, so a quantized model loads back without
re-quantizing.

Layout of `dir`:
    jaxinfer_quant.json   {"format": "jaxinfer-quantized", "version": 1, "config": <HF config.json dict>,
                           "quant": <QuantConfig fields or null>, "weights": {key: {bits, group_size,
                           kind, threshold, fields}}}: the static config and each QuantizedWeight's
                           static metadata (which optional arrays it has)
    params/               the orbax checkpoint of the params as plain nested dicts of arrays
                           (a QuantizedWeight becomes {"codes", "scales", ["zeros", "g_idx", "table"]})

    jaxinfer.quant.save_quantized(model, "out/")
    model = jaxinfer.quant.load_quantized_orbax("out/")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxinfer.config import QuantConfig, config_from_hf, config_to_hf
from jaxinfer.model import Model
from jaxinfer.quant.weight import QuantizedWeight

FORMAT = "jaxinfer-quantized"
META_FILE = "jaxinfer_quant.json"
_FIELDS = ("codes", "scales", "zeros", "g_idx", "table")


def is_quantized_orbax(path: str | Path) -> bool:
    """Whether `path` is a directory written by `save_quantized`."""
    meta = Path(path) / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def _split(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays: dict[str, Any] = {}
    weights: dict[str, Any] = {}
    for name, value in params.items():
        if name == "layers":
            sub, meta = _split(value)
            arrays["layers"] = sub
            weights.update({f"layers/{k}": v for k, v in meta.items()})
        elif isinstance(value, QuantizedWeight):
            present = [f for f in _FIELDS if getattr(value, f) is not None]
            arrays[name] = {f: np.asarray(getattr(value, f)) for f in present}
            weights[name] = {"bits": value.bits, "group_size": value.group_size, "kind": value.kind,
                             "threshold": value.threshold, "fields": present}
        else:
            arrays[name] = np.asarray(value)
    return arrays, weights


def save_quantized(model: Model, path: str | Path) -> None:
    """Write `model` (quantized or not) to directory `path` (created; must not hold a checkpoint)."""
    import orbax.checkpoint as ocp  # ~0.2 s and hundreds of modules: keep `import jaxinfer` lean

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    quant = None if config.quant is None else dataclasses.asdict(config.quant)
    hf = config_to_hf(dataclasses.replace(config, quant=None))
    arrays, weights = _split(model.params)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path / "params", arrays)
    meta = {"format": FORMAT, "version": 1, "config": hf, "quant": quant, "weights": weights}
    (path / META_FILE).write_text(json.dumps(meta, indent=1))


def load_quantized_orbax(path: str | Path) -> Model:
    """The `Model` saved by `save_quantized` at `path`, arrays on the default device."""
    import orbax.checkpoint as ocp  # ~0.2 s and hundreds of modules: keep `import jaxinfer` lean

    path = Path(path).absolute()
    if not is_quantized_orbax(path):
        raise ValueError(f"{path} is not a jaxinfer quantized checkpoint (no {META_FILE} with format {FORMAT!r})")
    meta = json.loads((path / META_FILE).read_text())
    config = config_from_hf(meta["config"])
    if meta.get("quant") is not None:
        config = dataclasses.replace(config, quant=QuantConfig(**meta["quant"]))
    with ocp.PyTreeCheckpointer() as ckptr:
        arrays = ckptr.restore(path / "params")
    arrays = jax.tree.map(lambda a: jax.device_put(np.asarray(a)), arrays)

    params: dict[str, Any] = {}
    for name, value in arrays.items():
        if name == "layers":
            params["layers"] = {}
            for key, v in value.items():
                info = meta["weights"].get(f"layers/{key}")
                params["layers"][key] = v if info is None else _rebuild(v, info)
        else:
            info = meta["weights"].get(name)
            params[name] = value if info is None else _rebuild(value, info)
    return Model(config=config, params=params)


def _rebuild(arrays: dict[str, Any], info: dict[str, Any]) -> QuantizedWeight:
    fields = {f: arrays.get(f) if f in info["fields"] else None for f in _FIELDS}
    return QuantizedWeight(**fields, bits=int(info["bits"]), group_size=int(info["group_size"]),
                           kind=str(info["kind"]), threshold=float(info["threshold"]))
