"""Which settings a fine-tuning run uses: the defaults, then a resumed run's own (from its newest complete
checkpoint unit), then a preset, then the flags given on the command line, each overriding the one before.

A resumed run keeps what defines it: its model, corpus and block size (and its folder) cannot be changed by a
flag; a corpus given again under another path is accepted when its content hash is the recorded one (a moved
corpus). Every other setting given again with a new value is recorded in run.json (`resumes`). A run.json that
is damaged or missing is rebuilt from the newest verified unit, which holds the settings, with a warning.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from .. import config as cfg
from ..checkpointing.checkpoint import UNITS, UnitError, latest_unit
from ..data import read_corpus, text_sha256

__all__ = ["ResumePoint", "resume_point", "merge_settings", "read_run_json", "resume_changes", "FIXED_ON_RESUME"]

STATE_KEYS = ("config", "corpus_sha256", "loader", "metrics", "optimizer", "rng", "scheduler")  # what a resume reads
FIXED_ON_RESUME = ("model", "corpus", "block_size", "lora", "lora_rank", "lora_targets", "qlora")


def read_run_json(folder) -> dict:
    """A run folder's run.json; ValueError naming the file when it is missing or not a leanfit run.json."""
    path = Path(folder) / "run.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing (expected a leanfit run folder)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise ValueError(f"{path} is not a leanfit run.json (no 'config' object)")
    return run


@dataclass(frozen=True)
class ResumePoint:
    """What a resumed run starts from, read once and handed down: its folder, its run.json, the newest complete
    checkpoint unit (and why newer ones were passed over) and the settings saved in that unit."""

    folder: Path
    run: dict
    unit: Path
    config: cfg.TrainConfig
    skipped: tuple[str, ...] = ()
    corpus_sha256: str = ""  # of the corpus text the run trained on
    warnings: tuple[str, ...] = ()  # e.g. run.json was rebuilt

    @property
    def run_id(self) -> str:
        return self.run.get("run_id", "")


def resume_point(folder) -> ResumePoint:
    """Reads the run folder `folder` once: run.json, then its newest complete unit (the JSON part of its state).

    Raises:
        ValueError naming the folder or file when it cannot be resumed.
    """
    folder = Path(folder)
    if (folder / "train_state.pt").exists() and not (folder / UNITS).is_dir():
        raise ValueError(f"{folder} was written by an older leanfit (train_state.pt, a pickle file, which is never "
                         f"loaded): it cannot be resumed; start a new run from its weights with --model "
                         f"{folder / 'checkpoint'} --out NEW_FOLDER")
    warnings = ()
    try:
        run = read_run_json(folder)
    except ValueError as e:
        run, warnings = None, (f"{e}; rebuilt from the newest verified checkpoint",)
    try:
        unit, state, skipped = latest_unit(folder, run_id=run.get("run_id") if run else None, tensors=False,
                                           required=STATE_KEYS)
    except UnitError as e:
        raise ValueError(str(e)) from None
    if run is None:
        run = {"run_id": state["run_id"], "config": state["config"], "resumes": []}
    saved = cfg.validate(cfg.from_dict({k: v for k, v in state["config"].items() if k != "resume"}))
    return ResumePoint(folder, run, unit, saved, tuple(skipped), state.get("corpus_sha256", ""), warnings)


def _same(name: str, saved, given) -> bool:
    if name == "corpus" and saved and given:
        return Path(saved).resolve() == Path(given).resolve()
    return saved == given


def _moved_corpus(saved: cfg.TrainConfig, config: cfg.TrainConfig, sha256: str) -> bool:
    """Whether `config.corpus` is the run's corpus under another path: the same text, by its hash."""
    if not sha256 or not config.corpus or _same("corpus", saved.corpus, config.corpus):
        return False
    return text_sha256(read_corpus(config.corpus, config.encoding)) == sha256


def resume_changes(saved: cfg.TrainConfig, config: cfg.TrainConfig, source: str = "the config",
                   corpus_sha256: str = "") -> dict:
    """{field: [saved, new]} of what a resumed run changes; ValueError when it would change a fixed setting (a
    corpus whose text hashes to `corpus_sha256` is the same corpus, moved)."""
    moved = _moved_corpus(saved, config, corpus_sha256)
    for name in FIXED_ON_RESUME:
        if not _same(name, getattr(saved, name), getattr(config, name)) and not (name == "corpus" and moved):
            raise ValueError(f"{source}: the run was started with {name} {getattr(saved, name)!r}, not "
                             f"{getattr(config, name)!r}, and a resumed run keeps its {name.replace('_', ' ')}"
                             + (" (the content of that corpus differs)" if name == "corpus" else ""))
    return {k: [v, getattr(config, k)] for k, v in cfg.to_dict(saved).items()
            if k not in ("resume", "out") and not _same(k, v, getattr(config, k))}


def merge_settings(flags: dict, preset: str | None = None) -> tuple[cfg.TrainConfig, ResumePoint | None]:
    """The run's `TrainConfig` from the flags given (`TrainConfig` field names, unset ones left out) and a preset,
    with the `ResumePoint` it was built on (None for a fresh run).

    With `flags["resume"]`, the newest complete unit of that folder supplies every setting not given.
    Raises:
        ValueError for a resume folder without a complete unit, a flag that would change a fixed setting, or
        an unknown preset.
    """
    base, point = cfg.TrainConfig(), None
    resume = flags.get("resume")
    if resume:
        point = resume_point(resume)
        base = point.config
        if "out" in flags and Path(flags["out"]).resolve() != Path(resume).resolve():
            raise ValueError(f"--out {flags['out']}: a resumed run continues in its own folder ({resume}); "
                             f"leave --out out")
        flags = {**flags, "out": str(resume)}
    saved = base
    if preset is not None:
        if preset not in cfg.PRESETS:
            raise ValueError(f"--preset: expected one of {', '.join(cfg.PRESETS)}, got {preset!r}")
        base = cfg.from_dict(cfg.PRESETS[preset], base)
    config = cfg.from_dict(flags, base)
    if "corpus" in flags:
        config = cfg.from_dict({"corpus": str(Path(flags["corpus"]).expanduser().resolve())}, config)
    if resume:
        given = [f"--{k.replace('_', '-')} {flags[k]}" for k in FIXED_ON_RESUME if k in flags]
        source = ", ".join(given + ([f"--preset {preset}"] if preset else [])) or "--resume"
        resume_changes(saved, cfg.validate(config), source, point.corpus_sha256)
    return config, point
