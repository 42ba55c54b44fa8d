"""Optimizer step in the backward: each parameter is stepped as soon as its gradient is complete, then freed.

As torchtune does (`torchtune.training.register_optim_in_bwd_hooks`), every parameter gets its own optimizer
and a post-accumulate-grad hook that steps it and sets its `.grad` to None, so at most a few gradients are
alive at once instead of all of them. It cannot accumulate gradients over micro-batches (each backward steps
the weights) nor clip by the global norm (no moment sees all gradients), so both are refused.
"""

__all__ = ["OptimizerInBackward", "check_optimizer_in_backward"]


def check_optimizer_in_backward(grad_accum_steps=1, clip_grad_norm=None, grad_scaler=False):
    """Raises ValueError when optimizer-in-backward is combined with gradient accumulation, clipping or a
    gradient scaler (fp16: unscaling and the inf check need every gradient at once)."""
    if grad_scaler:
        raise ValueError(
            "optimizer in backward: expected no gradient scaler (use --dtype bf16 or fp32), given fp16 with a scaler"
        )
    if grad_accum_steps != 1:
        raise ValueError(
            f"optimizer in backward: expected gradient accumulation steps 1, given {grad_accum_steps} "
            "(each backward steps the weights, so gradients cannot accumulate)"
        )
    if clip_grad_norm:
        raise ValueError(
            f"optimizer in backward: expected no gradient clipping, given clip_grad_norm={clip_grad_norm} "
            "(the global gradient norm is never available at once)"
        )


class OptimizerInBackward:
    """Per-parameter optimizers stepped from post-accumulate-grad hooks.

    Args:
        model: the module whose trainable parameters are stepped.
        make_optimizer: builds an optimizer from a list of parameters, e.g.
            `lambda ps: torch.optim.AdamW(ps, lr=1e-4)`.

    Example:
        >>> opt = OptimizerInBackward(model, lambda ps: torch.optim.AdamW(ps, lr=1e-4))
        >>> loss_fn(model, batch).backward()  # the weights are updated here
        >>> opt.step(); opt.zero_grad()       # no-ops, so a normal loop runs unchanged
    """

    def __init__(self, model, make_optimizer):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizers = [make_optimizer([p]) for p in self.params]
        self._by_param = dict(zip(map(id, self.params), self.optimizers))
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _hook(self, param):
        opt = self._by_param[id(param)]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(self, closure=None):
        """No-op: the parameters were stepped during the backward."""

    def zero_grad(self, set_to_none=True):
        """No-op: each gradient was freed right after its step."""

    def step_all(self):
        """Steps every parameter that holds a gradient (e.g. to create the optimizer state up front)."""
        for p, opt in zip(self.params, self.optimizers):
            if p.grad is not None:
                opt.step()

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr(self, lr):
        for g in self.param_groups:
            g["lr"] = lr

    def state_dict(self):
        return {"per_param": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        per_param = state["per_param"]
        if len(per_param) != len(self.optimizers):
            raise ValueError(
                f"optimizer in backward: expected state for {len(self.optimizers)} parameters, given {len(per_param)}"
            )
        for opt, s in zip(self.optimizers, per_param):
            opt.load_state_dict(s)

    def remove(self):
        """Removes the hooks; the parameters then need a normal optimizer."""
        for h in self._handles:
            h.remove()
        self._handles = []

