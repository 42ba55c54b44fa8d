"""Kills a checkpoint save at each of its filesystem steps, in turn, and reports what resume would find.

Run by tests/train/test_runs.py as `python -m tests.train.crash_worker ROOT` with OMP_NUM_THREADS=1: for each step i of
one save, a forked child starts saving unit 6 over a folder holding units 2 and 4 (two are kept) and is
SIGKILLed just before step i; the parent then looks at the folder as a resumed run would. One JSON list goes to stdout.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from leanfit.train.checkpointing import checkpoint
from tests.tiny_lm import tiny_model_dir


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "run_id": "crash-test", "config": {"lr": 1e-3},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(7, generator=g)}},
                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]},
            "metrics": [{"kind": "train", "step": s, "loss": 1.0 / (s + 1)} for s in range(1, step + 1)]}


def _recorder(names):
    def hook(what):
        names.append(what)

    return hook


def _killer(at):
    count = {"n": 0}

    def hook(what):
        count["n"] += 1
        if count["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(root: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    base = root / "base"
    checkpoint.save_unit(base, model, tokenizer, state(2))
    checkpoint.save_unit(base, model, tokenizer, state(4))
    names = []
    checkpoint._HOOK = _recorder(names)
    shutil.copytree(base, root / "count", symlinks=True)
    checkpoint.save_unit(root / "count", model, tokenizer, state(6))
    checkpoint._HOOK = None
    results = []
    for at, what in enumerate(names, start=1):
        folder = root / f"kill-{at}"
        shutil.copytree(base, folder, symlinks=True)
        pid = os.fork()
        if pid == 0:
            checkpoint._HOOK = _killer(at)
            try:
                checkpoint.save_unit(folder, model, tokenizer, state(6))
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        unit, found, skipped = checkpoint.latest_unit(folder)
        expected = state(found["step"])
        same = (torch.equal(found["optimizer"]["state"][0]["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"])
                and found["metrics"] == expected["metrics"] and found["optimizer"]["param_groups"][0]["betas"]
                == (0.9, 0.95))
        reloaded = AutoModelForCausalLM.from_pretrained(unit)
        weights = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
        link = folder / checkpoint.EXPORT
        link_unit = Path(os.path.realpath(link)).name if link.is_symlink() else None
        cleaned = checkpoint.clean_stale(folder)
        left = sorted(p.name for p in [*folder.iterdir(), *(folder / checkpoint.UNITS).iterdir()]
                      if p.name.startswith("."))
        results.append({"at": at, "before": what, "killed": os.WIFSIGNALED(status)
                        and os.WTERMSIG(status) == signal.SIGKILL, "step": found["step"], "unit": unit.name,
                        "same": same, "weights": weights, "skipped": skipped, "link": link_unit,
                        "units": [u.name for u in checkpoint.list_units(folder)], "cleaned": cleaned, "left": left})
    print(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
