# B batch, T time (window), E embedding, H hidden, V vocab, L layers
"""The model: embedding -> `lstm_core.LSTM` (layers, dropout between them) -> dropout -> head, its loss through
`linear_cross_entropy` (no (B*T, V) logits in the training step), and its files (safetensors + JSON).

`backend`: "reference" (lstm_core's plain-op LSTM), "triton" (the fused kernel; CUDA or TRITON_INTERPRET=1), or
"torch" (`torch.nn.LSTM`, cuDNN on CUDA: the comparison of the tests and the benchmark).
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ...kernels import linear_cross_entropy
from ...lstm_core import LSTM

__all__ = ["BACKENDS", "ModelShape", "CharLM", "resolve_backend", "load_model"]

BACKENDS = ("auto", "reference", "triton", "torch")
WEIGHTS, CONFIG = "model.safetensors", "config.json"


@dataclass
class ModelShape:
    vocab_size: int
    embed: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" is triton on CUDA and reference elsewhere; ValueError for triton without CUDA or the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--backend triton needs CUDA (or TRITON_INTERPRET=1 for the Triton interpreter); the "
                         f"device is {device} (expected --backend reference or auto)")
    return backend


def _lstm(shape: ModelShape, backend: str) -> nn.Module:
    args = (shape.embed, shape.hidden, shape.layers)
    if backend == "torch":
        return nn.LSTM(*args, dropout=shape.dropout)
    return LSTM(*args, dropout=shape.dropout, backend=backend)


class CharLM(nn.Module):
    """Character LM; `forward(x, state)` gives the last layer's outputs and the final state."""

    def __init__(self, shape: ModelShape, backend: str = "reference"):
        super().__init__()
        self.shape, self.backend = shape, backend
        self.embed = nn.Embedding(shape.vocab_size, shape.embed)
        self.lstm = _lstm(shape, backend)
        self.drop = nn.Dropout(shape.dropout)
        self.head = nn.Linear(shape.hidden, shape.vocab_size)

    @property
    def loss_impl(self) -> str:
        return "triton" if self.backend == "triton" else "chunked"

    def forward(
        self,
        x: torch.Tensor,  # (B, T) ids
        state: tuple[torch.Tensor, torch.Tensor] | None = None,  # (L, B, H) each
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:  # (T, B, H), ((L, B, H), (L, B, H))
        out, state = self.lstm(self.embed(x.t()), state)
        return self.drop(out), state

    def loss(
        self,
        x: torch.Tensor,  # (B, T) ids
        y: torch.Tensor,  # (B, T) next ids
        state: tuple[torch.Tensor, torch.Tensor] | None = None,  # (L, B, H) each
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The mean cross-entropy (nats) of the window, and the state at its end."""
        h, state = self(x, state)
        w, b = self.head.weight.to(h.dtype), self.head.bias.to(h.dtype)
        return linear_cross_entropy(h, w, y.t(), bias=b, impl=self.loss_impl), state

    def logits(self, x, state=None):  # x: (B, T) -> (T, B, V)
        h, state = self(x, state)
        return F.linear(h.float(), self.head.weight.float(), self.head.bias.float()), state

    def save_pretrained(self, folder, safe_serialization=True):
        """model.safetensors and config.json in `folder` (the checkpoint unit calls it, as for an HF model)."""
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(Path(folder, WEIGHTS)))
        Path(folder, CONFIG).write_text(json.dumps({"shape": asdict(self.shape), "backend": self.backend}),
                                        encoding="utf-8")


def load_model(folder, backend: str | None = None, device="cpu") -> CharLM:
    """The model a unit (or any folder `save_pretrained` wrote) holds; `backend` overrides the saved one."""
    config = json.loads(Path(folder, CONFIG).read_text(encoding="utf-8"))
    model = CharLM(ModelShape(**config["shape"]), backend or config["backend"])
    model.load_state_dict(load_file(str(Path(folder, WEIGHTS))))
    return model.to(device)
