"""`leanfit estimate`: predict a training step's peak memory before launch, or choose settings that fit a budget."""

import contextlib
import json
import shlex
import sys
from dataclasses import fields

from ..gpus import GPUS, gpu_card
from ..memory.budget import NothingFits, choose_config, finetune_args
from ..memory.estimate import ATTN_IMPLS, DEVICE_KINDS, LOSS_IMPLS, PARALLEL, StepConfig, estimate_step
from ..model.architectures import ARCHITECTURES, check_positions, load_config
from ..optim import OPTIMIZERS
from ..units import ALLOCATOR_MARGIN, CUDA_CONTEXT_BYTES, MiB, parse_bytes
from .common import (
    OneLineParser,
    dtype_flag,
    fail,
    flag_type,
    non_negative_float,
    positive_float,
    positive_int,
)

PROG = "leanfit estimate"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Predict a training step's peak memory (traced on the meta device: "
                      "no weights, no GPU).")
    p.add_argument("--model", default="gpt2", help=f"built-in architecture ({', '.join(ARCHITECTURES)}), local "
                   "dir, or hub id with a cached config (default: gpt2)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="micro-batch size in sequences (default: 8)")
    p.add_argument("--block-size", type=positive_int, default=1024,
                   help="tokens per sequence, as the model sees them (default: 1024)")
    p.add_argument("--dtype", type=dtype_flag, default="fp32", help="parameter dtype: fp32, bf16, fp16 (default: fp32)")
    p.add_argument("--autocast", type=dtype_flag, default=None, help="autocast dtype: bf16 or fp16 (default: none)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--loss", dest="loss_impl", default="naive", choices=LOSS_IMPLS,
                   help="naive and hf hold the full logits; chunked, triton and auto are traced as chunked "
                   "(default: naive)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--optimizer-in-backward", action="store_true")
    p.add_argument("--device", dest="device_kind", default="cuda", choices=DEVICE_KINDS)
    p.add_argument("--attn", dest="attn_implementation", default="sdpa", choices=ATTN_IMPLS)
    p.add_argument("--parallel", default="none", choices=PARALLEL,
                   help="fsdp2: one rank's peak when parameters, gradients and optimizer state are sharded over "
                   "--world-size ranks (plus the all-gathered units); ddp: one rank's, a whole replica (default: none)")
    p.add_argument("--world-size", type=positive_int, default=1, help="ranks (GPUs) with --parallel (default: 1)")
    p.add_argument("--gpu", type=flag_type(lambda text: gpu_card(text).name, "gpu"), default=None,
                   help=f"plan for this card ({', '.join(GPUS)}; `leanfit info --gpu` lists them): its usable memory "
                   "is the default --memory-budget, its dtypes and attention kernel shape the plan")
    p.add_argument("--memory-budget", type=flag_type(parse_bytes, "size"), default=None,
                   help="e.g. 15GiB, 14.75GiB, 800MiB, 16GB (default: the --gpu card's usable memory, else none)")
    p.add_argument("--choose", action="store_true", help="choose the settings that fit --memory-budget, "
                   "keeping batch-size x block-size tokens per optimizer step, and print them as a "
                   "`leanfit finetune` command")
    p.add_argument("--no-optimizer-in-backward", dest="allow_oib", action="store_false",
                   help="with --choose: never step in the backward (keeps gradient accumulation and clipping)")
    p.add_argument("--lora", action="store_true", help="LoRA adapters on the frozen base, held in --dtype "
                   "(no gradients or optimizer state for it)")
    p.add_argument("--qlora", dest="quantize", action="store_const", const="nf4", default=None,
                   help="LoRA on a 4-bit NF4 base (bitsandbytes, CUDA)")
    p.add_argument("--lora-rank", type=positive_int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--lora-alpha", type=positive_float, default=32.0, help="LoRA alpha (default: 32)")
    p.add_argument("--lora-dropout", type=non_negative_float, default=0.0, help="LoRA dropout (default: 0)")
    p.add_argument("--lora-targets", default="all-linear",
                   help="modules to adapt, comma-separated, or all-linear (default: all-linear)")
    p.add_argument("--allow-lora", action="store_true", help="with --choose: when no full fine-tune fits with "
                   "micro-batches of 4,096 tokens, LoRA (and on CUDA QLoRA) may be chosen")
    p.add_argument("--cuda-context", type=flag_type(parse_bytes, "size"), default=None,
                   help=f"CUDA context size (default {CUDA_CONTEXT_BYTES // MiB}MiB)")
    p.add_argument("--allocator-margin", type=non_negative_float, default=None,
                   help=f"fraction added for allocator rounding and fragmentation (default {ALLOCATOR_MARGIN})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _choose(args, overrides, header) -> int:
    if args.memory_budget is None:
        raise ValueError("--choose: expected --memory-budget or --gpu, given neither")
    check_positions(args.block_size, load_config(args.model))
    lora = ("qlora" if args.quantize else "lora") if args.lora else None
    options = {k: getattr(args, k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
    try:
        choice = choose_config(args.model, args.batch_size * args.block_size, args.block_size, args.memory_budget,
                               device_kind=args.device_kind, optimizer=args.optimizer,
                               allow_optimizer_in_backward=args.allow_oib, estimate_kwargs=overrides, gpu=args.gpu,
                               lora=lora, allow_lora=args.allow_lora, lora_options=options,
                               parallel=args.parallel, world_size=args.world_size)
    except NothingFits as e:
        print(json.dumps(e.to_dict()) if args.json else e.estimate.table(args.memory_budget))
        return fail(PROG, e)
    launch = ["leanfit", "launch", "--nproc-per-node", str(args.world_size)] if args.parallel != "none" else ["leanfit"]
    command = shlex.join([*launch, "finetune", *finetune_args(choice, args.gpu)])
    if args.json:
        print(json.dumps({**choice.to_dict(), "finetune_command": command}))
    else:
        print(f"{header}{choice.describe()}\nas a fine-tuning run (add --corpus FILE for your text; the estimate is "
              f"not a GPU measurement):\n  {command}")
    return 0


def _apply_gpu(args) -> str:
    """Checks --gpu against --device and makes the card's usable memory the default budget; the card's line."""
    if args.gpu is None:
        return ""
    if args.device_kind != "cuda":
        raise ValueError(f"--gpu {args.gpu}: expected --device cuda, given --device {args.device_kind}")
    card = GPUS[args.gpu]
    if args.memory_budget is None:
        args.memory_budget = card.usable_bytes
    return f"gpu {card.name}: {card.describe()}\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.lora = args.lora or args.quantize is not None
    overrides = {"cuda_context_bytes": args.cuda_context, "allocator_margin": args.allocator_margin}
    try:
        header = _apply_gpu(args)
        if args.choose:
            return _choose(args, overrides, header)
        check_positions(args.block_size, load_config(args.model))
        step = StepConfig(**{f.name: getattr(args, f.name) for f in fields(StepConfig)})
        est = estimate_step(step, **overrides)
    except ValueError as e:
        return fail(PROG, e)
    print(json.dumps(est.to_dict(args.memory_budget)) if args.json else header + est.table(args.memory_budget))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
