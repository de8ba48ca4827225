# %% [markdown]
# # Precision, memory layout and several processes
#
# > Mixed precision (bf16 autocast, or fp16 with a gradient scaler), channels_last, and data parallelism with
# > PyTorch's DistributedDataParallel under `torchrun`: the pieces the trainer switches on for the `paper` profile.

# %%
#| default_exp parallel

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail

# %%
#| export
from __future__ import annotations
import os, contextlib, contextvars
import torch
import torch.nn as nn
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


# %% [markdown]
# ## Processes
#
# `torchrun --nproc_per_node N` starts $N$ copies of a program and tells each its rank $r \in \{0,\dots,N-1\}$
# through the environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`). A process of a multi-process run joins the process
# group (NCCL on GPUs, gloo on the CPU) and, on a GPU machine, uses GPU `LOCAL_RANK`. A plain `python` process is
# rank 0 of 1 and never touches `torch.distributed`. Rank 0 alone writes files (checkpoints, logs, reports);
# `main_first` lets rank 0 build something shared (a data cache) before the others read it.

# %%
#| export
def dist_env() -> tuple:
    "(rank, world size, local rank) from the variables torchrun sets; (0, 1, 0) in a plain process."
    g = lambda k, d: int(os.environ.get(k, d))
    return g('RANK', 0), g('WORLD_SIZE', 1), g('LOCAL_RANK', 0)

def is_dist() -> bool:
    "True inside a process group of more than one process."
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

def get_rank() -> int: return dist.get_rank() if is_dist() else 0
def get_world() -> int: return dist.get_world_size() if is_dist() else 1
def is_main() -> bool: return get_rank() == 0

def init_distributed(device: str = 'cpu') -> str:
    "Join the process group torchrun describes (NCCL on GPUs, gloo on the CPU); returns this process's device."
    r, w, lr = dist_env()
    dev = torch.device(device)
    if w > 1:
        if dev.type == 'cuda': dev = torch.device('cuda', lr); torch.cuda.set_device(dev)
        if not dist.is_initialized(): dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return str(dev)

def barrier():
    "Wait for every process (nothing to wait for in a plain process)."
    if is_dist(): dist.barrier()

@contextlib.contextmanager
def main_first():
    "Rank 0 runs the block first (e.g. builds a cache), the other ranks after it."
    if not is_main(): barrier()
    try: yield
    finally:
        if is_main(): barrier()


# %%
test_eq(dist_env() if 'WORLD_SIZE' not in os.environ else (0, 1, 0), (0, 1, 0)); test_eq(init_distributed('cpu'), 'cpu')
test_eq((is_dist(), get_rank(), get_world(), is_main()), (False, 0, 1, True))


# %% [markdown]
# ## One global batch, sharded
#
# The batch size $B$ of a run is the *global* batch. Every process draws the same seeded permutation; process $r$
# of $N$ keeps a contiguous share of each global batch $(b_1,\dots,b_B)$:
#
# $$\mathcal{B}_r = \left(b_{rB/N+1}, \dots, b_{(r+1)B/N}\right), \qquad \bigcup_r \mathcal{B}_r = \mathcal{B} \tag{P1}$$
#
# so an epoch has the same iterations and sees the same slices with 1 or $N$ processes (augmentations are seeded per
# slice). DistributedDataParallel averages the gradients of the per-process losses $L_r$:
#
# $$g = \frac{1}{N}\sum_{r=0}^{N-1} \nabla_\theta L_r \tag{P2}$$
#
# which equals the gradient of the single-process loss when $L$ is a mean over the batch (BCE, MSE) and $B/N$ is the
# same on every process.

# %%
#| export
def shard(idx: list, # the global batch b_1..b_B
          rank: int, world: int) -> list:
    "Process `rank`'s contiguous share of a global batch (Eq. P1)."
    if len(idx) % world: raise ValueError(f"the global batch ({len(idx)}) must be divisible by the number of processes ({world})")
    b = len(idx)//world
    return list(idx[rank*b:(rank + 1)*b])


# %%
test_eq(shard([5, 1, 4, 2], 1, 2), [4, 2]); test_eq(sum((shard(list(range(6)), r, 3) for r in range(3)), []), list(range(6)))
test_fail(lambda: shard([1, 2, 3], 0, 2), contains='divisible')

