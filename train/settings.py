"""Which settings a fine-tuning run uses: the defaults, then a resumed run's own (run.json), then a preset,
then the flags given on the command line, each overriding the one before."""

import json
from pathlib import Path

from . import config as cfg

__all__ = ["merge_settings"]


def merge_settings(flags: dict, preset: str | None = None) -> cfg.TrainConfig:
    """The run's `TrainConfig` from the flags given (`TrainConfig` field names, unset ones left out) and a preset.

    With `flags["resume"]`, the resumed run's run.json supplies every setting not given, and `out` defaults
    to the resumed folder. Raises ValueError for a resume folder without run.json or an unknown preset.
    """
    base = cfg.TrainConfig()
    resume = flags.get("resume")
    flags = dict(flags)
    if resume:
        saved = Path(resume) / "run.json"
        if not saved.is_file():
            raise ValueError(f"--resume expects a run folder with run.json, got {resume}")
        base = cfg.from_dict({k: v for k, v in json.loads(saved.read_text())["config"].items() if k != "resume"})
        flags.setdefault("out", resume)
    if preset is not None:
        if preset not in cfg.PRESETS:
            raise ValueError(f"--preset: expected one of {', '.join(cfg.PRESETS)}, got {preset!r}")
        base = cfg.from_dict(cfg.PRESETS[preset], base)
    return cfg.from_dict(flags, base)
