"""LoRA through PEFT and the 8-bit optimizer: training changes only the adapters, the losses skip the frozen head's
weight gradient, the merged export equals the adapter model, resume is exact, bad options are one line."""

import json
import signal

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from leanfit.train.commands.finetune import main
from leanfit.train.commands.generate import main as generate_main
from leanfit.train.lm_loss import causal_lm_loss
from leanfit.train.memory.budget import NothingFits, choose_config, finetune_args
from leanfit.train.memory.estimate import StepConfig, estimate_step
from leanfit.train.model.architectures import architecture_config
from leanfit.train.model.loading import load_model
from leanfit.train.model.lora import apply_lora
from leanfit.train.model.quant import import_bitsandbytes, import_peft, nf4_buffers
from leanfit.train.optim import make_optimizer
from leanfit.train.recipe.context import Hooks
from leanfit.train.recipe.finetune import run
from leanfit.train.recipe.outputs import WRITERS
from tests.helpers import assert_close, device_for
from tests.tiny_lm import TRAIN_TEXT, tiny_model_dir, tiny_run_config
from tests.train.test_cli_errors import one_line_error
from tests.train.test_estimate import measured_peak

GRAD_TOL = {torch.float32: (1e-6, 1e-4)}


def lora_tiny(kind="llama", **lora):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind))
    return apply_lora(model, **lora)


def adapter_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_chunked_loss_on_a_peft_model_equals_hfs_loss_and_its_adapter_gradients(kind):
    model = lora_tiny(kind, rank=4, alpha=8.0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 300, (2, 12))
    ref = model(input_ids=ids, labels=ids).loss
    ref_grads = adapter_grads(model, ref)
    ours = causal_lm_loss(model, ids, impl="chunked")
    our_grads = adapter_grads(model, ours)
    assert_close("loss", ref.detach(), ours.detach(), table=GRAD_TOL)
    assert ref_grads.keys() == our_grads.keys() and all("lora_" in n for n in ref_grads)
    for name, g in ref_grads.items():
        assert_close(name, g, our_grads[name], table=GRAD_TOL)


FRESH = ("zeros", "empty", "full", "new_zeros", "new_empty", "new_full", "zeros_like", "empty_like", "full_like")


