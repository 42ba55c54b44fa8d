"""Fine-tuning over 2 ranks on the CPU (gloo) against one process: DDP and FSDP2 curves and parameters, the tied
embedding's gradient, sharded units resumed at another world size, the per-rank memory and its estimate, and a
rank that fails. Every test starts its own processes (torchrun, `leanfit launch` or torch.multiprocessing).

The one-process reference runs the same global batch: 1 rank x 4 sequences against 2 ranks x 2, so the block
stream must follow the global batch, not the world size.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from leanfit.train.checkpointing.dcp_storage import DcpFormatError, SafeReader
from leanfit.train.commands.estimate import main as estimate_main
from leanfit.train.commands.finetune import main as finetune_main
from leanfit.train.commands.launch import main as launch_main
from leanfit.train.config import TrainConfig
from leanfit.train.data import BlockLoader
from leanfit.train.lm_loss import causal_lm_loss
from leanfit.train.memory.estimate import StepConfig, estimate_step
from leanfit.train.optim import make_optimizer
from leanfit.train.recipe.finetune import run
from tests.helpers import assert_close
from tests.tiny_lm import TRAIN_TEXT, tiny_model_dir
from tests.train import dist_worker
from tests.train.test_runs import hostile

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
    pytest.mark.slow,  # 2-rank jobs: torchrun, leanfit launch or torch.multiprocessing, 5-20 s each
]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
LOSS_TOL = 1e-5  # fp32 curves: the ranks' sums and FSDP2's reduce-scatter add in another order (seen: 5e-7)
PARAM_TOL = {torch.float32: (1e-6, 1e-5)}  # after one AdamW step of lr 5e-4 (seen: 1e-7)
GRAD_TOL = {torch.float32: (1e-6, 1e-4)}  # fp32 ranks against the fp64 one-process gradient
COMMON = dict(block_size=16, iters=4, warmup=1, lr=5e-4, eval_every=2, val_fraction=0.2, device="cpu",
              num_return_sequences=2, max_length=12, eval_contexts=0, eval_study=False, save_every="1", keep_last=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    (folder / "corpus.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    (folder / "prompts.txt").write_text("You are a\nYou are an\n", encoding="utf-8")
    return folder


def settings(files, out, kind, **overrides) -> dict:
    return {"model": str(tiny_model_dir(kind)), "corpus": str(files / "corpus.txt"),
            "prompts": str(files / "prompts.txt"), "out": str(out), **COMMON, **overrides}


def as_flags(values: dict) -> list:
    args = []
    for key, value in values.items():
        if key == "eval_study":
            args += [] if value else ["--no-eval-study"]
        elif value is True:
            args.append(f"--{key.replace('_', '-')}")
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def single(values: dict) -> Path:
    run(TrainConfig(**values))
    return Path(values["out"])


def torchrun(args: list, nproc: int = 2, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m",
                           "leanfit.train.commands.finetune", *args], env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def curve(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(m["kind"], m["step"]): m["loss"] if m["kind"] == "train" else m["val_loss"] for m in rows}


def assert_same_curve(ref: Path, out: Path, tol=LOSS_TOL):
    a, b = curve(ref), curve(out)
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= tol, f"curves differ by {worst:.3e} (tolerance {tol:g}): {a} vs {b}"


def cut_at(src: Path, dst: Path, step: int) -> Path:
    """A copy of the run folder `src` as a run stopped after saving unit `step`."""
    shutil.copytree(src, dst, symlinks=True)
    for unit in (dst / "checkpoints").iterdir():
        if int(unit.name[5:]) > step:
            shutil.rmtree(unit)
    (dst / "checkpoint").unlink()
    (dst / "checkpoint").symlink_to(Path("checkpoints") / f"step-{step:06d}")
    return dst


@pytest.fixture(scope="module")
def fsdp2(files, tmp_path_factory):
    """(2 ranks x 2 sequences with FSDP2, 1 process x 4 sequences): tied GPT-2, 4 steps, a unit each step."""
    root = tmp_path_factory.mktemp("fsdp2")
    done = torchrun(as_flags(settings(files, root / "ranks", "gpt2", batch_size=2, parallel="fsdp2")))
    return root / "ranks", single(settings(files, root / "one", "gpt2", batch_size=4)), done


def test_fsdp2_curve_equals_one_process_and_only_rank_0_writes(fsdp2):
    ranks, one, done = fsdp2
    assert_same_curve(one, ranks)
    assert sorted(p.name for p in ranks.iterdir()) == sorted(p.name for p in one.iterdir())
    assert done.stdout.count("step 0: val loss") == 1 and done.stdout.count("complete: 4 steps") == 1
    report = json.loads((ranks / "memory_report.json").read_text())
    assert report["world_size"] == 2 and [r["rank"] for r in report["ranks"]] == [0, 1]
    assert all(r["peak_bytes"] > 0 for r in report["ranks"])
    unit = json.loads((ranks / "checkpoint" / "unit.json").read_text())
    assert {"optimizer/index.json", "optimizer/rank-00000.safetensors", "optimizer/rank-00001.safetensors"} <= set(
        unit["files"])
    assert not [p for p in (ranks / "checkpoint").rglob("*") if p.suffix in (".pt", ".bin", ".pickle", ".metadata")]


def test_fsdp2_every_parameter_after_one_step_matches_one_process(fsdp2):
    """The unit of step 1 holds the weights gathered from the shards; the tied embedding is one tensor."""
    from transformers import AutoModelForCausalLM

    ranks, one, _ = fsdp2
    ref = load_file(one / "checkpoints" / "step-000001" / "model.safetensors")
    out = load_file(ranks / "checkpoints" / "step-000001" / "model.safetensors")
    start = load_file(Path(tiny_model_dir("gpt2")) / "model.safetensors")
    assert ref.keys() == out.keys() and "transformer.wte.weight" in ref
    for name in ref:
        assert not torch.equal(ref[name], start[name]), f"{name} did not train"
        assert_close(name, ref[name], out[name], table=PARAM_TOL)
    plain = AutoModelForCausalLM.from_pretrained(ranks / "checkpoint")
    assert plain.lm_head.weight.data_ptr() == plain.transformer.wte.weight.data_ptr()


def test_ddp_curve_with_accumulation_equals_one_process(files, tmp_path):
    """Llama (untied head), 2 ranks x 2 sequences x 2 micro-batches against 1 process x 4 x 2."""
    values = dict(grad_accum=2, iters=3, save_every="10min")
    torchrun(as_flags(settings(files, tmp_path / "ranks", "llama", batch_size=2, parallel="ddp", **values)))
    one = single(settings(files, tmp_path / "one", "llama", batch_size=4, **values))
    assert_same_curve(one, tmp_path / "ranks")
    steps = [json.loads(line) for line in (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()]
    assert {m["tokens"] for m in steps if m["kind"] == "train"} == {2 * 2 * 2 * 15}  # batch x accum x ranks x 15


def test_ddp_with_lora_equals_one_process(files, tmp_path):
    """LoRA adapters (PEFT) under DDP: only the adapters train and are reduced; the unit is an adapter folder."""
    values = dict(iters=2, save_every="10min", lora=True, lora_targets="c_attn,c_fc")
    torchrun(as_flags(settings(files, tmp_path / "ranks", "gpt2", batch_size=2, parallel="ddp", **values)))
    one = single(settings(files, tmp_path / "one", "gpt2", batch_size=4, **values))
    assert_same_curve(one, tmp_path / "ranks")
    assert (tmp_path / "ranks" / "checkpoint" / "adapter_model.safetensors").is_file()


def test_resume_two_ranks_on_one_process_equals_an_uninterrupted_run(fsdp2, files, tmp_path):
    """Units of step 2 sharded by 2 FSDP2 ranks, resharded into one process (no torchrun) with 4 sequences; a
    pickle dropped where DCP's own index would be is never opened."""
    ranks, one, _ = fsdp2
    cut = cut_at(ranks, tmp_path / "cut", 2)
    marker = tmp_path / "unpickled"
    hostile(cut / "checkpoint" / "optimizer" / ".metadata", marker)
    run(TrainConfig(**{**settings(files, cut, "gpt2", batch_size=4), "resume": str(cut)}))
    assert not marker.exists()
    assert_same_curve(one, cut)
    assert json.loads((cut / "run.json").read_text())["resumes"][-1] == {
        "step": 2, "changed": {"batch_size": [2, 4], "parallel": ["fsdp2", "none"]}}


