"""Every check a fine-tuning run can make before it loads a weight or writes a file.

A bad path, prompt file, length, device, loss or output folder then costs seconds, not a training run:
`preflight(config)` reads the corpus and the prompts, finds the model (offline first) and reads its config
and tokenizer, but no weights, and checks the output folder. `claim_out` then makes the folder the run's,
just before the first write.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import config as cfg
from ..checkpointing.atomic import check_writable
from ..checkpointing.checkpoint import UNITS, clean_stale, remove_unit_outputs
from ..data import DEFAULT_CORPUS, read_corpus
from ..devices import indexed_device, resolve_device
from ..evaluation.generate import DEFAULT_PROMPTS, check_prompt_lengths, read_prompts
from ..gpus import check_properties
from ..model.architectures import check_positions, load_config
from ..model.loading import load_tokenizer, resolve_model
from ..model.lora import check_lora_targets
from ..model.quant import check_qlora
from ..parallel import Parallel
from .outputs import OWN_FILES, RUN_SCHEMA
from .settings import ResumePoint, read_run_json, resume_point

__all__ = ["Checked", "preflight", "check_dtype", "check_gpu", "claim_out"]


@dataclass
class Checked:
    """What the checks found, for setup to use: the device, the corpus text and its path, the model to load (on
    resume: the newest complete unit), the resume point (None for a fresh run) and the ranks (one process until
    `distributed.start_parallel`)."""

    device: torch.device
    corpus_path: Path
    text: str
    model_ref: str
    resume: ResumePoint | None = None
    parallel: Parallel = field(default_factory=Parallel)


def check_dtype(dtype: str, device: torch.device):
    if dtype == "bf16" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(indexed_device(device))
        if major < 8:
            raise ValueError(f"--dtype bf16 needs a GPU of compute capability >= 8.0, this one is {major}.{minor} "
                             f"(expected --dtype fp16 or fp32)")


def check_gpu(gpu: str, device: torch.device):
    """Refuses a run whose `--gpu` is not the card `device` is (ValueError, one line); nothing is loaded."""
    if device.type != "cuda":
        raise ValueError(f"--gpu {gpu}: expected to run on that CUDA card, found device {device} "
                         f"(--dry-run plans without it)")
    check_properties(gpu, torch.cuda.get_device_properties(indexed_device(device)))


def _check_loss(loss: str, device: torch.device):
    if loss in ("triton", "hybrid") and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--loss {loss} needs a CUDA device (or TRITON_INTERPRET=1), and this run is on {device}: "
                         f"expected --loss chunked or auto")


def _is_leanfit_run(out: Path) -> bool:
    try:
        run = read_run_json(out)
    except ValueError:
        return (out / UNITS).is_dir()
    return run.get("schema") == RUN_SCHEMA or "summary" in run


def _check_out(config: cfg.TrainConfig, overwrite: bool):
    out = Path(config.out)
    check_writable(out, "--out", folder=True)
    if config.resume or not out.is_dir() or overwrite or not any(out.iterdir()):
        return
    if _is_leanfit_run(out):
        raise ValueError(f"--out {out} already holds a leanfit run: continue it with --resume {out}, or pass "
                         f"--overwrite to replace it")
    raise ValueError(f"--out {out} is not empty and is not a leanfit run: choose a new or empty folder, or pass "
                     f"--overwrite to write into it (files of the run's names are then replaced)")


def preflight(config: cfg.TrainConfig, overwrite: bool = False, dry_run: bool = False,
              resume: ResumePoint | None = None) -> Checked:
    """Checks `config` against this machine, its files and the model's config; loads no weights, writes nothing.

    `resume` is the resume point the settings were merged from (read here when not given).

    Raises:
        ValueError (with the flag or file, what was expected and what was given) for the first problem found.
    """
    device = resolve_device(config.device)
    if config.gpu and not dry_run:
        check_gpu(config.gpu, device)
    check_dtype(config.dtype, device)
    _check_loss(config.loss, device)
    corpus_path = Path(config.corpus) if config.corpus else DEFAULT_CORPUS
    text = read_corpus(corpus_path, config.encoding)
    point = None
    if config.resume:
        same = resume is not None and resume.folder.resolve() == Path(config.resume).resolve()
        point = resume if same else resume_point(config.resume)
        model_ref = str(point.unit)
    else:
        model_ref = config.model
        resolve_model(model_ref)
    check_positions(config.block_size, load_config(model_ref))
    if config.lora and not config.resume:
        check_lora_targets(load_config(model_ref), config.lora_targets)
    if config.qlora and not dry_run:
        check_qlora(device)
    if not dry_run:
        prompts = read_prompts(config.prompts or DEFAULT_PROMPTS)
        check_prompt_lengths(load_tokenizer(model_ref), prompts, config.max_length)
        _check_out(config, overwrite)
    return Checked(device, corpus_path, text, model_ref, point)


def claim_out(out: Path, overwrite: bool, fresh: bool) -> list[str]:
    """Makes `out` ready for the run's first write: on a fresh run with `overwrite`, removes the previous run's
    outputs (only `OWN_FILES`); always removes what interrupted saves left. Returns what it removed."""
    if not out.is_dir():
        return []
    removed = clean_stale(out)
    if fresh and overwrite:
        if (out / UNITS).is_dir() or os.path.lexists(out / "checkpoint"):
            removed += [UNITS, "checkpoint"]
        remove_unit_outputs(out)
        for name in OWN_FILES:
            path = out / name
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(name)
            elif path.is_dir():
                shutil.rmtree(path)
                removed.append(name)
    return removed

