"""Runtime memory report: parts add up, phases and steps are recorded, files are written whole."""

import json
import os

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import AutoModelForCausalLM, GPT2Config

from leanfit.train.lm_loss import causal_lm_loss
from leanfit.train.memory.profiler import CUDA_KINDS, MemoryProfiler
from leanfit.train.memory.tensor_counter import CPU_KINDS, TensorCounter


def tiny_setup(device):
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=211, n_positions=64)
    model = AutoModelForCausalLM.from_config(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 211, (4, 33), device=device)
    return model, opt, ids


def run_steps(prof, model, opt, ids, n, loss_impl="naive"):
    for i in range(n):
        with prof.step(i):
            with prof.phase("forward"):
                loss = causal_lm_loss(model, ids, impl=loss_impl)
            with prof.phase("backward"):
                loss.backward()
                del loss
            with prof.phase("optimizer_step"):
                opt.step()
                opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("loss_impl", ["naive", "chunked"])
def test_report_parts_add_up_and_files_are_written(loss_impl, device, tmp_path):
    model, opt, ids = tiny_setup(device)
    prof = MemoryProfiler(model, opt, out_dir=str(tmp_path))
    run_steps(prof, model, opt, ids, 3, loss_impl)
    prof.close()
    paths = prof.save()
    report = json.loads(open(paths["report"]).read())
    peak = report["peak"]
    assert peak["bytes"] == sum(peak["breakdown"].values()) > 0
    assert set(peak["breakdown"]) == set(CUDA_KINDS if device.type == "cuda" else CPU_KINDS)
    assert set(report["phases"]) == {"weights_loaded", "forward", "backward", "optimizer_step"}
    assert [s["step"] for s in report["steps"]] == [0, 1, 2]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peak["breakdown"]["parameters"] == params
    assert peak["breakdown"]["optimizer_state"] >= 2 * params
    assert peak["top_modules"] and all(b > 0 for _, b in peak["top_modules"])
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["memory.png", "memory_report.json"]
    assert "peak" in prof.table()
    if device.type == "cuda":
        assert peak["bytes"] == max(r["allocated_peak_bytes"] for r in report["phases"].values())


def test_counter_peak_matches_memtracker_on_a_cpu_step():
    model, opt, ids = tiny_setup("cpu")
    causal_lm_loss(model, ids, impl="naive").backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

    def step():
        loss = causal_lm_loss(model, ids, impl="naive")
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        step()
    reference = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    counter = TensorCounter()
    counter.claim(list(model.parameters()), "parameters")
    counter.claim([v for s in opt.state.values() for v in s.values()], "optimizer_state")
    with counter:
        step()
    assert abs(counter.peak - reference) <= 0.01 * reference, (counter.peak, reference)
    assert counter.peak == sum(counter.peak_kinds.values())


def test_oom_writes_the_report_with_the_failing_step(tmp_path):
    model, opt, ids = tiny_setup("cpu")
    prof = MemoryProfiler(model, opt, out_dir=str(tmp_path))
    run_steps(prof, model, opt, ids, 1)
    with pytest.raises(torch.OutOfMemoryError) as err:
        with prof.step(1), prof.phase("backward"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    paths = prof.on_oom(err.value)
    prof.close()
    report = json.loads(open(paths["report"]).read())
    assert report["oom"]["step"] == 1 and report["oom"]["phase"] == "backward"
    assert "Tried to allocate" in report["oom"]["error"]
    assert report["steps"][-1]["step"] == 1 and report["steps"][-1]["failed"] is True


def test_profiler_without_tensor_tracking_reports_rss():
    model, opt, ids = tiny_setup("cpu")
    prof = MemoryProfiler(model, opt, track_tensors=False)
    run_steps(prof, model, opt, ids, 1)
    prof.close()
    peak = prof.report()["peak"]
    assert peak["bytes"] == sum(peak["breakdown"].values()) and peak["bytes"] > 0
