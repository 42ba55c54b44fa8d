"""`TensorCounter`: a dispatch mode that files every live tensor storage under a kind and a module (CPU, `meta`).

Kinds: parameters, gradients, optimizer_state, activations (created inside a module's forward), loss_buffers
(created in the forward outside the model's modules, e.g. logits and the loss), temporaries (created in the
backward or the optimizer step). The running sums are copied at each new peak, so the breakdown at the peak adds
up to the peak. `MemoryProfiler` (profiler.py) drives it.
"""

import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["CPU_KINDS", "TensorCounter", "local_shard"]

CPU_KINDS = ("parameters", "gradients", "optimizer_state", "activations", "loss_buffers", "temporaries")
_PHASE_KIND = {"forward": "activations", "backward": "temporaries", "optimizer_step": "temporaries"}


def local_shard(t):
    """A DTensor's shard on this rank (what this process holds); any other value as it is."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _storages(t):
    t = local_shard(t)
    if not isinstance(t, torch.Tensor) or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return []
    return [t.untyped_storage()]


class TensorCounter(TorchDispatchMode):
    """Counts live tensor storage bytes by kind and by module; keeps the breakdown at the peak.

    Args:
        names: {module: name} for the modules whose forward counts as "activations" (others: "loss_buffers").
    """

    def __init__(self, names=None):
        super().__init__()
        self.names = names or {}
        self.info = WeakIdKeyDictionary()  # storage -> [bytes, kind, module, weakref]
        self.kinds = dict.fromkeys(CPU_KINDS, 0)
        self.modules = {}
        self.total = 0
        self.peak = 0
        self.peak_kinds = dict(self.kinds)
        self.peak_modules = {}
        self.peak_phase = None
        self.phase = "weights_loaded"
        self.stack = []
        self._handles = []

    def _add(self, st, kind, module=None):
        rec = self.info.get(st)
        if rec is not None:
            if rec[1] != kind and kind in ("parameters", "gradients", "optimizer_state"):
                self._move(rec, kind)
            return
        n = st.nbytes()
        rec = [n, kind, module, None]
        rec[3] = weakref.ref(st, lambda _ref, rec=rec: self._free(rec))
        self.info[st] = rec
        self._count(rec, +1)

    def _move(self, rec, kind):
        self._count(rec, -1)
        rec[1], rec[2] = kind, None
        self._count(rec, +1)

    def _count(self, rec, sign):
        n, kind, module = rec[0], rec[1], rec[2]
        self.kinds[kind] += sign * n
        self.total += sign * n
        if module is not None:
            self.modules[module] = self.modules.get(module, 0) + sign * n
        if self.total > self.peak:
            self.peak = self.total
            self.peak_kinds = dict(self.kinds)
            self.peak_modules = dict(self.modules)
            self.peak_phase = self.phase

    def _free(self, rec):
        self._count(rec, -1)

    def claim(self, tensors, kind):
        """Files the storages of `tensors` (any pytree) under `kind`, tracking them if new."""
        for t in tree_flatten(tensors)[0]:
            for st in _storages(t):
                self._add(st, kind)

    def reset_peak(self):
        self.peak = self.total
        self.peak_kinds, self.peak_modules, self.peak_phase = dict(self.kinds), dict(self.modules), self.phase

    def _new_kind(self):
        if self.phase == "forward":
            if self.stack and self.stack[-1] is not None:
                return "activations", self.stack[-1]
            return "loss_buffers", None
        return _PHASE_KIND.get(self.phase, "temporaries"), None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind, module = self._new_kind()
        for t in tree_flatten(out)[0]:
            for st in _storages(t):
                self._add(st, kind, module)
        return out

    def install_module_hooks(self, model, depth):
        """Attributes forward allocations to the modules of `model` up to `depth` dots deep."""
        names = {m: name for name, m in model.named_modules() if name and name.count(".") < depth}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for m, name in names.items():
            label = None if m is head else name
            self._handles.append(m.register_forward_pre_hook(lambda mod, a, label=label: self._enter(label)))
            self._handles.append(m.register_forward_hook(lambda mod, a, o: self._exit()))

    def _enter(self, label):
        self.stack.append(label)

    def _exit(self):
        if self.stack:
            self.stack.pop()

    def remove_hooks(self):
        for h in self._handles:
            h.remove()
        self._handles = []
