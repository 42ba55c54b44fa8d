# N blocks, B batch, T block size, V vocab
"""What `leanfit evaluate` measures: perplexity on the held-out split, the "a"/"an" probe, and prompt studies.

- Perplexity is `exp(total next-token NLL / number of target tokens)` over the validation blocks, which are
  the ones `finetune` holds out for the same corpus, tokenizer, `--block-size` and `--val-fraction`
  (`train.data.make_blocks` then `split_blocks`).
- The probe (rule and metrics: `train.probe`) runs on the built-in contexts and on contexts found in the
  validation blocks.
- A prompt study generates samples as `generate` does (fixed seed) and reports, per prompt: distinct-1 and
  distinct-2 of the continuations, their mean per-token log-likelihood under the model, and, when the
  prompts file gives a theme list, the share of samples that use one of its words.

Prompts file: one prompt per line, blank lines skipped. A line may end with ` || word, word, ...`, the
prompt's theme list; e.g. `Jonathan stood at the castle door || count, castle, wolves`.

`evaluate_model` returns a JSON-ready dict (`finetune` writes it as eval_before.json / eval_after.json):
    {"schema": "leanfit.evaluate/1", "model": str, "seconds": float,
     "perplexity": float | None, "val_loss": float | None, "val_tokens": int, "val_blocks": int,
     "probe": {"builtin": PROBE | None, "heldout": PROBE | None, ["skipped": why, when the tokenizer cannot
               take the probe]},
     "prompts": [{"prompt", "themes", "samples", "distinct_1", "distinct_2", "mean_logprob",
                  "theme_share"}, ...]}
    PROBE = {"n", "accuracy", "balanced_accuracy",
             "a": {"n", "accuracy", "mean_mass_correct", "mean_share_correct"}, "an": {...}}
"""

import contextlib
import json
import math
import re
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpointing.atomic import atomic_write_json
from .generate import DEFAULT_PROMPTS, generate_texts
from .generate import read_prompt_entries as read_prompts
from .probe import article_probe, article_token_classes, builtin_contexts, heldout_contexts, probe_unsupported
from .report import write_report

__all__ = [
    "perplexity",
    "block_nll",
    "article_probe",
    "article_token_classes",
    "distinct_n",
    "read_prompts",
    "samples_logprob",
    "prompt_study",
    "evaluate_model",
]

SCHEMA = "leanfit.evaluate/1"


