"""`--gpu`: for every card a plan that fits its memory in a dtype it runs; the card found is checked; the names.

Independent facts: NVIDIA's compute capabilities (developer.nvidia.com/cuda-gpus), bf16 from sm_80 (A100
whitepaper), GPT-2 small's 12 attention layers, the device names PyTorch reports on these cards, and the rules of
PyTorch's SDPA dispatch (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp).
"""

import contextlib
import io
import json
import re
import shlex
from types import SimpleNamespace

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from leanfit.train.commands.estimate import main as estimate_main
from leanfit.train.commands.finetune import main as finetune_main
from leanfit.train.commands.finetune import parse_args as finetune_parse
from leanfit.train.commands.info import main as info_main
from leanfit.train.gpus import GPUS, check_properties, sdpa_kernel
from leanfit.train.memory.meta_trace import SdpaStandIn
from leanfit.train.recipe import finetune
from leanfit.train.units import GiB
from tests.tiny_lm import tiny_model_dir

CAPABILITY = {"t4": (7, 5), "l4": (8, 9), "a10g": (8, 6), "a100-40gb": (8, 0), "a100-80gb": (8, 0), "h100": (9, 0)}
BF16_FROM = (8, 0)
GPT2_LAYERS = 12
SEED = ["--model", "gpt2", "--batch-size", "24", "--block-size", "1024"]


def one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("leanfit "), err
    return lines[0]


@pytest.fixture(scope="module")
def plans():
    """`leanfit estimate --choose --json` for GPT-2 small at 24 x 1024 tokens per step, once per card."""
    out = {}
    for name in GPUS:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = estimate_main([*SEED, "--gpu", name, "--choose", "--json"])
        out[name] = code, json.loads(buf.getvalue())
    return out


def test_the_table_has_nvidias_compute_capabilities_and_bf16_from_sm80():
    assert {name: card.capability for name, card in GPUS.items()} == CAPABILITY
    assert all(card.bf16 == (card.capability >= BF16_FROM) for card in GPUS.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GPUS))
def test_every_card_gets_a_plan_that_fits_its_memory_in_a_dtype_it_runs(plans, name):
    code, plan = plans[name]
    card, cfg = GPUS[name], plan["estimate"]["config"]
    assert code == 0 and plan["fits"] and plan["budget_bytes"] == card.usable_bytes
    assert plan["peak_bytes"] <= card.usable_bytes
    assert cfg["batch_size"] * plan["grad_accum_steps"] * cfg["block_size"] == 24 * 1024
    if plan["next_larger"]:
        assert plan["next_larger"]["peak_bytes"] > card.usable_bytes
    sm80 = CAPABILITY[name] >= BF16_FROM
    assert cfg["autocast"] == ("bf16" if sm80 else "fp16")
    assert not (cfg["autocast"] == "fp16" and cfg["optimizer_in_backward"]), "a gradient scaler needs every gradient"
    assert plan["estimate"]["attention"] == {("flash" if sm80 else "efficient"): GPT2_LAYERS}
    argv = shlex.split(plan["finetune_command"])
    config, dry_run, _ = finetune_parse(argv[2:])
    assert argv[:2] == ["leanfit", "finetune"] and not dry_run
    assert (config.gpu, config.block_size, config.batch_size, config.grad_accum, config.dtype) == (
        name, 1024, cfg["batch_size"], plan["grad_accum_steps"], cfg["autocast"])


