"""Runtime memory report: parts add up, phases and steps are recorded, files are written whole."""

import json
import os

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import AutoModelForCausalLM, GPT2Config

from leanfit.kernels.launch import device_arch, device_sms
from leanfit.train.lm_loss import causal_lm_loss
from leanfit.train.memory.profiler import CUDA_KINDS, MemoryProfiler, apply_memory_cap
from leanfit.train.memory.tensor_counter import CPU_KINDS, TensorCounter
from leanfit.train.recipe.preflight import check_dtype
from leanfit.train.units import CUDA_CONTEXT_BYTES
from tests.fake_cuda import H100_TOTAL_BYTES


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


def test_memory_cap_on_a_simulated_80gb_card_sets_a_fraction_on_device_0(fake_cuda):
    budget, context = 15 * 2**30, 512 * 2**20
    assert apply_memory_cap(budget, "cuda", context_bytes=context) == (budget - context) / H100_TOTAL_BYTES
    assert apply_memory_cap(budget, torch.device("cuda")) == (budget - CUDA_CONTEXT_BYTES) / H100_TOTAL_BYTES
    assert fake_cuda.named("set_per_process_memory_fraction") == [
        (0, ((budget - context) / H100_TOTAL_BYTES,)), (0, ((budget - CUDA_CONTEXT_BYTES) / H100_TOTAL_BYTES,))]
    assert apply_memory_cap(H100_TOTAL_BYTES, "cuda") is None


def test_the_simulated_card_refuses_an_index_less_device_as_torch_does(fake_cuda):
    with pytest.raises(ValueError, match="Expected a torch.device with a specified index or an integer, but got:cuda"):
        torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda"))
    with pytest.raises(ValueError, match="but got:cuda"):
        torch.cuda.memory_allocated("cuda")
    assert fake_cuda.calls == []


def test_profiler_on_a_simulated_card_asks_device_0(fake_cuda):
    model, opt, _ = tiny_setup("cpu")
    prof = MemoryProfiler(model, opt, device="cuda")
    assert prof.device == torch.device("cuda", 0) and prof.report()["phases"]["weights_loaded"]["peak_bytes"] == 0
    assert {name for name, _, _ in fake_cuda.calls} == {"synchronize", "reset_peak_memory_stats", "memory_stats",
                                                        "mem_get_info"}
    assert {index for _, index, _ in fake_cuda.calls} == {0}


def test_capability_checks_on_a_simulated_card_ask_device_0(fake_cuda):
    check_dtype("bf16", torch.device("cuda"))
    assert device_arch(torch.device("cuda")) == 90 and device_sms(torch.device("cuda")) == 132
    assert [(name, index) for name, index, _ in fake_cuda.calls] == [
        ("get_device_capability", 0), ("get_device_capability", 0), ("get_device_properties", 0)]