@torch.no_grad()
def block_nll(model, blocks, batch_size=8):  # blocks: (N, T)
    """Returns (sum of next-token NLL in fp32, number of target tokens) over `blocks`."""
    if blocks.dim() != 2 or blocks.shape[1] < 2 or blocks.shape[0] < 1:
        raise ValueError(f"expected blocks of shape (N >= 1, T >= 2), got {tuple(blocks.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += nll.double().cpu()
    model.train(was_training)
    return total.item(), blocks.shape[0] * (blocks.shape[1] - 1)


def perplexity(model, val_blocks, batch_size=8):  # val_blocks: (N, T)
    """Perplexity of `model` on token blocks: exp of the mean next-token NLL over all target tokens.

    Args:
        model: a causal LM returning `.logits`.
        val_blocks: (N, T) token ids; inputs are `[:, :-1]`, targets `[:, 1:]`.
        batch_size: blocks per forward pass.

    Returns:
        the perplexity, a float.

    Example:
        >>> perplexity(model, split_blocks(make_blocks(text, tokenizer, 128), 0.05)[1])
        23.4
    """
    total, count = block_nll(model, val_blocks, batch_size)
    return math.exp(total / count)


def distinct_n(texts, n):
    """Distinct-n: unique word n-grams over all n-grams in `texts` (words split on whitespace, lower-cased).

    Args:
        texts: strings; n-grams do not cross from one text to the next.
        n: n-gram length, >= 1.

    Returns:
        a float in [0, 1]; 0.0 when no text has n words.

    Example:
        >>> distinct_n(["the cat", "the dog"], 1)
        0.75
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    grams = []
    for text in texts:
        words = text.lower().split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _continuation(prompt, text):
    return text[len(prompt) :] if text.startswith(prompt) else text


@torch.no_grad()
def samples_logprob(model, tokenizer, prompt, continuations):
    """Mean per-token log-likelihood of `continuations` after `prompt` (token-weighted over all of them).

    The prompt is tokenized as `generate` tokenizes it, each continuation on its own; all are scored in one
    right-padded batch. Returns None when no continuation has a token.
    """
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt)["input_ids"]
    conts = [c for c in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in continuations) if c]
    if not conts:
        return None
    width = len(prompt_ids) + max(len(c) for c in conts)
    ids = torch.zeros(len(conts), width, dtype=torch.long)
    mask = torch.zeros(len(conts), width - 1, dtype=torch.bool)  # (B, T-1): which targets to score
    for row, c in enumerate(conts):
        ids[row, : len(prompt_ids) + len(c)] = torch.tensor(prompt_ids + c)
        mask[row, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(c)] = True
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids.to(device)).logits[:, :-1].float()  # (B, T-1, V)
    model.train(was_training)
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
    return (logp[mask].sum() / mask.sum()).item()


def _theme_share(continuations, themes):
    if not themes:
        return None
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in themes) + r")\b", re.I)
    return sum(bool(pattern.search(c)) for c in continuations) / len(continuations)


def prompt_study(model, tokenizer, prompts, max_length=30, num_return_sequences=10, seed=0, outputs=None,
                 **sampling):
    """Generates samples for each prompt (as `generate` does) and scores them.

    Args:
        prompts: strings, or dicts {"prompt": str, "themes": [str]} as `read_prompts` returns.
        max_length, num_return_sequences, seed, sampling: passed to `train.generate.generate_texts`
            (sampling: temperature, top_k, top_p).
        outputs: samples already generated that way (one list of {"generated_text"} per prompt), to score
            without generating again.

    Returns:
        [{"prompt", "themes", "samples", "distinct_1", "distinct_2", "mean_logprob", "theme_share"}, ...]

    Example:
        >>> prompt_study(model, tokenizer, ["You are a", "You are an"], num_return_sequences=5)[0]["distinct_2"]
        0.91
    """
    items = [p if isinstance(p, dict) else {"prompt": p, "themes": []} for p in prompts]
    if not items:
        raise ValueError("expected at least one prompt, got none")
    if outputs is None:
        outputs = generate_texts(
            model, tokenizer, [p["prompt"] for p in items], max_length=max_length,
            num_return_sequences=num_return_sequences, seed=seed, **sampling,
        )
    if len(outputs) != len(items):
        raise ValueError(f"expected one list of samples per prompt ({len(items)}), got {len(outputs)}")
    study = []
    for item, out in zip(items, outputs):
        samples = [o["generated_text"] for o in out]
        conts = [_continuation(item["prompt"], s) for s in samples]
        study.append({
            "prompt": item["prompt"],
            "themes": list(item.get("themes", [])),
            "samples": samples,
            "distinct_1": distinct_n(conts, 1),
            "distinct_2": distinct_n(conts, 2),
            "mean_logprob": samples_logprob(model, tokenizer, item["prompt"], conts),
            "theme_share": _theme_share(conts, item.get("themes")),
        })
    return study


def evaluate_model(model, tokenizer, val_blocks=None, prompts=None, *, batch_size=8, heldout_per_article=100,
                   max_length=30, num_return_sequences=10, seed=0, label="model", autocast_dtype=None,
                   compute_perplexity=True, outputs=None):
    """Perplexity, the a/an probe (built-in and held-out contexts) and prompt studies, as one JSON-ready dict.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        val_blocks: (N, T) validation token ids, or None to skip perplexity and held-out contexts.
        prompts: None, or what `prompt_study` takes.
        batch_size: blocks (or probe contexts) per forward pass.
        heldout_per_article: at most this many held-out contexts per article.
        max_length, num_return_sequences, seed: the prompt study's generation settings.
        label: the model's name in the result.
        autocast_dtype: None (no autocast), torch.bfloat16 or torch.float16.
        compute_perplexity: False leaves perplexity to the caller (finetune has it from its own evaluation)
            and uses `val_blocks` for the held-out probe contexts only.
        outputs: samples of `prompts` already generated with these settings (see `prompt_study`).

    Returns:
        the dict described in the module doc.

    Example:
        >>> result = evaluate_model(model, tokenizer, val_blocks, read_prompts("prompts.txt"))
        >>> result["perplexity"], result["probe"]["builtin"]["balanced_accuracy"]
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    cast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
            else contextlib.nullcontext())
    result = {"schema": SCHEMA, "model": str(label), "perplexity": None, "val_loss": None, "val_tokens": 0,
              "val_blocks": 0, "probe": {"builtin": None, "heldout": None}, "prompts": []}
    with cast:
        if val_blocks is not None and compute_perplexity:
            total, count = block_nll(model, val_blocks, batch_size)
            result.update(perplexity=math.exp(total / count), val_loss=total / count, val_tokens=count,
                          val_blocks=int(val_blocks.shape[0]))
        skipped = probe_unsupported(tokenizer)
        if skipped:
            warnings.warn(f"the a/an probe is skipped: {skipped}", stacklevel=2)
            result["probe"]["skipped"] = skipped
        else:
            result["probe"]["builtin"] = article_probe(model, tokenizer, builtin_contexts(), batch_size=batch_size)
        if val_blocks is not None and heldout_per_article and not skipped:
            found = heldout_contexts(val_blocks, tokenizer, max_per_article=heldout_per_article)
            if found:
                result["probe"]["heldout"] = article_probe(model, tokenizer, found, batch_size=batch_size)
        if prompts:
            result["prompts"] = prompt_study(model, tokenizer, prompts, max_length=max_length,
                                             num_return_sequences=num_return_sequences, seed=seed,
                                             outputs=outputs)
    result["seconds"] = time.perf_counter() - start
    return result


