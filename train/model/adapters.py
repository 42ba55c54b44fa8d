"""A PEFT adapter folder, as `PeftModel.save_pretrained` writes it (a leaf module: no PEFT import).

`adapter_config.json` names the base model (`base_model_name_or_path`) and `adapter_model.safetensors` holds the
adapter weights; a leanfit checkpoint unit of a LoRA run adds the tokenizer and the train state. Loading one
(`models.load_model`) loads the base, then the adapter.
"""

import json
from pathlib import Path

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "is_adapter_dir", "adapter_base"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_dir(path) -> bool:
    """Whether `path` is a folder with an adapter config (and no full model config of its own)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path) -> str:
    """The base model an adapter folder was trained on; ValueError naming the file when it says none."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{file} is not a readable adapter config ({type(e).__name__})") from None
    if not isinstance(base, str) or not base:
        raise ValueError(f"{file} names no base model (expected base_model_name_or_path)")
    if not (Path(path) / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"adapter folder {path} has no {ADAPTER_WEIGHTS} (expected PEFT's safetensors weights)")
    return base
