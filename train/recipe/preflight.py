"""Every check a fine-tuning run can make before it loads a weight or writes a file.

A bad path, prompt file, length, device, loss or output folder then costs seconds, not a training run:
`preflight(config)` reads the corpus and the prompts, finds the model (offline first) and reads its config
and tokenizer, but no weights, and checks the output folder. `claim_out` then makes the folder the run's,
just before the first write: it removes only what leanfit can prove it wrote (the files a unit's manifest or
run.json's `outputs` list, the leftovers of its own interrupted saves), never a path for its name alone.
"""

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import config as cfg
from ..checkpointing.atomic import check_writable
from ..checkpointing.checkpoint import EXPORT, UNITS, clean_stale, is_unit_folder, list_units, remove_unit_outputs
from ..checkpointing.lock import LOCK, check_unlocked
from ..data import DEFAULT_CORPUS, BlockLoader, make_blocks, read_corpus, split_blocks
from ..devices import indexed_device, resolve_device
from ..evaluation.generate import DEFAULT_PROMPTS, check_prompt_lengths, read_prompts
from ..gpus import check_properties
from ..model.architectures import check_positions, load_config
from ..model.loading import load_tokenizer, resolve_model
from ..model.lora import MERGED, check_lora_targets
from ..model.quant import check_qlora
from ..parallel import Parallel
from ..units import format_bytes
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
    blocks: torch.Tensor | None = None  # (N, T): the corpus tokenized into blocks, when the checks made them


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


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(indexed_device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_budget(budget: int | None, device: torch.device):
    """Warns when `--memory-budget` is more than the device has: the plan would then not fit anything real."""
    if budget and device.type in ("cuda", "cpu") and budget > _device_memory(device):
        warnings.warn(f"--memory-budget {format_bytes(budget)} is more than {device} has "
                      f"({format_bytes(_device_memory(device))}); the plan assumes memory that is not there",
                      stacklevel=3)


def _is_leanfit_run(out: Path) -> bool:
    """run.json of leanfit's schema, or a unit with leanfit's manifest: a `checkpoints/` folder alone is not."""
    try:
        run = read_run_json(out)
    except ValueError:
        return any(is_unit_folder(u) for u in list_units(out))
    return run.get("schema") == RUN_SCHEMA


def _check_own_names(out: Path):
    units, export = out / UNITS, out / EXPORT
    if units.is_symlink() or (units.exists() and not units.is_dir()):
        raise ValueError(f"--out {out}: {units} is a symlink or a file, not leanfit's checkpoint folder: move it "
                         f"or choose another --out")
    if os.path.lexists(export) and not (export.is_symlink() and Path(os.readlink(export)).parts[:1] == (UNITS,)):
        raise ValueError(f"--out {out}: {export} was not made by leanfit (expected a link into {UNITS}/): move it "
                         f"or choose another --out")


def _check_out(config: cfg.TrainConfig, overwrite: bool):
    out = Path(config.out)
    check_writable(out, "--out", folder=True)
    if not out.is_dir():
        return
    check_unlocked(out)
    if not (config.resume or overwrite) and any(p.name != LOCK for p in out.iterdir()):
        if _is_leanfit_run(out):
            raise ValueError(f"--out {out} already holds a leanfit run: continue it with --resume {out}, or pass "
                             f"--overwrite to replace it")
        raise ValueError(f"--out {out} is not empty and is not a leanfit run: choose a new or empty folder, or pass "
                         f"--overwrite to write into it (files of the run's names are then replaced, nothing else "
                         f"is removed)")
    _check_own_names(out)


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
    _check_budget(config.memory_budget, device)
    corpus_path = Path(config.corpus) if config.corpus else DEFAULT_CORPUS
    if config.resume and not corpus_path.exists():
        raise ValueError(f"the run's corpus {corpus_path} is gone: if it moved, give its new path with --corpus "
                         f"(its content is checked against the run's)")
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
    blocks = None
    if not dry_run:
        tokenizer = load_tokenizer(model_ref)
        check_prompt_lengths(tokenizer, read_prompts(config.prompts or DEFAULT_PROMPTS), config.max_length)
        blocks = _check_blocks(text, tokenizer, config)
        _check_out(config, overwrite)
    return Checked(device, corpus_path, text, model_ref, point, blocks=blocks)


def _check_blocks(text: str, tokenizer, config: cfg.TrainConfig) -> torch.Tensor:  # returns (N, T)
    """The corpus blocks, after checking that they fill one block, leave training blocks and a batch of them."""
    blocks = make_blocks(text, tokenizer, config.block_size)
    train, _ = split_blocks(blocks, config.val_fraction)
    BlockLoader(train, config.batch_size, seed=config.seed, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return blocks


def _listed_outputs(out: Path) -> list[str]:
    """The top-level outputs the previous run's run.json says it wrote (none when there is no leanfit run.json)."""
    try:
        run = read_run_json(out)
    except ValueError:
        return []
    listed = run.get("outputs") if run.get("schema") == RUN_SCHEMA else None
    return [n for n in listed if n in OWN_FILES] if isinstance(listed, list) else []


def claim_out(out: Path, overwrite: bool, fresh: bool) -> list[str]:
    """Makes `out` ready for the run's first write: on a fresh run with `overwrite`, removes the previous leanfit
    run's units (the files their manifests list), its `checkpoint` link and the files its run.json lists; always
    removes what leanfit's interrupted saves left. Returns what it removed."""
    if not out.is_dir():
        return []
    removed = clean_stale(out, OWN_FILES)
    if fresh and overwrite:
        removed += remove_unit_outputs(out)
        for name in _listed_outputs(out):
            path = out / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(name)
            elif name == MERGED and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                removed.append(name)
    return removed