def _finetune_eval(ctx, record, heldout_per_article, study):
    c = ctx.config
    prompts = read_prompts(c.prompts or DEFAULT_PROMPTS) if study else None
    done = ctx.samples if record is not None else None
    outputs = [d["samples"] for d in done] if study and done and [d["prompt"] for d in done] == [
        p["prompt"] for p in prompts] else None
    result = evaluate_model(ctx.model, ctx.tokenizer, ctx.val_blocks, prompts,
                            batch_size=max(8, c.batch_size), heldout_per_article=heldout_per_article,
                            max_length=c.max_length, num_return_sequences=c.num_return_sequences, seed=c.seed,
                            label=f"{c.model} after {ctx.step} steps", compute_perplexity=False, outputs=outputs)
    if record is not None:
        result.update(perplexity=record["val_ppl"], val_loss=record["val_loss"], step=record["step"],
                      val_blocks=int(ctx.val_blocks.shape[0]),
                      val_tokens=int(ctx.val_blocks.shape[0] * (ctx.val_blocks.shape[1] - 1)))
    return result


def finetune_eval_before(ctx, heldout_per_article=50, study=True):
    """`finetune` on_setup hook: writes eval_before.json (probe and prompt study of the model before training).

    Perplexity is filled in by `finetune_eval_after` from finetune's own step-0 evaluation. A resumed run
    (step > 0) keeps the eval_before.json it has, if any. `study=False` skips the prompt study (generation
    is the slow part on a CPU: about 30 s per prompt for 5 samples of SmolLM2-135M on 2 cores).
    """
    path = Path(ctx.out) / "eval_before.json"
    if ctx.step == 0:
        result = _finetune_eval(ctx, None, heldout_per_article, study)
        result["model"] = f"{ctx.config.model} before training"
        atomic_write_json(path, result)


def finetune_eval_after(ctx, heldout_per_article=50, study=True):
    """`finetune` writer: writes eval_after.json, the perplexities of both files from finetune's evaluations
    (first and last), then report.md and report.html. The prompt study scores the samples `write_samples`
    generated (ctx.samples) when it ran first with the same prompts, instead of generating them again."""
    out = Path(ctx.out)
    evals = ctx.evals()
    after = _finetune_eval(ctx, evals[-1] if evals else None, heldout_per_article, study)
    before_path = out / "eval_before.json"
    if before_path.is_file() and evals:
        before = json.loads(before_path.read_text(encoding="utf-8"))
        first = evals[0]
        before.update(perplexity=first["val_ppl"], val_loss=first["val_loss"], step=first["step"],
                      val_blocks=after["val_blocks"], val_tokens=after["val_tokens"])
        atomic_write_json(before_path, before)
    atomic_write_json(out / "eval_after.json", after)
    write_report(out)
