# B batch (streams), T window, L layers, H hidden
"""`leanfit lstm`, the run: checks, setup, the TBPTT loop, validation in bits per character, sampling, resume.

`prepare(config)` does every check that needs no training (corpus, vocabulary, windows, backend, device,
prompts, the output folder) before anything is written; `train(run)` steps AdamW with a cosine schedule over
consecutive windows, carrying each stream's LSTM state (detached) from one window to the next, and saves a
checkpoint unit every `save_every` steps (checkpointing/checkpoint.py) that holds the weights, the optimizer,
the schedule, the carried state and the RNG, so a resumed run takes the same steps as an uninterrupted one.
"""

import contextlib
import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpointing.checkpoint import latest_unit
from ..data import DEFAULT_CORPUS, read_corpus
from ..devices import resolve_device
from ..optim import make_optimizer
from ..step import lr_factor, no_interrupt, stop_signals
from .config import DEFAULT_PROMPTS, LSTMConfig, from_dict, validate
from .data import Streams, Vocab, build_vocab, make_streams, split_ids, unigram_bits
from .model import WEIGHTS, CharLM, ModelShape, resolve_backend

__all__ = ["Run", "prepare", "train", "evaluate_bits", "sample", "FIXED_ON_RESUME", "LN2"]

LN2 = math.log(2)
FIXED_ON_RESUME = ("corpus", "encoding", "vocab", "embed", "hidden", "layers", "block_size", "batch_size",
                   "val_fraction", "seed")


@dataclass
class Run:
    config: LSTMConfig
    out: Path
    device: torch.device
    backend: str
    vocab: Vocab
    train_streams: Streams
    val_streams: Streams
    prompts: list[str]
    corpus_info: dict
    model: CharLM | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    step: int = 0
    carry: tuple[torch.Tensor, torch.Tensor] | None = None  # (L, B, H) each
    metrics: list = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    resumes: list = field(default_factory=list)
    resume_state: dict | None = None
    profiler: object = None
    status: str = "running"
    stop_requested: bool = False
    saving: bool = False
    abort_after_save: bool = False
    started: float = field(default_factory=time.time)

    def autocast(self):
        bf16 = self.config.dtype == "bf16" or (self.config.dtype == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def evals(self) -> list:
        return [m for m in self.metrics if m["kind"] == "eval"]


def _read_prompts(c: LSTMConfig) -> list[str]:
    if c.prompts is None:
        return list(DEFAULT_PROMPTS)
    path = Path(c.prompts)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: not a file (expected a text file, one prompt a line)")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt (expected one prompt a line)")
    return prompts


def _check_out(out: Path, fresh: bool, overwrite: bool):
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file (expected a folder)")
    if fresh and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} already holds files (expected an empty folder, --overwrite to replace "
                             f"a previous run's outputs, or --resume {out})")


def _resume_point(folder: Path, flags: dict) -> tuple[LSTMConfig, dict]:
    run_json = folder / "run.json"
    if not run_json.is_file():
        raise ValueError(f"--resume {folder}: no run.json (expected the --out folder of a `leanfit lstm` run)")
    run_id = json.loads(run_json.read_text(encoding="utf-8")).get("run_id")
    _, state, _ = latest_unit(folder, run_id)
    saved = state["config"]
    changed = [k for k in FIXED_ON_RESUME if k in flags and flags[k] != saved[k]]
    if changed:
        raise ValueError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} cannot change in a "
                         f"resumed run (expected the saved values)")
    return validate(from_dict({**saved, **flags, "out": str(folder)})), state