# %% [markdown]
# ## Batch statistics over all processes
#
# Two parts of the losses are not means over the batch: the Dice loss (Eq. 8) is a ratio of sums over the whole
# batch, and BatchNorm normalises with the batch's mean and variance. Under several processes both are computed
# from sums $S = \sum_r s_r$ over every process's share (a differentiable all-reduce, the approach nnU-Net takes
# for its batch Dice), so they see the global batch exactly as a single process would:
#
# $$S = \sum_{r=0}^{N-1} s_r, \qquad \frac{\partial L}{\partial s_r} = \sum_{k} \frac{\partial L_k}{\partial S} \tag{P3}$$
#
# `batch_sum` is the identity outside a `global_batch()` block and in a plain process, so single-process numbers are
# unchanged.

# %%
#| export
_GLOBAL_BATCH = contextvars.ContextVar('sapl_global_batch', default=False)

@contextlib.contextmanager
def global_batch(on: bool = True):
    "Inside this block (and under several processes) `batch_sum` adds over all processes."
    tok = _GLOBAL_BATCH.set(bool(on) and is_dist())
    try: yield
    finally: _GLOBAL_BATCH.reset(tok)

class _SumOverProcesses(torch.autograd.Function):
    "All-reduce (sum) whose backward sums the incoming gradients over the processes too (Eq. P3)."
    @staticmethod
    def forward(ctx, s):
        s = s.clone(); dist.all_reduce(s); return s
    @staticmethod
    def backward(ctx, g):
        g = g.clone(); dist.all_reduce(g); return g

def all_reduce_sum(s: torch.Tensor) -> torch.Tensor:
    "Differentiable sum of `s` over the processes of the group (Eq. P3)."
    return _SumOverProcesses.apply(s)

def batch_sum(s: torch.Tensor) -> torch.Tensor:
    "S = sum over processes of s (Eq. P3), differentiable; `s` itself outside `global_batch()`."
    return all_reduce_sum(s) if _GLOBAL_BATCH.get() else s


# %%
with global_batch(): test_eq(batch_sum(torch.tensor([2., 3.])), torch.tensor([2., 3.]))   # one process: identity


# %% [markdown]
# BatchNorm layers of a multi-process run are replaced by synchronised ones: PyTorch's `SyncBatchNorm` on GPUs; it
# does not run on the CPU, so there `GlooSyncBatchNorm` computes the same statistics with Eq. P3 over the $M$
# pixels of all processes:
#
# $$\mu_c = \frac{1}{M}\sum_{r}\sum_{i \in \mathcal{B}_r} x_{ic}, \quad
# \sigma_c^2 = \frac{1}{M}\sum_{r}\sum_{i \in \mathcal{B}_r} (x_{ic} - \mu_c)^2, \quad
# y_{ic} = \gamma_c \frac{x_{ic} - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta_c \tag{P4}$$
#
# The running statistics follow BatchNorm's rule (momentum, unbiased variance), and parameters and buffers are the
# original layer's tensors, so state dicts and checkpoints do not change.

# %%
#| export
class GlooSyncBatchNorm(nn.BatchNorm2d):
    "BatchNorm2d with training statistics over every process's batch (Eq. P4); plain BatchNorm2d in one process."
    def forward(self, x: torch.Tensor) -> torch.Tensor: # x: [b,C,H,W]
        if not (self.training and is_dist()): return super().forward(x)
        xf = x.float()
        M = torch.tensor([float(xf.numel()//xf.shape[1])], device=x.device); dist.all_reduce(M)
        mu = all_reduce_sum(xf.sum((0, 2, 3)))/M
        d = xf - mu[None, :, None, None]
        var = all_reduce_sum((d*d).sum((0, 2, 3)))/M
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1/float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m*mu.detach())
                self.running_var.mul_(1 - m).add_(m*var.detach()*M/(M - 1).clamp_min(1))
        y = d*torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine: y = y*self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)

def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())

def sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    "Every BatchNorm2d of `module` synchronised over the processes, in place (SyncBatchNorm on GPUs, GlooSyncBatchNorm on the CPU)."
    if device_type != 'cpu': return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, c in module.named_children():
        if type(c) is nn.BatchNorm2d:
            s = GlooSyncBatchNorm(c.num_features, c.eps, c.momentum, c.affine, c.track_running_stats)
            if c.affine: s.weight, s.bias = c.weight, c.bias
            if c.track_running_stats: s.running_mean, s.running_var, s.num_batches_tracked = c.running_mean, c.running_var, c.num_batches_tracked
            s.train(c.training); setattr(module, name, s)
        else: sync_batchnorm(c, device_type)
    return module


