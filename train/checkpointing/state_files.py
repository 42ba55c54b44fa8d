"""A training state without pickle: its tensors in a safetensors file, the rest of it in JSON.

`save_state(folder, name, state)` writes `name.safetensors` (every tensor, keyed by its path in the state)
and `name.json` (the structure, with each tensor replaced by {"__tensor__": key}); `load_state` reads them
back. A state is nested dicts, lists and tuples of tensors, str, int, float, bool and None; dicts with
non-str keys (an optimizer's per-parameter state is keyed by int) and tuples keep their types. Neither
file can run code when read, whoever wrote it.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_state", "load_state", "StateFileError"]

_SCALARS = (str, int, float, bool, type(None))


class StateFileError(ValueError):
    """A state file that is missing, truncated, or not what `save_state` writes."""


def _encode(obj, path: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not {"__tensor__", "__tuple__", "__items__"} & set(obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"state key {path}.{k!r}: expected str or int keys, given {type(k).__name__}")
        return {"__items__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if isinstance(obj, _SCALARS):
        return obj
    raise TypeError(f"state entry {path}: expected tensors, containers and plain scalars, given {type(obj).__name__}")


def _decode(obj, tensors: dict | None, where: str):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if tensors is None:
            return None
        if key not in tensors:
            raise StateFileError(f"{where}: tensor {key!r} is missing from the .safetensors file")
        return tensors[key]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors, where) for k, v in obj["__items__"]}
    if "__float__" in obj:
        return float(obj["__float__"])
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def save_state(folder, name: str, state: dict) -> list[Path]:
    """Writes `name.safetensors` and `name.json` into `folder`; returns the two paths."""
    folder = Path(folder)
    tensors = {}
    tree = _encode(state, "state", tensors)
    stored = set()
    for key, t in tensors.items():
        if t.numel() and t.untyped_storage().data_ptr() in stored:  # a shared tensor is stored as its own copy
            tensors[key] = t.clone()
        stored.add(t.untyped_storage().data_ptr())
    paths = [folder / f"{name}.safetensors", folder / f"{name}.json"]
    save_file(tensors, str(paths[0]))
    paths[1].write_text(json.dumps(tree), encoding="utf-8")
    return paths


def load_state(folder, name: str, tensors: bool = True) -> dict:
    """Reads what `save_state(folder, name, ...)` wrote; StateFileError names the file when it cannot.

    `tensors=False` reads the JSON part alone (every tensor is None): the step, config and metrics, cheaply.
    """
    folder = Path(folder)
    tensor_path, tree_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    for path in (tensor_path, tree_path):
        if not path.is_file():
            raise StateFileError(f"{path} is missing")
    loaded = None
    if tensors:
        try:
            loaded = load_file(str(tensor_path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise StateFileError(f"{tensor_path} cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    try:
        tree = json.loads(tree_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(f"{tree_path} is not valid JSON ({e})") from None
    return _decode(tree, loaded, str(tree_path))
