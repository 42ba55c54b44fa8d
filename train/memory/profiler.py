"""Runtime memory profiling of a training loop, per phase and per step, with a breakdown at the peak.

On the CPU (and `meta`), `TensorCounter`, a dispatch mode, follows every tensor storage from its creation to its
release and files its bytes under parameters, gradients, optimizer_state, activations (created inside a module's
forward), loss_buffers (created in the forward outside the model's modules, e.g. logits and the loss), or
temporaries (created in the backward or the optimizer step). Its running sums are copied whenever the total
reaches a new peak, so the breakdown at the peak adds up to the peak. The process peak RSS comes from
`resource.getrusage`.

On CUDA, the allocator's peaks come from `torch.cuda.memory_stats` (allocated, reserved, active; reset at each
phase) and the driver's view from `torch.cuda.mem_get_info`; parameters, gradients and optimizer state are
summed from the tensors, and the rest of the peak is filed as activations_and_temporaries. `snapshot=True`
records the allocator history and dumps it for https://pytorch.org/memory_viz.

Use (see `MemoryProfiler`):
    prof = MemoryProfiler(model, optimizer, out_dir="runs/x")
    for step in range(n):
        with prof.step(step):
            with prof.phase("forward"): loss = loss_fn(model, batch)
            with prof.phase("backward"): loss.backward()
            with prof.phase("optimizer_step"): opt.step(); opt.zero_grad()
    prof.close(); print(prof.table())
"""

import contextlib
import os
import resource
import sys

import torch

from ..checkpointing.atomic import atomic_path, atomic_write_json
from ..devices import indexed_device
from ..units import CUDA_CONTEXT_BYTES, format_bytes
from .tensor_counter import TensorCounter, local_shard

CUDA_KINDS = ("parameters", "gradients", "optimizer_state", "activations_and_temporaries")
PHASES = ("weights_loaded", "forward", "backward", "optimizer_step")