def prepare(config: LSTMConfig, overwrite: bool = False, resume: str | None = None, flags: dict | None = None) -> Run:
    """Every check before training; ValueError names the flag. Writes nothing."""
    state = None
    if resume is not None:
        config, state = _resume_point(Path(resume), flags or {})
    c = validate(config)
    device = resolve_device(c.device)
    backend = resolve_backend(c.backend, device)
    text = read_corpus(c.corpus or DEFAULT_CORPUS, c.encoding)
    vocab = build_vocab(text, c.vocab, None if state is None else state["vocab"]["chars"])
    ids = vocab.encode(text)
    train_ids, val_ids = split_ids(ids, c.val_fraction)
    train_streams = make_streams(train_ids, c.batch_size, c.block_size)
    val_streams = make_streams(val_ids, min(c.batch_size, max(1, (val_ids.numel() - 1) // c.block_size)),
                               c.block_size, "validation")
    prompts = _read_prompts(c)
    for p in prompts:
        vocab.encode(p)
    _check_out(Path(c.out), state is None, overwrite)
    info = {"path": str(c.corpus or DEFAULT_CORPUS), "characters": len(text), "vocab_size": vocab.size,
            "train_characters": train_ids.numel(), "val_characters": val_ids.numel(),
            "unigram_bits": unigram_bits(train_ids, vocab.size), "windows_per_epoch": train_streams.windows,
            "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return Run(c, Path(c.out), device, backend, vocab, train_streams, val_streams, prompts, info,
               resume_state=state)


def build(run: Run) -> Run:
    """The model, optimizer and schedule; a resumed run's state restored."""
    c = run.config
    torch.manual_seed(c.seed)
    shape = ModelShape(run.vocab.size, c.embed, c.hidden, c.layers, c.dropout)
    run.model = CharLM(shape, run.backend).to(run.device)
    run.optimizer = make_optimizer(run.model, "adamw", run.device.type, lr=c.lr, weight_decay=c.weight_decay,
                                   betas=(c.beta1, c.beta2))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: lr_factor(s, c))
    if run.resume_state is not None:
        _restore(run, run.resume_state)
    return run


def _restore(run: Run, state: dict):
    unit = Path(run.out, "checkpoints", f"step-{state['step']:06d}")
    run.model.load_state_dict(load_file(str(unit / WEIGHTS)))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step, run.metrics, run.run_id = state["step"], list(state["metrics"]), state["run_id"]
    run.carry = None if state["carry"] is None else tuple(t.to(run.device) for t in state["carry"])
    torch.set_rng_state(state["rng"])
    if run.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    run.resumes = list(state.get("resumes", [])) + [{"step": run.step}]


def train_state(run: Run) -> dict:
    return {"step": run.step, "run_id": run.run_id, "config": vars(run.config).copy(),
            "vocab": run.vocab.to_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "carry": run.carry, "rng": torch.get_rng_state(), "metrics": run.metrics, "resumes": run.resumes,
            "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}


def _window(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    w = run.step % run.train_streams.windows
    if w == 0:
        run.carry = None
    x, y = run.train_streams.batch(w)
    return x.to(run.device), y.to(run.device)


def train_step(run: Run, profile: bool = False) -> dict:
    """One optimizer step on the next window; the carried state moves on, detached."""
    started = time.perf_counter()
    x, y = _window(run)
    phase = run.profiler.phase if profile else (lambda name: contextlib.nullcontext())
    with phase("forward"), run.autocast():
        loss, state = run.model.loss(x, y, run.carry)
    with phase("backward"):
        loss.backward()
    with phase("optimizer_step"):
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.clip) if run.config.clip else None
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.carry = tuple(t.detach() for t in state)
    run.step += 1
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss is {value} at step {run.step} (expected a finite loss; try a lower --lr)")
    seconds = time.perf_counter() - started
    return {"kind": "train", "step": run.step, "loss": value, "bpc": value / LN2, "lr": lr,
            "grad_norm": None if norm is None else float(norm), "tokens_per_s": x.numel() / seconds}


@torch.no_grad()
def evaluate_bits(model: CharLM, streams: Streams, device, autocast, windows: int = 0) -> float:
    """Bits per character of `model` on `streams`, the state carried across its windows (no dropout)."""
    was_training = model.training
    model.eval()
    total, count, carry = 0.0, 0, None
    for w in range(min(windows or streams.windows, streams.windows)):
        x, y = (t.to(device) for t in streams.batch(w))
        with autocast:
            loss, carry = model.loss(x, y, carry)
        total, count = total + loss.item() * y.numel(), count + y.numel()
    model.train(was_training)
    return total / count / LN2


def eval_record(run: Run) -> dict:
    bits = evaluate_bits(run.model, run.val_streams, run.device, run.autocast(), run.config.eval_windows)
    return {"kind": "eval", "step": run.step, "val_loss": bits * LN2, "val_bpc": bits}


@torch.no_grad()
def sample(model: CharLM, vocab: Vocab, prompt: str, length: int, temperature: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> str:
    """`prompt` continued to `length` characters (at least one new), drawn at `temperature` from the top_k."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = vocab.encode(prompt).to(device).view(1, -1)
    out = list(ids[0].tolist())
    logits, state = model.logits(ids)
    for _ in range(max(1, length - len(out))):
        z = logits[-1, 0] / temperature
        if top_k and top_k < z.numel():
            z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
        nxt = torch.multinomial(z.softmax(-1).cpu(), 1, generator=generator)
        out.append(int(nxt))
        logits, state = model.logits(nxt.to(device).view(1, 1), state)
    model.train(was_training)
    return vocab.decode(out)


def train(run: Run, save, on_step=print) -> str:
    """Steps to `config.iters`: validation every `eval_every` steps, `save(run)` every `save_every` and at the end.
    Returns "complete", or "interrupted" when a signal asked it to stop (after a step, saved)."""
    c = run.config
    with stop_signals(run):
        while run.step < c.iters:
            profile = run.profiler is not None and len(run.profiler.steps) < c.profile_steps
            with run.profiler.step(run.step) if profile else contextlib.nullcontext():
                record = train_step(run, profile)
            if profile and len(run.profiler.steps) == c.profile_steps:
                run.profiler.close()
            run.metrics.append(record)
            if run.step % c.eval_every == 0 or run.step == c.iters:
                run.metrics.append(eval_record(run))
            on_step(run, record)
            if run.step % c.save_every == 0 or run.step == c.iters or run.stop_requested:
                with no_interrupt(run):
                    save(run)
            if run.stop_requested:
                return "interrupted"
    return "complete"
