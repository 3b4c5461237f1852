"""Adam for training on the CPU with one kernel call per step (``utils.trainer.build_optimizer``).

PyTorch's fused Adam calls its kernel once per parameter tensor, each call a parallel region of
its own, and increments one step counter per tensor: on the quick-start hourglass (252 tensors,
561,696 values) that is 3.8 ms of a 125 ms training step, where one call over the same values in
one buffer takes 0.2 ms. ``FlatAdam`` keeps the parameters of a group as views of one float32
buffer (and their moments as views of two more), gathers their gradients into a fourth with one
call and steps the buffers with one call of the same kernel.

The numbers are bit for bit ``torch.optim.Adam(fused=True)``'s: the kernel works through each
tensor in units of 16 values, vectorised, and only a tensor's last partial unit takes the scalar
path, whose rounding differs; so only parameters whose sizes are multiples of 16 join the buffer
(every one of the hourglass family's with 16 joints), the others step as PyTorch steps them.
``state_dict`` and ``load_state_dict`` are torch's (a step count, ``exp_avg`` and ``exp_avg_sq``
per parameter): checkpoints move between the two either way.

The buffers are built at the first step (and again after ``load_state_dict``, or when the set of
parameters with gradients changes, or when a parameter's tensor was replaced, e.g. by
``model.to()``): the parameters' values are copied in and each ``param.data`` becomes its view.
"""
import torch

UNIT = 16   # values per unit of PyTorch's CPU Adam kernel


def _copy_all(dst, src):
    """``dst[i].copy_(src[i])`` for every i: where the C++ kernels are loaded (models.fused) one
    call of theirs, a memcpy per tensor in one parallel region (0.1 ms for the quick start's 252
    gradients, where ``torch._foreach_copy_`` copies them one call at a time, 0.4 ms)."""
    from models import fused
    if fused.loaded():
        torch.ops.posefast.flat_copy(src, dst)
    else:
        torch._foreach_copy_(dst, src)


def _dense(t):
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _same(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class _Buffer:
    """One group's parameters, gradients and moments as views of four flat buffers."""

    def __init__(self, params, state):
        n = sum(p.numel() for p in params)
        self.params = list(params)
        self.values, self.grads = torch.empty(n), torch.empty(n)
        self.exp_avg, self.exp_avg_sq = torch.zeros(n), torch.zeros(n)
        first = state.get(params[0])
        self.step = first['step'].clone() if first else torch.zeros((), dtype=torch.float32)
        self.grad_views = []
        offset = 0
        for p in self.params:
            def view(buf):
                return buf.as_strided(p.shape, p.stride(), offset)
            values = view(self.values)
            values.copy_(p.detach())
            p.data = values
            moments = view(self.exp_avg), view(self.exp_avg_sq)
            old = state.get(p)
            if old:
                moments[0].copy_(old['exp_avg'])
                moments[1].copy_(old['exp_avg_sq'])
            state[p] = {'step': self.step, 'exp_avg': moments[0], 'exp_avg_sq': moments[1]}
            self.grad_views.append(view(self.grads))
            offset += p.numel()

    def release(self, state):
        """Each parameter its own step count again (the moments stay views: they are disjoint)."""
        for p in self.params:
            if p in state and state[p].get('step') is self.step:
                state[p]['step'] = self.step.clone()


class FlatAdam(torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` with one kernel call per parameter group and step, on the
    CPU (module docstring). Only float32 CPU parameters; no amsgrad, maximize or capturable."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self._buffers, self._plans = {}, {}   # per group index

    def _joining(self, params):
        """Those of ``params`` (all with gradients) that can share the group's buffer."""
        return [p for p in params if p.device.type == 'cpu' and p.dtype == torch.float32 and not p.grad.is_sparse
                and p.numel() > 0 and p.numel() % UNIT == 0 and _dense(p)]

    def _plan(self, index, group, with_grad):
        """(buffer or None, the parameters that step one at a time) for the group's parameters
        with gradients; the buffer is rebuilt when they, or their tensors, changed."""
        plan = self._plans.get(index)
        if plan is not None and _same(plan[0], with_grad) and all(
                p.data_ptr() == ptr for p, ptr in zip(with_grad, plan[1])):
            return plan[2], plan[3]
        old = self._buffers.pop(index, None)
        if old is not None:
            old.release(self.state)
        plain = group['amsgrad'] or group['maximize'] or group['capturable'] or group['differentiable'] \
            or getattr(self, 'grad_scale', None) is not None or torch.is_tensor(group['lr'])
        joining = [] if plain else self._joining(with_grad)
        # one step count for the buffer: its parameters must have taken the same steps
        steps = {float(self.state[p]['step']) if self.state.get(p) else 0.0 for p in joining}
        buf = _Buffer(joining, self.state) if joining and len(steps) == 1 else None
        if buf is not None:
            self._buffers[index] = buf
        inside = set(map(id, buf.params)) if buf is not None else set()
        rest = [p for p in with_grad if id(p) not in inside]
        self._plans[index] = (with_grad, [p.data_ptr() for p in with_grad], buf, rest)
        return buf, rest

    def load_state_dict(self, state_dict):
        for buf in self._buffers.values():
            buf.release(self.state)
        self._buffers, self._plans = {}, {}
        super().load_state_dict(state_dict)

    def state_dict(self):
        sd = super().state_dict()
        # one step tensor per parameter, as torch's Adam keeps them (the buffer shares one)
        sd['state'] = {k: dict(v, step=v['step'].clone()) if 'step' in v else dict(v)
                       for k, v in sd['state'].items()}
        return sd

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            buf, rest = self._plan(index, group, [p for p in group['params'] if p.grad is not None])
            if rest:
                self._step_each(group, rest)
            if buf is not None:
                _copy_all(buf.grad_views, [p.grad for p in buf.params])
                beta1, beta2 = group['betas']
                buf.step += 1
                torch._fused_adam_([buf.values], [buf.grads], [buf.exp_avg], [buf.exp_avg_sq], [], [buf.step],
                                   amsgrad=False, lr=group['lr'], beta1=beta1, beta2=beta2,
                                   weight_decay=group['weight_decay'], eps=group['eps'], maximize=False,
                                   grad_scale=None, found_inf=None)
        return loss

    def _step_each(self, group, params):
        """PyTorch's own step of ``params`` (one tensor at a time)."""
        groups, saved = self.param_groups, group['params']
        group['params'], self.param_groups = params, [group]
        try:
            super().step()
        finally:
            group['params'], self.param_groups = saved, groups