def test_the_naive_fp32_loop_on_a_t4_does_not_fit_by_its_peak_minus_the_t4s_memory(capsys):
    seed = [*SEED, "--gpu", "t4", "--loss", "naive", "--dtype", "fp32", "--optimizer", "adam"]
    assert estimate_main(seed) == 0
    out = capsys.readouterr().out
    peak = float(re.search(r"predicted peak\s+([\d.]+) GiB", out).group(1))
    over = float(re.search(r"does NOT fit in the budget of 14\.56 GiB: ([\d.]+) GiB over", out).group(1))
    assert abs(peak - 14.56 - over) <= 0.011, out
    assert "memory-efficient kernel x12" in out
    assert estimate_main([*seed, "--memory-budget", f"{peak + 1}GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


def test_a_finetune_dry_run_plans_for_the_card_unless_a_budget_is_given(tmp_path, capsys):
    common = ["--model", str(tiny_model_dir("gpt2")), "--gpu", "t4", "--block-size", "64", "--batch-size", "4",
              "--dry-run", "--out", str(tmp_path / "out")]
    assert finetune_main(common) == 0
    out = capsys.readouterr().out
    assert "memory budget 14.56 GiB (the t4's usable memory) on cuda (t4)" in out
    assert "memory-efficient kernel" in out and "dtype fp16" in out.splitlines()[-1]
    assert finetune_main([*common, "--memory-budget", "1MiB"]) == 2
    assert "nothing fits in 1.0 MiB" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def _props(name, gib, major, minor):
    return SimpleNamespace(name=name, total_memory=int(gib * GiB), major=major, minor=minor)


def test_a_run_on_another_card_is_refused_in_one_line_before_any_planning(monkeypatch, tmp_path, capsys):
    def not_before_the_check(*args, **kwargs):
        raise AssertionError("planned or loaded before checking the card")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _props(
        "NVIDIA A100-SXM4-40GB", 39.50, 8, 0))
    monkeypatch.setattr(finetune, "plan_memory", not_before_the_check)
    monkeypatch.setattr(finetune, "setup", not_before_the_check)
    assert finetune_main(["--gpu", "t4", "--out", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--gpu t4" in line and "NVIDIA A100-SXM4-40GB" in line and "pass --gpu a100-40gb" in line
    assert not (tmp_path / "out").exists()


def test_the_card_named_passes_the_check_and_planning_starts(monkeypatch, tmp_path):
    class Planned(Exception):
        pass

    def planned(config, *rest):
        raise Planned(config.gpu)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _props("Tesla T4", 14.75, 7, 5))
    monkeypatch.setattr(finetune, "plan_memory", planned)
    with pytest.raises(Planned, match="t4"):
        finetune_main(["--gpu", "T4", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("gpu, props, fits", [
    ("t4", _props("Tesla T4", 15.83, 7, 5), True),  # ECC off
    ("a100-40gb", _props("NVIDIA A100-PCIE-40GB", 39.39, 8, 0), True),
    ("a100-40gb", _props("NVIDIA A100-SXM4-80GB", 79.14, 8, 0), False),
    ("h100", _props("NVIDIA H100 NVL", 93.10, 9, 0), False),
    ("l4", _props("NVIDIA L40S", 44.40, 8, 9), False),
    ("a100-40gb", _props("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 19.50, 8, 0), False),
])
def test_the_check_takes_driver_variation_and_refuses_other_cards(gpu, props, fits):
    if fits:
        assert check_properties(gpu, props).name == gpu
    else:
        with pytest.raises(ValueError, match=f"--gpu {gpu}: expected"):
            check_properties(gpu, props)


@pytest.mark.parametrize("main", [estimate_main, finetune_main], ids=["estimate", "finetune"])
def test_an_unknown_gpu_exits_2_with_one_line_listing_the_names(main, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--gpu", "v100"])
    line = one_line_error(capsys.readouterr().err)
    assert exit_.value.code == 2 and "'v100'" in line and all(name in line for name in GPUS)


def test_info_lists_every_card(capsys):
    assert info_main(["--gpu"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert set(rows) == set(GPUS)
    assert rows["t4"][-4:] == ["7.5", "no", "memory-efficient;", "memory-efficient"]


@pytest.mark.parametrize("capability, dtype, kwargs, kernel", [
    ((7, 5), "fp16", {}, "efficient"),  # flash from sm_80
    ((7, 5), "bf16", {}, "math"),  # no fused kernel takes bf16 below sm_80
    ((8, 0), "bf16", {}, "flash"),
    ((8, 0), "fp32", {}, "efficient"),  # flash takes fp16 and bf16 only
    ((8, 0), "fp16", {"has_mask": True}, "efficient"),  # flash takes no mask
    ((8, 6), "fp16", {"head_dim": 200}, "efficient"),  # sm_86-89 train no head dim in (192, 224] with flash
    ((9, 0), "fp16", {"head_dim": 200}, "flash"),
    ((8, 0), "fp32", {"head_dim": 6}, "math"),  # the efficient kernel needs head dims divisible by 4 here
])
def test_the_kernel_follows_pytorchs_dispatch_rules(capability, dtype, kwargs, kernel):
    assert sdpa_kernel(capability, dtype, **kwargs) == kernel


def _attention_step_peak(capability, b=2, h=3, t=100, d=40):
    q, k, v = (torch.empty(b, h, t, d, dtype=torch.float16, device="meta", requires_grad=True) for _ in range(3))
    mt = MemTracker()
    mt.track_external(q, k, v)
    with SdpaStandIn("cuda", capability) as sdpa, mt:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.empty_like(out))
    return mt.get_tracker_snapshot("peak")[torch.device("meta")]["Total"], dict(sdpa.kernels)


def test_the_efficient_kernel_keeps_and_allocates_other_buffers_than_flash():
    """At T=100, D=40 (fp16): flash keeps the lse (B, H, T) and its backward adds softmax_d (B, H, 128) and a dq
    accumulator (B, 128, H, 64) in fp32 (flash_api.cpp); the efficient kernel keeps the lse padded to (B, H, 128)
    and its backward adds delta (B, H, T) and 2 x 1 dq tiles of 64 x 64 fp32 plus 16 bytes per (batch, head)
    (attention.cu, attention_backward.cu, kernel_backward.h)."""
    b, h, t = 2, 3, 100
    flash, flash_kernels = _attention_step_peak((8, 0))
    efficient, efficient_kernels = _attention_step_peak((7, 5))
    assert (flash_kernels, efficient_kernels) == ({"flash": 1}, {"efficient": 1})
    flash_extra = 4 * (b * h * t + b * h * 128 + b * 128 * h * 64)
    efficient_extra = 4 * (b * h * 128 + b * h * t) + b * h * 2 * (16 + 64 * 64 * 4)
    assert efficient - flash == efficient_extra - flash_extra


@pytest.mark.parametrize("preset, loadable", [("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct"),
                                              ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct"),
                                              ("gpt2", "gpt2"), ("smollm2-135m", "smollm2-135m")])
def test_a_printed_plan_names_a_model_finetune_can_load(preset, loadable):
    from leanfit.train.memory.budget import finetune_args
    from leanfit.train.memory.estimate import StepConfig

    step = StepConfig(model=preset, batch_size=2, block_size=1024, autocast="fp16", loss_impl="chunked",
                      lora=True, quantize="nf4")
    args = finetune_args(SimpleNamespace(config=step, grad_accum_steps=4), gpu="t4")
    config, _, _ = finetune_parse(args)
    assert config.model == loadable and config.qlora and (config.batch_size, config.grad_accum) == (2, 4)