def test_resume_one_process_on_two_ranks_equals_an_uninterrupted_run(fsdp2, files, tmp_path):
    """A one-process unit of step 2 (its optimizer state keyed by index) loaded into 2 FSDP2 ranks."""
    _, one, _ = fsdp2
    cut = cut_at(one, tmp_path / "cut", 2)
    torchrun(["--resume", str(cut), "--batch-size", "2", "--parallel", "fsdp2"])
    assert_same_curve(one, cut)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _states(peak: dict) -> int:
    """Parameters and optimizer state: what a rank holds through the whole step (at the peak the gradients are
    partly freed or not yet made, at different moments in one process and under FSDP2)."""
    return sum(v for k, v in peak.items() if k in ("Parameter", "Optstate", "Sharded Param", "OptState"))


@pytest.mark.slow  # two gloo ranks: about 20 s
def test_ddp_uneven_micro_batches_with_ignored_labels_equal_the_full_batch_mean(tmp_path, monkeypatch):
    """2 ranks x 2 micro-batches of 1 and 2 sequences, with different numbers of -100 labels on every rank and in
    every micro-batch: the averaged gradient is that of the global batch's mean token loss (fp64, one process)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(dist_worker.ddp_accumulation_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    model = dist_worker.build_model().double()
    blocks = dist_worker.uneven_batch()
    logits = model(blocks.clamp(min=0)[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).backward()
    grads = load_file(tmp_path / "ddp-grads.safetensors")
    assert grads.keys() == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert_close(f"DDP grad {name}", p.grad, grads[name], dtype=torch.float32, table=GRAD_TOL)

def test_fsdp2_gradients_and_per_rank_memory_against_one_process_and_the_estimate(tmp_path, monkeypatch):
    """The gathered FSDP2 gradients (tied embedding: embedding and head summed) equal the fp64 one-process ones;
    each rank's tracked states are half the one-process ones, and the estimate predicts its peak within 10%."""
    from torch.distributed._tools.mem_tracker import MemTracker

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(dist_worker.worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    model = dist_worker.build_model().double()
    ids = dist_worker.global_batch(2)
    causal_lm_loss(model, ids, impl="naive").backward()
    grads = load_file(tmp_path / "grads.safetensors")
    assert grads.keys() == {n for n, _ in model.named_parameters()} and "transformer.wte.weight" in grads
    for name, p in model.named_parameters():
        assert_close(name, p.grad.float(), grads[name], table=GRAD_TOL)

    ranks = [json.loads((tmp_path / f"memory-rank{r}.json").read_text()) for r in (0, 1)]
    one = dist_worker.build_model()
    opt = make_optimizer(one, "adamw", "cpu")
    one_ids = ids[: dist_worker.B]
    for tracker in (None, MemTracker()):
        if tracker is not None:
            tracker.track_external(one, opt, one_ids)
        with tracker or torch.enable_grad():
            causal_lm_loss(one, one_ids, impl="chunked").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    single_states = _states(tracker.get_tracker_snapshot("peak")[torch.device("cpu")])
    est = estimate_step(StepConfig(model=dist_worker.model_config(), batch_size=dist_worker.B,
                                   block_size=dist_worker.T, loss_impl="chunked", device_kind="cpu",
                                   parallel="fsdp2", world_size=2))
    est_states = est.breakdown["parameters"] + est.breakdown["optimizer_state"]
    for rank, peak in enumerate(ranks):
        ratio = _states(peak) / single_states
        assert 0.49 <= ratio <= 0.52, f"rank {rank}: states {_states(peak)} / one process {single_states} = {ratio:.3f}"
        err = est.tensor_peak_bytes / peak["Total"] - 1
        assert abs(err) <= 0.10, f"rank {rank}: estimate {est.tensor_peak_bytes}, tracked {peak['Total']} ({err:+.1%})"
        assert abs(est_states / _states(peak) - 1) <= 0.10, (est_states, _states(peak))


def launch(args: list, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "leanfit", "launch", "--nproc-per-node", "2", "finetune",
                           *args], env={**ENV, **env}, capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - start


@pytest.mark.parametrize("fault,timeout,expected", [
    ("raise@1:2", "1800", "leanfit launch: error: rank 1: RuntimeError: injected failure on rank 1 after step 2"),
    ("hang@1:1", "10", "leanfit launch: error: rank 0: RuntimeError: "),
], ids=["rank-raises", "rank-hangs"])
def test_a_failing_rank_ends_the_job_with_its_error_on_one_line(files, tmp_path, fault, timeout, expected):
    """A rank that raises ends the job at once; one that hangs is found by the process group's timeout (10 s,
    more than rank 0 alone needs for the evaluation before training)."""
    values = settings(files, tmp_path / "run", "gpt2", batch_size=1, parallel="fsdp2", iters=3, save_every="10min")
    done, seconds = launch(as_flags(values), {"LEANFIT_TEST_RANK_FAULT": fault, "LEANFIT_DIST_TIMEOUT": timeout})
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith(expected), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and seconds < 120, (seconds, done.stderr[-3000:])
    if fault.startswith("hang"):
        assert "Timed out" in last, last


def test_ranks_read_distinct_blocks_that_together_are_one_process_batches():
    blocks = torch.arange(40).view(20, 2)
    one = BlockLoader(blocks, batch_size=4, seed=3)
    ranks = [BlockLoader(blocks, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(12):  # past an epoch (5 global batches of 4)
        whole, parts = one.next_batch(), [r.next_batch() for r in ranks]
        assert torch.equal(whole, torch.cat(parts)) and not set(parts[0][:, 0].tolist()) & set(parts[1][:, 0].tolist())
    assert ranks[0].state_dict() == one.state_dict() and ranks[0].batches_per_epoch == one.batches_per_epoch == 5


def test_a_one_process_loader_state_resumed_on_two_ranks_continues_the_same_blocks():
    blocks = torch.arange(60).view(30, 2)
    one = BlockLoader(blocks, batch_size=6, seed=5)
    for _ in range(4):  # into the second epoch (5 global batches of 6)
        one.next_batch()
    ranks = [BlockLoader(blocks, batch_size=3, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.load_state_dict(one.state_dict())
    for _ in range(7):
        assert torch.equal(one.next_batch(), torch.cat([r.next_batch() for r in ranks]))


@pytest.mark.parametrize("change,match", [
    (lambda t: t[next(iter(t))]["chunks"][0].update(file="../../model.safetensors"), "shard file name"),
    (lambda t: t[next(iter(t))].update(dtype="object"), "dtype 'object'"),
], ids=["path-outside", "unknown-dtype"])
def test_a_tampered_shard_index_is_refused(fsdp2, tmp_path, change, match):
    folder = shutil.copytree(fsdp2[0] / "checkpoint" / "optimizer", tmp_path / "optimizer")
    index = json.loads((folder / "index.json").read_text())
    change(index["tensors"])
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DcpFormatError, match=match):
        SafeReader(folder).read_metadata()


def one_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


def test_wrong_launches_are_one_line_before_any_process_starts(files, tmp_path, capsys, monkeypatch):
    values = as_flags(settings(files, tmp_path / "run", "gpt2", batch_size=1))
    assert finetune_main([*values, "--parallel", "fsdp2"]) == 2
    assert "runs under torchrun" in one_line(capsys.readouterr().err, "leanfit finetune")
    assert launch_main(["--nproc-per-node", "2", "finetune", *values]) == 2
    assert "expected --parallel ddp or fsdp2" in one_line(capsys.readouterr().err, "leanfit launch")
    assert launch_main(["--nproc-per-node", "2", *values]) == 2
    assert "no `finetune`" in one_line(capsys.readouterr().err, "leanfit launch")
    assert launch_main(["finetune", *values, "--parallel", "fsdp2", "--optimizer-in-backward", "--clip", "0"]) == 2
    assert "not with --parallel fsdp2" in one_line(capsys.readouterr().err, "leanfit launch")
    assert launch_main(["finetune", *values, "--parallel", "fsdp2", "--lora"]) == 2
    assert "--parallel fsdp2: not with --lora" in one_line(capsys.readouterr().err, "leanfit launch")
    assert estimate_main(["--model", "gpt2", "--world-size", "2"]) == 2
    assert "world_size: expected 1 without parallel" in one_line(capsys.readouterr().err, "leanfit estimate")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert finetune_main(values) == 2
    line = one_line(capsys.readouterr().err, "leanfit finetune")
    assert line.startswith("leanfit finetune: error: rank 1: started by torchrun with 2 processes"), line
    assert not (tmp_path / "run").exists()