# %%
_m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)); _w = _m[1].weight
sync_batchnorm(_m, 'cpu'); test_eq(type(_m[1]), GlooSyncBatchNorm); assert _m[1].weight is _w and has_batchnorm(_m)
_x = torch.randn(4, 1, 8, 8); test_close(_m(_x), nn.functional.batch_norm(_m[0](_x), None, None, _w, _m[1].bias, True), eps=1e-5)


# %% [markdown]
# ## Data parallelism
#
# Methods call their networks in many ways (twice per step, encoder and decoder separately, a frozen EMA teacher,
# auxiliary decoders). So the trainer does not wrap each network: it wraps the module holding all of them,
# `StepModule`, whose `forward` *is* one training step. DistributedDataParallel then sees every network call of the
# step and averages the gradients of all trained parameters during `backward` (Eq. P2); parameters a step leaves
# unused and frozen ones (EMA teachers) are allowed.

# %%
#| export
class StepModule(nn.Module):
    "Holds the trained networks; `forward(step, *args)` runs one training step `step(*args)`."
    def __init__(self, models: nn.Module):
        super().__init__(); self.models = models
    def forward(self, step, *args): return step(*args)

def data_parallel(models: nn.Module) -> DistributedDataParallel:
    "DistributedDataParallel over all trained networks; call it as `ddp(step, *args)`."
    return DistributedDataParallel(StepModule(models), device_ids=None, find_unused_parameters=True)


# %%
_s = StepModule(nn.ModuleList([nn.Linear(2, 1)])); test_eq(_s(lambda a, b: a + b, 2, 3), 5)

# %% [markdown]
# ## Mixed precision and memory layout
#
# `amp` selects the precision of the training step and of predictions: `'off'` (fp32), `'bf16'` (autocast to
# bfloat16; no loss scaling needed), `'fp16'` (autocast to float16 with a `GradScaler` that multiplies the loss by a
# running scale $s$ and skips steps with non-finite gradients), or `'auto'`: bf16 (fp16 where the GPU has no bf16)
# on a GPU at the `paper` profile, off otherwise. Losses are computed in fp32 (`sapl.unet` casts logits), and
# checkpoints stay fp32. `channels_last` stores 4-D weights and activations as NHWC, which tensor-core convolutions
# prefer; `None` means on with a GPU at the `paper` profile.

# %%
#| export
AMP_MODES = ('auto', 'off', 'bf16', 'fp16')

def resolve_amp(amp: str, device_type: str, profile: str, bf16_ok: bool|None = None) -> str:
    "The precision a run uses: 'off', 'bf16' or 'fp16' ('auto': bf16/fp16 on a GPU at the paper profile, else off)."
    if amp not in AMP_MODES: raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp != 'auto': return amp
    if device_type != 'cuda' or profile != 'paper': return 'off'
    if bf16_ok is None: bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return 'bf16' if bf16_ok else 'fp16'

def resolve_channels_last(channels_last: bool|None, device_type: str, profile: str) -> bool:
    "channels_last memory layout: as given, or (None) on with a GPU at the paper profile."
    return (device_type == 'cuda' and profile == 'paper') if channels_last is None else bool(channels_last)

def autocast(mode: str, device_type: str):
    "The autocast context of a resolved precision mode (a no-op for 'off')."
    if mode == 'off': return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if mode == 'bf16' else torch.float16)

def grad_scaler(mode: str, device_type: str):
    "A GradScaler for fp16, None otherwise."
    return torch.amp.GradScaler(device_type) if mode == 'fp16' else None


# %%
test_eq([resolve_amp('auto', d, p, True) for d, p in (('cpu', 'paper'), ('cuda', 'quick'), ('cuda', 'paper'))], ['off', 'off', 'bf16'])
test_eq(resolve_amp('auto', 'cuda', 'paper', bf16_ok=False), 'fp16'); test_fail(lambda: resolve_amp('fp8', 'cpu', 'quick'), contains='amp must be')
test_eq((resolve_channels_last(None, 'cpu', 'paper'), resolve_channels_last(None, 'cuda', 'paper'), resolve_channels_last(True, 'cpu', 'smoke')), (False, True, True))
with autocast('bf16', 'cpu'): test_eq(nn.Linear(2, 2)(torch.ones(1, 2)).dtype, torch.bfloat16)