class _Allocations(TorchDispatchMode):
    """The shapes of the buffers made from nothing (zeros, empty, full): accumulators, not copies of inputs (the
    Triton interpreter copies every tensor it hands a kernel)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in FRESH:
            self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)]
        return out


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_a_frozen_head_gets_no_weight_gradient_buffer(impl):
    """With LoRA the head (V, H) is frozen: no buffer of its shape is made in the loss's forward or backward.
    The control, the same model with its head trainable, makes one (the dW accumulator)."""
    model = lora_tiny("llama", rank=4).to(device_for(impl))
    head = model.get_output_embeddings().weight
    ids = torch.randint(0, 300, (2, 12), device=device_for(impl))

    def shapes():
        with _Allocations() as seen:
            causal_lm_loss(model, ids, impl=impl).backward()
        return seen.shapes

    assert not head.requires_grad and tuple(head.shape) not in shapes()
    assert head.grad is None
    head.requires_grad_(True)
    assert tuple(head.shape) in shapes() and head.grad is not None


@pytest.mark.slow
def test_lora_on_the_embedded_smollm2_lowers_the_loss_and_changes_only_adapters():
    model, tokenizer = load_model("smollm2-135m")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = apply_lora(model, rank=8, alpha=16.0)
    model.train()
    ids = torch.tensor(tokenizer(TRAIN_TEXT)["input_ids"][:66]).reshape(2, 33)
    opt = make_optimizer(model, "adamw", "cpu", lr=2e-3)
    losses = []
    for _ in range(4):
        loss = causal_lm_loss(model, ids, impl="chunked")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    trained = dict(model.get_base_model().named_parameters())
    adapters = {n: p for n, p in trained.items() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert all(float(p.abs().max()) > 0 for n, p in adapters.items() if "lora_B" in n)
    for name, p in trained.items():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer.", ".")
        assert not p.requires_grad and torch.equal(p, base[original]), name


@pytest.fixture
def files(corpus, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("You are a\n", encoding="utf-8")
    return corpus, prompts


def lora_config(tmp_path, files, name, **overrides):
    corpus, prompts = files
    values = dict(out=str(tmp_path / name), iters=6, warmup=1, eval_every=3, num_return_sequences=1, max_length=8,
                  eval_contexts=0, eval_study=False, lora=True, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
                  lora_targets="q_proj,v_proj,down_proj")
    return tiny_run_config(tmp_path, corpus, prompts, kind="llama", dropout=0.1, **{**values, **overrides})


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("settings", [{}, {"lora": False, "optimizer": "adamw8bit"}], ids=["lora", "adamw8bit"])
def test_resume_after_sigint_equals_an_uninterrupted_run(tmp_path, files, settings):
    hooks = lambda: Hooks(on_setup=[])  # noqa: E731
    with pytest.warns(UserWarning, match="high"):
        run(lora_config(tmp_path, files, "whole", **settings), hooks=hooks())

    def interrupt(ctx, record):
        if ctx.step == 3:
            signal.raise_signal(signal.SIGINT)

    cut = hooks()
    cut.on_step.append(interrupt)
    with pytest.warns(UserWarning, match="high"):
        assert run(lora_config(tmp_path, files, "cut", **settings), hooks=cut)["status"] == "interrupted"
    unit = tmp_path / "cut" / "checkpoint"
    if settings.get("lora", True):
        assert (unit / "adapter_model.safetensors").is_file() and not (unit / "model.safetensors").exists()
    assert main(["--resume", str(tmp_path / "cut")]) == 0
    a, b = _metrics(tmp_path / "whole"), _metrics(tmp_path / "cut")
    assert [(m["kind"], m["step"]) for m in a] == [(m["kind"], m["step"]) for m in b]
    for key in ("loss", "grad_norm"):
        ref = torch.tensor([m[key] for m in a if m["kind"] == "train"], dtype=torch.float64)
        out = torch.tensor([m[key] for m in b if m["kind"] == "train"], dtype=torch.float64)
        assert_close(f"resumed {key}", ref, out, table={torch.float64: (1e-6, 1e-5)})


def test_the_merged_export_and_the_adapter_give_the_same_logits(tmp_path, files, capsys):
    held = {}
    hooks = Hooks(on_setup=[], writers={"complete": [lambda ctx: held.update(model=ctx.model), *WRITERS["complete"]]})
    with pytest.warns(UserWarning, match="high"):
        run(lora_config(tmp_path, files, "run", lora_targets="all-linear", lora_dropout=0.0), hooks=hooks)
    out = tmp_path / "run"
    ids = torch.randint(0, 300, (2, 10))
    peft = import_peft()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", 0.1)).eval()
    with torch.no_grad():
        untrained = base(ids).logits
        trained = held["model"].eval()(ids).logits
        adapter = peft.PeftModel.from_pretrained(base, out / "checkpoint").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
        loaded = load_model(str(out / "checkpoint"))[0].eval()(ids).logits
    assert not torch.allclose(adapter, untrained, atol=1e-4), "training changed nothing"
    assert_close("adapter vs the trained model", trained, adapter)
    assert_close("merged vs adapter", adapter, merged)
    assert_close("load_model(unit) vs adapter", adapter, loaded)
    capsys.readouterr()
    for model in (out / "checkpoint", out / "merged"):
        assert generate_main(["--model", str(model), "--prompt", "You are", "--max-length", "6",
                              "--num-return-sequences", "1", "--device", "cpu", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0][0]["generated_text"].startswith("You are")


def test_adamw8bit_follows_adamw_and_keeps_uint8_moments():
    """Five steps of bitsandbytes' 8-bit AdamW move the weights as torch's AdamW does, to within the block-wise
    quantization of its moments (relative RMS of the update difference under 3%), weight decay included."""
    ref = torch.nn.Linear(128, 64)
    ours = torch.nn.Linear(128, 64)
    ours.load_state_dict(ref.state_dict())
    start = ref.weight.detach().clone()
    opts = [make_optimizer(m, name, "cpu", lr=1e-2, weight_decay=0.1) for m, name in ((ref, "adamw"),
                                                                                       (ours, "adamw8bit"))]
    x, y = torch.randn(32, 128), torch.randn(32, 64)
    for _ in range(5):
        for model, opt in zip((ref, ours), opts):
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    ref_step, our_step = (m.weight.detach() - start for m in (ref, ours))
    rel = (our_step - ref_step).square().mean().sqrt() / ref_step.square().mean().sqrt()
    assert rel < 0.03, f"8-bit update off by {rel:.2%} (relative RMS)"
    state = opts[1].state[ours.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert opts[1].state[ours.bias]["state1"].dtype == torch.float32  # under 4,096 elements: fp32 moments


@pytest.mark.parametrize("argv,expected", [
    (["--lora", "--lora-rank", "0"], "--lora-rank: expected a positive integer"),
    (["--lora", "--lora-targets", "nope"], "not found in the base model"),
    (["--lora", "--lora-targets", "lm_head"], "cannot carry an adapter"),
    (["--lora-alpha", "8"], "expected --lora"),
    (["--lora", "--lora-dropout", "1"], "lora_dropout must be in [0, 1)"),
    (["--qlora", "--device", "cpu"], "CUDA only"),
])
def test_bad_lora_options_exit_2_with_one_line_before_the_model_loads(tmp_path, files, capsys, monkeypatch,
                                                                     argv, expected):
    import leanfit.train.model.lora as lora

    def refuse(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(lora, "load_model", refuse)
    corpus, prompts = files
    try:
        code = main(["--model", str(tiny_model_dir("llama")), "--corpus", str(corpus), "--prompts", str(prompts),
                     "--out", str(tmp_path / "run"), "--block-size", "16", *argv])
    except SystemExit as e:  # argparse's own refusals exit from the parser
        code = e.code
    assert code == 2
    assert expected in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": "all-linear"}
ESTIMATE_CASES = [
    ("tiny-gpt2-lora", "tiny-gpt2", 4, 64, LORA, "adamw"),
    ("tiny-llama-lora-dropout", "tiny-llama", 4, 64, {**LORA, "dropout": 0.1, "targets": "q_proj,v_proj"}, "adamw"),
    ("tiny-gpt2-adamw8bit", "tiny-gpt2", 4, 64, None, "adamw8bit"),
    ("tiny-gpt2-lora-adamw8bit", "tiny-gpt2", 4, 64, LORA, "adamw8bit"),
    ("smollm2-135m-lora", "smollm2-135m", 1, 32, LORA, "adamw"),
    ("smollm2-135m-adamw8bit", "smollm2-135m", 1, 16, None, "adamw8bit"),
]


def _architecture(name):
    if name == "tiny-gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128)
    if name == "tiny-llama":
        return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=96, vocab_size=1000, max_position_embeddings=128)
    return architecture_config(name)


@pytest.mark.parametrize("model,batch,block,lora,optimizer", [c[1:] for c in ESTIMATE_CASES],
                         ids=[c[0] for c in ESTIMATE_CASES])
@pytest.mark.slow
def test_the_estimate_equals_the_measured_cpu_peak_within_3_percent(model, batch, block, lora, optimizer):
    config = _architecture(model)
    real = measured_peak(config, batch, block, "chunked", lora=lora, optimizer=optimizer)["peak"]["bytes"]
    adapters = {} if lora is None else {"lora": True, "lora_rank": lora["rank"], "lora_alpha": lora["alpha"],
                                        "lora_dropout": lora["dropout"], "lora_targets": lora["targets"]}
    est = estimate_step(StepConfig(model=config, batch_size=batch, block_size=block, device_kind="cpu",
                                   loss_impl="chunked", optimizer=optimizer, **adapters))
    assert abs(est.tensor_peak_bytes - real) <= 0.03 * real, (
        f"estimate {est.tensor_peak_bytes} vs measured {real} ({est.tensor_peak_bytes / real - 1:+.2%})")
    if lora is not None:
        assert est.breakdown["gradients"] < 0.05 * est.breakdown["parameters"]


def test_the_4bit_stand_in_holds_what_bitsandbytes_keeps():
    """`quant.nf4_buffers` against bitsandbytes' own NF4 double quantization of a weight (on the CPU)."""
    bnb = import_bitsandbytes()
    weight = torch.randn(96, 200, dtype=torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    real = [packed, state.absmax, state.state2.absmax, state.code, state.offset]
    ours = list(nf4_buffers(weight.numel(), "cpu").values())
    assert [(tuple(t.shape), t.dtype) for t in ours] == [(tuple(t.shape), t.dtype) for t in real]


@pytest.mark.slow
def test_qlora_keeps_the_base_in_4_bits_and_no_state_for_it():
    common = dict(model="smollm2-135m", batch_size=1, block_size=64, loss_impl="chunked", autocast="fp16",
                  gpu="t4", dtype="fp16")
    full = estimate_step(**{**common, "dtype": "fp32"})
    lora = estimate_step(**common, lora=True)
    qlora = estimate_step(**common, lora=True, quantize="nf4")
    config = architecture_config("smollm2-135m")
    linear = config.num_hidden_layers * config.hidden_size * (
        config.hidden_size * 2 + 2 * config.hidden_size // 3 + 3 * config.intermediate_size)
    embedding = config.vocab_size * config.hidden_size
    assert lora.n_params - lora.n_trainable == full.n_params == qlora.n_params - qlora.n_trainable
    assert qlora.breakdown["parameters"] < lora.breakdown["parameters"] - 1.4 * linear  # 2 bytes -> about 0.53
    assert qlora.breakdown["parameters"] > 2 * embedding + linear / 2
    assert lora.breakdown["optimizer_state"] == 8 * lora.n_trainable < full.breakdown["optimizer_state"] / 20


def test_choose_picks_lora_only_when_allowed():
    """A budget that a LoRA step fits and no full fine-tune does (its weights, gradients and AdamW states alone
    are four copies of the weights): NothingFits without --allow-lora, LoRA with it."""
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=8000, n_positions=128)
    lora = estimate_step(model=config, batch_size=1, block_size=64, device_kind="cpu", loss_impl="chunked",
                         lora=True)
    budget = lora.peak_bytes + 1024
    with pytest.raises(NothingFits):
        choose_config(config, 64, 64, budget, device_kind="cpu", allow_optimizer_in_backward=False)
    choice = choose_config(config, 64, 64, budget, device_kind="cpu", allow_optimizer_in_backward=False,
                           allow_lora=True)
    assert choice.config.lora and choice.estimate.peak_bytes <= budget
    assert "--lora" in finetune_args(choice)


PUBLISHED = {"smollm2-360m": 362e6, "smollm2-1.7b": 1.71e9, "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9,
             "qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_architecture_presets_have_the_published_sizes(name):
    """Parameter counts as the model cards state them (two or three significant figures)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture_config(name))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / PUBLISHED[name] - 1) < 0.01, n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA's 4-bit base is trained on CUDA only")
def test_qlora_on_cuda_trains_only_adapters_on_a_4bit_base_within_its_estimate(tmp_path, files):
    """On a GPU: the base's linear layers load as bitsandbytes' Linear4bit, a few steps lower the loss and change
    only the adapters, and the allocator's peak stays within the estimate's (printed for bench/RESULTS.md)."""
    from leanfit.train.model.lora import load_for_training

    bnb = import_bitsandbytes()
    config = lora_config(tmp_path, files, "q", qlora=True, lora=True, dtype="fp16", lora_dropout=0.0,
                         lora_targets="all-linear", device="cuda")
    device = torch.device("cuda")
    model, _ = load_for_training(config, config.model, device)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = make_optimizer(model, "adamw", "cuda", lr=1e-2)
    ids = torch.randint(0, 300, (4, 64), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    losses = []
    for _ in range(4):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = causal_lm_loss(model, ids, impl="chunked")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device)
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    est = estimate_step(model=config.model, batch_size=4, block_size=64, dtype="fp16", autocast="fp16",
                        loss_impl="chunked", lora=True, quantize="nf4", device_kind="cuda",
                        gpu=None, cuda_context_bytes=0)
    print(f"QLoRA tiny llama 4 x 64: measured allocated peak {peak} B, estimate {est.allocated_peak_bytes} B "
          f"({est.allocated_peak_bytes / peak - 1:+.1%}) on {torch.cuda.get_device_name(device)}")
