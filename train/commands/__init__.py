"""`leanfit`: one console script, one subcommand per job.

Each subcommand lives in its own module with a `main(argv) -> int`; this file only
dispatches, so `leanfit finetune ...` and `python -m leanfit finetune ...` are the same.
"""

import importlib
import sys

COMMANDS = {
    "finetune": ("leanfit.train.commands.finetune", "fine-tune a causal LM on a text corpus"),
    "lstm": ("leanfit.train.commands.lstm", "train a character-level LSTM language model on a corpus"),
    "launch": ("leanfit.train.commands.launch", "run finetune on several GPUs or nodes under torchrun (--parallel)"),
    "generate": ("leanfit.train.commands.generate", "generate continuations of prompts"),
    "estimate": ("leanfit.train.commands.estimate", "predict a training step's peak memory before launch"),
    "evaluate": ("leanfit.train.commands.evaluate", "perplexity, the a/an probe and prompt studies"),
    "report": ("leanfit.train.commands.report", "write report.md and report.html for runs, or compare runs"),
    "info": ("leanfit.train.commands.info", "versions, devices and which backends can run here"),
    "cache": ("leanfit.train.commands.cache", "list or clear the converted-model cache (LEANFIT_CACHE)"),
}


def _usage():
    lines = ["usage: leanfit <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `leanfit <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"leanfit: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return _run(name, rest)
    except KeyboardInterrupt:  # Ctrl-C while the command starts up (imports) or outside its own handling
        print(f"leanfit {name}: error: interrupted", file=sys.stderr)
        return 130


def _run(name: str, rest: list) -> int:
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"leanfit: command {name!r} is not available in this install", file=sys.stderr)
        return 2
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