def rss_peak_bytes() -> int:
    """The process's peak resident set size (`ru_maxrss`, in KiB on Linux and bytes on macOS), in bytes."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _tensor_bytes(tensors):
    seen, n = set(), 0
    for t in map(local_shard, tensors):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                n += st.nbytes()
    return n


def _opt_tensors(optimizer):
    if optimizer is None:
        return []
    optimizers = getattr(optimizer, "optimizers", [optimizer])
    return [v for opt in optimizers for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


class MemoryProfiler:
    """Records memory per phase and per step of a training loop, and writes the report.

    Args:
        model: the model being trained (its parameters are "parameters").
        optimizer: its optimizer (or an `OptimizerInBackward`).
        device: where training runs; default: the device of the model's first parameter.
        out_dir: where `save()` writes memory_report.json, memory.png (and the snapshot); None: nowhere.
        snapshot: on CUDA, record the allocator history and dump it (memory_snapshot.pickle) on save.
        track_tensors: on the CPU, follow every tensor with `TensorCounter` (slower; needed for a breakdown).
        module_depth: modules up to this many dots deep are listed at the peak.
    """

    def __init__(self, model, optimizer=None, device=None, out_dir=None, snapshot=False, track_tensors=True,
                 module_depth=3):
        self.model, self.optimizer, self.out_dir = model, optimizer, out_dir
        self.device = indexed_device(device if device is not None else next(model.parameters()).device)
        self.cuda = self.device.type == "cuda"
        self.snapshot = snapshot and self.cuda
        self.steps, self.phase_peaks, self._current = [], {}, None
        self.peak = {"bytes": 0, "step": None, "phase": None, "breakdown": {}, "top_modules": []}
        self.counter = None
        self.extra = {}  # more top-level entries of the report (e.g. every rank's peak, train/recipe/distributed.py)
        self._module_handles, self._module_stack, self._module_peaks = [], [], {}
        if self.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        if self.cuda:
            self._install_cuda_module_hooks(module_depth)
        elif track_tensors:
            self.counter = TensorCounter()
            self.counter.install_module_hooks(model, module_depth)
            self.counter.claim(list(model.parameters()) + list(model.buffers()), "parameters")
            self._grad_handles = [p.register_post_accumulate_grad_hook(self._claim_grad)
                                  for p in model.parameters() if p.requires_grad]
            self._claim_optimizer_state()
            self.counter.__enter__()
        self._record_phase("weights_loaded", self._mark())

    def _claim_grad(self, p):
        if p.grad is not None and self.counter is not None:
            self.counter.claim(p.grad, "gradients")

    def _install_cuda_module_hooks(self, depth):
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        for name, m in self.model.named_modules():
            if not name or name.count(".") >= depth or m is head:
                continue

            def pre(mod, args, name=name):
                self._module_stack.append((name, torch.cuda.memory_allocated(self.device)))

            def post(mod, args, out):
                if self._module_stack:
                    name, before = self._module_stack.pop()
                    if torch.is_grad_enabled():
                        kept = torch.cuda.memory_allocated(self.device) - before
                        self._module_peaks[name] = max(self._module_peaks.get(name, 0), kept)

            self._module_handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def _mark(self):
        """Resets the peak counters; returns nothing useful, for symmetry with `_read`."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.counter is not None:
            self.counter.reset_peak()
        return self._read()

    def _read(self):
        r = {"rss_peak_bytes": rss_peak_bytes()}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            s = torch.cuda.memory_stats(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            r.update(peak_bytes=s.get("allocated_bytes.all.peak", 0),
                     allocated_peak_bytes=s.get("allocated_bytes.all.peak", 0),
                     reserved_peak_bytes=s.get("reserved_bytes.all.peak", 0),
                     active_peak_bytes=s.get("active_bytes.all.peak", 0),
                     allocated_bytes=s.get("allocated_bytes.all.current", 0),
                     driver_used_bytes=total - free, device_total_bytes=total)
        elif self.counter is not None:
            r.update(peak_bytes=self.counter.peak, tracked_bytes=self.counter.total)
        else:
            r.update(peak_bytes=r["rss_peak_bytes"])
        return r

    def _breakdown_now(self, peak_bytes):
        if self.counter is not None:
            return dict(self.counter.peak_kinds), sorted(self.counter.peak_modules.items(), key=lambda kv: -kv[1])
        params = _tensor_bytes(list(self.model.parameters()) + list(self.model.buffers()))
        grads = _tensor_bytes([p.grad for p in self.model.parameters() if p.grad is not None])
        opt = _tensor_bytes(_opt_tensors(self.optimizer))
        rest = max(peak_bytes - params - grads - opt, 0)
        parts = {"parameters": params, "gradients": grads, "optimizer_state": opt, "activations_and_temporaries": rest}
        scale = peak_bytes / max(sum(parts.values()), 1)
        if scale < 1:
            parts = {k: int(v * scale) for k, v in parts.items()}
            parts["activations_and_temporaries"] += peak_bytes - sum(parts.values())
        return parts, sorted(self._module_peaks.items(), key=lambda kv: -kv[1])

    def _record_phase(self, name, reading, step=None):
        prev = self.phase_peaks.get(name)
        if prev is None or reading["peak_bytes"] > prev["peak_bytes"]:
            self.phase_peaks[name] = reading
        if self.peak["phase"] is None or reading["peak_bytes"] > self.peak["bytes"]:
            parts, modules = self._breakdown_now(reading["peak_bytes"])
            self.peak = {"bytes": sum(parts.values()), "step": step, "phase": name, "breakdown": parts,
                         "top_modules": [[n, b] for n, b in modules[:8] if b > 0]}

    @contextlib.contextmanager
    def phase(self, name):
        """Marks a phase (`forward`, `backward`, `optimizer_step`) of the current step."""
        if self.counter is not None:
            self._claim_optimizer_state()
        self._mark()
        if self.counter is not None:
            self.counter.phase = name
        try:
            yield
        except BaseException:
            self.failed_at = {"step": None if self._current is None else self._current["step"], "phase": name}
            raise
        finally:
            reading = self._read()
            if self.counter is not None:
                self.counter.phase = "between"
                self._claim_optimizer_state()
            if self._current is not None:
                phases = self._current["phases"]
                phases[name] = max(phases.get(name, 0), reading["peak_bytes"])
            self._record_phase(name, reading, None if self._current is None else self._current["step"])

    def _claim_optimizer_state(self):
        if self.optimizer is not None:
            self.counter.claim(_opt_tensors(self.optimizer), "optimizer_state")

    @contextlib.contextmanager
    def step(self, index):
        """Marks one training step; its phases are recorded under `index`."""
        self._current = {"step": index, "phases": {}}
        try:
            yield
        except BaseException:
            self._current["failed"] = True
            raise
        finally:
            r = self._read()
            self._current.update(peak_bytes=max(self._current["phases"].values(), default=0),
                                 rss_peak_bytes=r["rss_peak_bytes"])
            if self.cuda:
                self._current.update(reserved_peak_bytes=r["reserved_peak_bytes"],
                                     driver_used_bytes=r["driver_used_bytes"])
            self.steps.append(self._current)
            self._current = None

    def close(self):
        """Stops following tensors and removes the hooks (the report stays)."""
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counter.remove_hooks()
            for h in self._grad_handles:
                h.remove()
            self.counter = None
        for h in self._module_handles:
            h.remove()
        self._module_handles = []

    def on_oom(self, error, out_dir=None):
        """Call from `except torch.OutOfMemoryError` around the step: records where it failed and writes the
        report (and the snapshot, if recording). Returns the paths written."""
        where = getattr(self, "failed_at", {"step": None, "phase": None})
        self.oom = {"error": str(error).splitlines()[0] if str(error) else type(error).__name__, **where,
                    "reading": self._read()}
        return self.save(out_dir)

    def stop_snapshot(self):
        if self.snapshot:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshot = False

    def report(self):
        """The report as a dict: `peak` (bytes, step, phase, breakdown adding up to bytes, top_modules),
        `phases` (the largest reading of each phase), `steps`, and the device."""
        return {"device": str(self.device), "peak": self.peak, "phases": self.phase_peaks, "steps": self.steps,
                "rss_peak_bytes": rss_peak_bytes(), "oom": getattr(self, "oom", None), **self.extra}

    def table(self):
        p = self.peak
        lines = [f"memory on {self.device}: peak {format_bytes(p['bytes'])} at step {p['step']}, phase {p['phase']}"]
        for k, v in p["breakdown"].items():
            lines.append(f"  {k:<28}{format_bytes(v):>12}  {100 * v / max(p['bytes'], 1):5.1f}%")
        for name, r in self.phase_peaks.items():
            extra = f"  reserved {format_bytes(r['reserved_peak_bytes'])}" if "reserved_peak_bytes" in r else ""
            lines.append(f"  peak in {name:<19}{format_bytes(r['peak_bytes']):>12}{extra}")
        lines.append(f"  process peak RSS            {format_bytes(rss_peak_bytes()):>12}")
        if p["top_modules"]:
            top = ", ".join(f"{n} {format_bytes(b)}" for n, b in p["top_modules"][:5])
            lines.append(f"  top modules at the peak: {top}")
        return "\n".join(lines)

    def save(self, out_dir=None):
        """Writes memory_report.json, memory.png and (with snapshot) memory_snapshot.pickle; returns their paths."""
        out_dir = out_dir or self.out_dir
        if out_dir is None:
            return {}
        paths = {"report": os.path.join(out_dir, "memory_report.json"), "plot": os.path.join(out_dir, "memory.png")}
        if self.snapshot:
            paths["snapshot"] = os.path.join(out_dir, "memory_snapshot.pickle")
            with atomic_path(paths["snapshot"]) as tmp:
                torch.cuda.memory._dump_snapshot(str(tmp))
        report = self.report()
        report["files"] = paths

        with atomic_path(paths["plot"]) as tmp:
            plot_report(report, tmp)
        atomic_write_json(paths["report"], report)
        return paths


def plot_report(report, path):
    """memory.png: the peak of each phase over steps (left) and the breakdown at the peak (right)."""
    import matplotlib  # deferred: matplotlib takes a second to import and only the outputs need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = report["steps"]
    names = [*PHASES[1:], *sorted({n for s in steps for n in s["phases"]} - set(PHASES))]
    for name in names:
        xs = [s["step"] for s in steps if name in s["phases"]]
        left.plot(xs, [s["phases"][name] / 2**30 for s in steps if name in s["phases"]], marker=".", label=name)
    left.set_xlabel("step")
    left.set_ylabel("peak GiB")
    left.set_title("peak memory per phase")
    if steps:
        left.legend()
    parts = report["peak"]["breakdown"]
    right.barh(list(parts), [v / 2**30 for v in parts.values()])
    right.set_xlabel("GiB")
    right.set_title(f"at the peak ({report['peak']['phase']}, step {report['peak']['step']})")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def apply_memory_cap(budget_bytes, device, context_bytes=None):
    """Caps the caching allocator so that a run on a larger card behaves like one on a `budget_bytes` card.

    The allocator gets `budget_bytes - context_bytes` (the CUDA context lives outside it; default
    `units.CUDA_CONTEXT_BYTES`), via `torch.cuda.set_per_process_memory_fraction`. Returns the fraction
    set, or None when the card is not larger than the budget (nothing to cap) or the device is not CUDA.
    """
    device = indexed_device(device)
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    allowed = budget_bytes - (CUDA_CONTEXT_BYTES if context_bytes is None else context_bytes)
    if allowed <= 0:
        raise ValueError(f"memory budget: expected more than the CUDA context, given {budget_bytes} bytes")
    if budget_bytes >= total:
        return None
    fraction = allowed / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
