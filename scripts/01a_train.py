# %% [markdown]
# # Trainer
#
# > One training loop for every method: SGD with polynomial decay, seeded batches, per-epoch validation,
# > best/last checkpoints with everything needed to resume, and a CSV log. Methods plug in through hooks.

# %%
#| default_exp train

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile

# %%
#| export
from __future__ import annotations
import os, sys, math, time, json, random, subprocess, csv
from dataclasses import dataclass, field, fields, asdict, replace, MISSING
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import default_collate
from sapl.data import DataBundle, LabeledSlices, UnlabeledSlices, get_profile, log, resolve, atomic_path
from sapl.unet import UNet, l_seg
from sapl.parallel import init_distributed, get_rank, get_world, is_main, barrier, main_first, shard, global_batch
from sapl.parallel import has_batchnorm, sync_batchnorm, data_parallel, resolve_amp, resolve_channels_last, autocast, grad_scaler


# %% [markdown]
# ## Run configuration
#
# One frozen dataclass describes a run. It is built from a notebook's papermill `parameters` cell; `None` fields
# fall back to the profile. `opts` carries method-specific switches (e.g. which SA-CPS losses are on) and `tag`
# names the variant, so every variant gets its own run folder
# `out_dir/dataset/profile/r{ratio}/s{seed}/{tag}`.

# %%
#| export
@dataclass(frozen=True)
class RunConfig:
    method: str = 'baseline'
    dataset: str = 'phantom'
    data_dir: str = 'data/phantom'
    ratio: float = 0.1
    profile: str = 'quick'
    epochs: int|None = None
    iters_per_epoch: int|None = None
    batch: int|None = None
    seed: int = 0
    split_seed: int = 0
    split_dir: str|None = None
    out_dir: str = 'runs'
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    device: str = 'cpu'
    tag: str|None = None
    select: str = 'last'      # checkpoint that is evaluated: 'last' (end of the schedule) or 'best' (highest validation DSC)
    opts: dict = field(default_factory=dict)
    amp: str = 'auto'                # 'auto' | 'off' | 'bf16' | 'fp16' (see sapl.parallel); auto: on with cuda at the paper profile
    channels_last: bool|None = None  # None: on with cuda at the paper profile

    def __post_init__(self):
        get_profile(self.profile)
        if self.method == 'full': object.__setattr__(self, 'ratio', 1.0)  # full supervision: every training volume labeled
        if self.tag is None: object.__setattr__(self, 'tag', self.method)
        if not 0 < self.ratio <= 1: raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        for k in ('epochs', 'iters_per_epoch', 'batch'):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1): raise ValueError(f"{k} must be a positive integer or None, got {v!r}")
        if self.lr <= 0: raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.select not in ('last', 'best'): raise ValueError(f"select must be 'last' or 'best', got {self.select!r}")
        resolve_amp(self.amp, 'cpu', self.profile)  # validates the name

    @property
    def prof(self): return get_profile(self.profile)
    @property
    def n_epochs(self) -> int: return self.epochs or self.prof.epochs
    @property
    def n_batch(self) -> int: return self.batch or self.prof.batch
    @property
    def name(self) -> str: return self.tag or self.method
    @property
    def run_dir(self) -> Path: return resolve(self.out_dir)/self.dataset/self.profile/f'r{self.ratio:g}'/f's{self.seed}'/self.name
    @property
    def checkpoint_path(self) -> Path:
        "The checkpoint whose weights are evaluated (see `select`)."
        return self.run_dir/f'{self.select}.pt'

    def variant(self, tag: str) -> 'RunConfig':
        "The configuration of a named variant (see `VARIANTS`), e.g. 'cps' or 'sast+sacps'."
        if tag not in VARIANTS: raise ValueError(f"unknown variant {tag!r}; choose one of {sorted(VARIANTS)}")
        m, o = VARIANTS[tag]
        return replace(self, method=m, opts=dict(o), tag=tag)

    def smoke(self, **kw) -> 'RunConfig':
        "The tiny configuration used when notebooks run as tests."
        d = dict(profile='smoke', data_dir='data/phantom-smoke' if self.dataset == 'phantom' else self.data_dir, epochs=2, iters_per_epoch=3)
        return replace(self, **{**d, **kw})


# %% [markdown]
# Named variants map a short tag to a method and its options; the method notebooks add theirs (Table II/III
# ablations, Fig. 8 style sources, competitors).

# %%
#| export
VARIANTS: dict = {'baseline': ('baseline', {}), 'full': ('full', {})}

# %%
_c = RunConfig(ratio=.2, seed=3)
test_eq(_c.run_dir.relative_to(resolve('runs')).as_posix(), 'phantom/quick/r0.2/s3/baseline'); test_eq(_c.n_batch, 8)
test_eq(_c.variant('full').run_dir.name, 'full'); test_eq(_c.variant('full').ratio, 1.0)
test_fail(lambda: RunConfig(ratio=0), contains='ratio'); test_fail(lambda: RunConfig(epochs=-1), contains='epochs')


# %% [markdown]
# ## Seeds, RNG state, checkpoints
#
# One `seed` seeds Python, NumPy and torch. Checkpoints hold model, optimizer and scheduler states, all RNG states,
# the epoch, the config, the git SHA and the metric history. RNG states are stored as plain lists and tensors so
# that checkpoints load with `torch.load(weights_only=True)`. Writes go to a temporary file that is then renamed.

# %%
#| export
def seed_everything(seed: int):
    "Seed Python, NumPy and torch (CPU and CUDA) from one integer."
    random.seed(seed); np.random.seed(seed % 2**32); torch.manual_seed(seed)

def rng_state() -> dict:
    "All global RNG states in a `weights_only`-loadable form."
    npst = np.random.get_state()
    s = {'torch': torch.get_rng_state(), 'numpy': [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])],
         'python': [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}
    if torch.cuda.is_available(): s['cuda'] = torch.cuda.get_rng_state_all()
    return s

def set_rng_state(s: dict):
    "Restore the states saved by `rng_state`."
    torch.set_rng_state(s['torch'])
    n = s['numpy']; np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = s['python']; random.setstate((p[0], tuple(p[1]), p[2]))
    if 'cuda' in s and torch.cuda.is_available(): torch.cuda.set_rng_state_all(s['cuda'])

def save_checkpoint(path, obj: dict):
    "torch.save to a temporary file in the same folder, then rename (rank 0 only under torchrun)."
    if not is_main(): return
    with atomic_path(path) as tmp: torch.save(obj, tmp)

def load_checkpoint(path, map_location='cpu') -> dict:
    "Load a checkpoint with `weights_only=True`; a clear error for missing or unreadable files."
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f"{path}: checkpoint not found")
    try: return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e: raise RuntimeError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None

def config_defaults() -> dict:
    "Default values of the RunConfig fields (fill in fields a checkpoint predates)."
    return {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}

def git_sha() -> str:
    "Short git SHA of the code ('+dirty' when a tracked file outside reports/ is modified), or 'unknown'."
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '.', ':!reports'],  # outputs are not code
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha or 'unknown') + ('+dirty' if sha and dirty else '')
    except Exception: return 'unknown'


# %%
seed_everything(1); _s = rng_state(); _a = (random.random(), np.random.rand(), torch.rand(1).item())
set_rng_state(_s); test_eq((random.random(), np.random.rand(), torch.rand(1).item()), _a)
with tempfile.TemporaryDirectory() as d:
    save_checkpoint(f'{d}/c.pt', {'rng': _s}); set_rng_state(load_checkpoint(f'{d}/c.pt')['rng'])
    test_eq(np.random.rand(), _a[1]); test_eq(os.listdir(d), ['c.pt'])


# %% [markdown]
# ## Learning-rate schedule
#
# SGD (lr $10^{-2}$, momentum 0.9) with the polynomial policy of §IV-A4, applied per iteration $t$ of $T$ in total:
#
# $$\eta_t = \eta_0 \left(1 - \frac{t}{T}\right)^{0.9}$$

# %%
#| export
def poly_lr(t: int, total: int, power: float = 0.9) -> float:
    "Multiplier of the base learning rate at iteration t of total."
    return (1 - min(t, total)/total)**power


# %%
test_eq(poly_lr(0, 10), 1.); test_close(poly_lr(5, 10), .5**.9); test_eq(poly_lr(10, 10), 0.)

# %% [markdown]
# ## Methods as hooks
#
# A `Method` says what differs between training schemes; the `Trainer` does everything else. The default hooks
# are the supervised baseline (Eq. 15 with labeled data only):
#
# * `build(tr)` → the list of networks (default: one U-Net; networks get different initial weights);
# * `setup(tr)` → anything built once before training (teachers, style pools, pseudo-labels);
# * `train_step(tr, bl, bu)` → dict of losses with the total under `'loss'` (`bu` is `None` unless `unlabeled`);
# * `after_step(tr)` → e.g. an EMA update; `predict(tr, x)` → probabilities used for validation and test;
# * `epoch_size(tr)` → how many slices make an epoch when it is neither the labeled nor the unlabeled set;
# * `state()` / `load_state(s)` → extra state to checkpoint (an EMA teacher, ...).
#
# A method's hyperparameters are its `defaults`, overridden by `cfg.opts` into `self.o`; unknown keys are refused, so a
# typo cannot silently fall back to a default.

# %%
#| export
METHODS: dict = {}

def register(cls):
    "Class decorator adding a method to `METHODS` under `cls.name`."
    METHODS[cls.name] = cls; return cls

@register
class Method:
    name = 'baseline'
    n_models = 1
    unlabeled = False     # needs an unlabeled batch each iteration
    defaults: dict = {}   # hyperparameters that cfg.opts may override
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        bad = sorted(set(cfg.opts) - set(self.defaults))
        if bad: raise ValueError(f"unknown {self.name} options {bad}; known: {sorted(self.defaults)}")
        self.o = {**self.defaults, **cfg.opts}  # effective hyperparameters
    def build(self, tr) -> list: return [tr.new_unet(i) for i in range(self.n_models)]
    def setup(self, tr): pass
    def train_step(self, tr, bl: dict, bu: dict|None) -> dict:
        return {'loss': l_seg(tr.models[0](bl['image']), bl['label'])}
    def after_step(self, tr): pass
    def epoch_size(self, tr) -> int|None: return None  # slices per epoch when not the labeled/unlabeled set
    def predict(self, tr, x: torch.Tensor) -> torch.Tensor: # x: [B,1,H,W] -> probabilities [B,1,H,W]
        return torch.sigmoid(tr.models[0](x))
    def state(self) -> dict: return {}
    def load_state(self, s: dict): pass

@register
class Full(Method):
    "Full supervision: the baseline trained with every training volume labeled (ratio 1)."
    name = 'full'

def get_method(cfg: RunConfig) -> Method:
    if cfg.method not in METHODS: raise ValueError(f"unknown method {cfg.method!r}; choose one of {sorted(METHODS)}")
    return METHODS[cfg.method](cfg)


# %% [markdown]
# ## What prediction needs
#
# A checkpoint describes itself, so that a new CT can be segmented from the file alone (`sapl.predict`): under the key
# `'predict'` it stores the profile with its slice side $S$ and U-Net widths, the lung-crop margin, the HU window
# $[h_{lo}, h_{hi}]$ of the input scaling $x = (\mathrm{clip}(h, h_{lo}, h_{hi}) - h_{lo})/(h_{hi} - h_{lo})$, the
# probability threshold $\tau$ of the mask $\hat y = [p \ge \tau]$, the method with its number of networks and the
# whole run configuration. Every method predicts with its first network (`models[0]`; $s_1$ of the two-network methods).

# %%
#| export
def predict_meta(cfg: RunConfig) -> dict:
    "The metadata a checkpoint of `cfg` carries for prediction on new CTs (stored under `checkpoint()['predict']`)."
    from sapl.data import HU_WINDOW, CROP_MARGIN_MM
    p = cfg.prof
    return {'version': 1, 'profile': p.name, 'size': p.size, 'widths': list(p.widths), 'margin_mm': float(CROP_MARGIN_MM),
            'hu_window': [float(h) for h in HU_WINDOW], 'threshold': 0.5, 'method': cfg.method,
            'n_models': int(getattr(METHODS.get(cfg.method), 'n_models', 1)), 'predict_model': 0,
            'config': json.loads(json.dumps(asdict(cfg)))}


# %%
_m = predict_meta(RunConfig(profile='smoke'))
test_eq((_m['size'], _m['widths'], _m['method'], _m['n_models']), (32, [4, 8, 16], 'baseline', 1))
test_eq(json.loads(json.dumps(_m)), _m)  # plain JSON types: loads with weights_only=True


# %% [markdown]
# ## The trainer
#
# Each iteration draws a batch of $B$ labeled slices (and $B$ unlabeled ones for semi-supervised methods). Batches
# come from per-epoch permutations seeded by (seed, epoch, stream), so the order of an epoch does not depend on
# what ran before it — a run resumed from its last checkpoint sees the same batches and ends with the same weights.
# An epoch is `iters_per_epoch` iterations (profile default), or one pass over the unlabeled (semi-supervised) or
# labeled (supervised) set. After each epoch the trainer measures the mean per-volume DSC on the validation volumes
# (on the preprocessed slices; the final test evaluation is on the original grid, see `sapl.eval`), writes
# `last.pt`, keeps `best.pt`, and appends to `metrics.csv`. A run whose `last.pt` already reached the last epoch is
# not redone.
#
# **Which weights are evaluated** (`select`). The default is the **last** checkpoint: the polynomial schedule anneals the
# learning rate to zero, so the end of training is a well-defined point that does not depend on the validation set.
# The epoch of the best validation DSC (`select='best'`, the paper's choice) is kept as `best.pt`. On a handful of
# validation volumes it picks noise (the validation curve jumps by tens of points between neighbouring epochs); with the
# 19 validation volumes of the COVID249-shaped benchmark, `reports/selection.md` measures both rules on the same trained
# networks: there the best validation epoch scored about 2 DSC points higher on the test set than the last one, with a
# smaller spread over seeds, so `select='best'` is a one-flag alternative worth adopting for the tables.

# %%
#| export
def _dice_np(a, b):
    s = a.sum() + b.sum()
    return float('nan') if s == 0 else 2*float((a & b).sum())/float(s)

class Trainer:
    def __init__(self, cfg: RunConfig, data: DataBundle, method: Method|None = None, progress: bool = True):
        self.cfg, self.data, self.progress = cfg, data, progress
        self.method = method or get_method(cfg)
        self.device = torch.device(init_distributed(cfg.device))   # cuda:LOCAL_RANK under torchrun
        self.rank, self.world = get_rank(), get_world()
        if self.rank: self.progress = False                          # rank 0 alone prints and writes
        self.run_dir = cfg.run_dir
        seed_everything(cfg.seed)
        self.models = nn.ModuleList(self.method.build(self)).to(self.device)
        self.labeled = LabeledSlices(data.train_l, augment=True, seed=cfg.seed)
        self.unlabeled = UnlabeledSlices(data.train_u, augment=True, seed=cfg.seed + 1) if (self.method.unlabeled and data.train_u) else None
        if self.method.unlabeled and self.unlabeled is None: raise ValueError(f"{cfg.method} needs unlabeled volumes, the split has none")
        self.opt = torch.optim.SGD([p for p in self.models.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.epoch, self.history, self.best = 0, [], -1.
        self._perm = {}
        self.method.setup(self)
        self._accelerate()
        n = self.method.epoch_size(self) or len(self.unlabeled if self.unlabeled is not None else self.labeled)
        self.iters = cfg.iters_per_epoch or cfg.prof.iters_per_epoch or math.ceil(n/cfg.n_batch)
        self.total = self.iters*cfg.n_epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: poly_lr(t, self.total, cfg.power))

    def new_unet(self, i: int = 0) -> UNet:
        "A U-Net of the profile's widths with its own initialisation (seeded by seed and i)."
        g = torch.random.fork_rng(); g.__enter__()
        try:
            torch.manual_seed(self.cfg.seed*1000 + 17*i + 1); return UNet(self.cfg.prof.widths)
        finally: g.__exit__(None, None, None)

    def next_batch(self, name: str, ds) -> dict:
        "Next batch of `ds` for stream `name` in this epoch (seeded permutations, cycled when exhausted)."
        st = self._perm.get(name)
        if st is None or st['epoch'] != self.epoch: st = self._perm[name] = {'epoch': self.epoch, 'order': [], 'k': 0}
        B = self.cfg.n_batch
        while len(st['order']) - st['k'] < B:
            rng = np.random.default_rng([self.cfg.seed, self.epoch, sum(map(ord, name)), len(st['order'])])
            st['order'].extend(rng.permutation(len(ds)).tolist())
        idx = shard(st['order'][st['k']:st['k'] + B], self.rank, self.world); st['k'] += B   # this process's share (Eq. P1)
        b = default_collate([ds[i] for i in idx])
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}

    def _accelerate(self):
        "Precision, memory layout and DistributedDataParallel (sapl.parallel); nothing changes for an fp32 single process."
        cfg, dt = self.cfg, self.device.type
        self.amp = resolve_amp(cfg.amp, dt, cfg.profile)
        self.scaler = grad_scaler(self.amp, dt)
        if resolve_channels_last(cfg.channels_last, dt, cfg.profile):   # the networks and extra modules (e.g. the synthesizer)
            for m in [self.models, *[v for v in vars(self.method).values() if isinstance(v, nn.Module)]]: m.to(memory_format=torch.channels_last)
        self.ddp = None
        if self.world > 1:
            if cfg.n_batch % self.world: raise ValueError(f"batch {cfg.n_batch} (global) must be divisible by the {self.world} processes")
            if has_batchnorm(self.models): sync_batchnorm(self.models, dt)
            self.ddp = data_parallel(self.models)
            if self.rank: torch.manual_seed(cfg.seed*1_000_003 + self.rank)   # independent perturbation noise per process

    def train_step(self, bl: dict, bu: dict|None) -> dict:
        "The method's step under the run's precision; through DistributedDataParallel (batch-wide sums over all processes) under torchrun."
        with autocast(self.amp, self.device.type), global_batch(self.ddp is not None):
            if self.ddp is None: return self.method.train_step(self, bl, bu)
            return self.ddp(self.method.train_step, self, bl, bu)

    def optimizer_step(self, loss: torch.Tensor):
        "Backward, optimizer and schedule step (loss scaling under fp16)."
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None: loss.backward(); self.opt.step()
        else: self.scaler.scale(loss).backward(); self.scaler.step(self.opt); self.scaler.update()
        self.sched.step()

    def checkpoint(self) -> dict:
        return {'models': [m.state_dict() for m in self.models], 'optimizer': self.opt.state_dict(), 'scheduler': self.sched.state_dict(),
                'rng': rng_state(), 'epoch': self.epoch, 'config': json.loads(json.dumps(asdict(self.cfg))), 'git_sha': git_sha(),
                'history': self.history, 'best': self.best, 'method': self.method.state(), 'predict': predict_meta(self.cfg),
                **({'scaler': self.scaler.state_dict()} if getattr(self, 'scaler', None) is not None else {})}

    def load(self, ck: dict, weights_only_models: bool = False):
        for m, s in zip(self.models, ck['models']): m.load_state_dict(s)
        if weights_only_models: return self
        self.opt.load_state_dict(ck['optimizer']); self.sched.load_state_dict(ck['scheduler'])
        if ck.get('scaler') is not None and getattr(self, 'scaler', None) is not None: self.scaler.load_state_dict(ck['scaler'])
        set_rng_state(ck['rng']); self.epoch, self.history, self.best = ck['epoch'], list(ck['history']), ck['best']
        self.method.load_state(ck['method'])
        return self

    def resume(self) -> bool:
        "Load `last.pt` when present; True when the run had already finished."
        p = self.run_dir/'last.pt'
        if not p.exists(): return False
        ck = load_checkpoint(p)
        def same(d):  # what a run computes, not where: paths and device left out, profile defaults made explicit
            prof = get_profile(d.get('profile', 'quick'))
            d = {**d, **{k: d.get(k) or getattr(prof, k) for k in ('epochs', 'iters_per_epoch', 'batch')}}
            return {k: v for k, v in d.items() if k not in ('data_dir', 'out_dir', 'split_dir', 'device')}
        old = {**config_defaults(), 'select': 'best', **ck['config']}  # later fields: their defaults; before `select`, the best epoch was evaluated
        if same(old) != same(json.loads(json.dumps(asdict(self.cfg)))):
            raise RuntimeError(f"{p}: checkpoint was made with a different configuration; use another out_dir or delete the folder")
        self.load(ck)
        log.info(f"{self.cfg.name}: resumed from {p} at epoch {self.epoch}/{self.cfg.n_epochs}")
        return self.epoch >= self.cfg.n_epochs

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor: # x: [B,1,H,W] -> [B,1,H,W] probabilities
        self.models.eval()
        with autocast(getattr(self, 'amp', 'off'), self.device.type):
            return self.method.predict(self, x.to(self.device)).float().cpu()

    @torch.no_grad()
    def validate(self, vols=None) -> float:
        "Mean per-volume DSC on the preprocessed slices of `vols` (default: validation volumes)."
        ds = []
        for v in (vols if vols is not None else self.data.val):
            pr = torch.cat([self.predict(torch.from_numpy(v.image[i:i+32])[:, None]) for i in range(0, len(v.image), 32)])
            ds.append(_dice_np(pr[:, 0].numpy() >= .5, v.label > 0))
        ds = [d for d in ds if d == d]
        return float(np.mean(ds)) if ds else float('nan')

    def fit(self) -> 'Trainer':
        "Train (or resume) to the configured number of epochs."
        from tqdm.auto import tqdm
        cfg = self.cfg
        if self.resume(): log.info(f"{cfg.name}: finished run found in {self.run_dir}, not retrained"); return self.load_selected()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while self.epoch < cfg.n_epochs:
            t0 = time.time(); self.models.train(); sums = {}
            self.labeled.set_epoch(self.epoch)
            if self.unlabeled is not None: self.unlabeled.set_epoch(self.epoch)
            bar = tqdm(range(self.iters), desc=f'{cfg.name} epoch {self.epoch + 1}/{cfg.n_epochs}', disable=not self.progress, leave=False)
            for _ in bar:
                bl = self.next_batch('labeled', self.labeled)
                bu = self.next_batch('unlabeled', self.unlabeled) if self.unlabeled is not None else None
                self.models.train()
                losses = self.train_step(bl, bu)
                self.optimizer_step(losses['loss'])
                self.method.after_step(self)
                for k, v in losses.items(): sums[k] = sums.get(k, 0.) + float(v.detach() if torch.is_tensor(v) else v)
                bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}")
            self.epoch += 1
            val = self.validate()
            row = {'epoch': self.epoch, 'lr': self.opt.param_groups[0]['lr'], **{k: v/self.iters for k, v in sums.items()},
                   'val_dsc': val, 'seconds': time.time() - t0}
            self.history.append(row)
            if val == val and val > self.best:
                self.best = val; save_checkpoint(self.run_dir/'best.pt', self.checkpoint())
            save_checkpoint(self.run_dir/'last.pt', self.checkpoint())
            self._log_csv()
            if self.progress: log.info(f"{cfg.name} epoch {self.epoch}/{cfg.n_epochs} loss {row['loss']:.4f} val DSC {val:.4f} ({row['seconds']:.1f}s)")
        return self.load_selected()

    def load_selected(self) -> 'Trainer':
        "Switch to the weights that `cfg.select` names: the end of training ('last') or the best validation epoch ('best')."
        if self.cfg.select == 'best': return self.load_best()
        p = self.run_dir/'last.pt'
        if p.exists(): self.load(load_checkpoint(p), weights_only_models=True)
        self.models.eval(); return self

    def load_best(self) -> 'Trainer':
        "Switch to the weights of the best validation epoch (or last, when no validation DSC was defined)."
        p = self.run_dir/'best.pt'
        if p.exists(): self.load(load_checkpoint(p), weights_only_models=True)
        self.models.eval(); return self

    def _log_csv(self):
        if self.rank == 0:
            keys = sorted({k for r in self.history for k in r}, key=lambda k: (k != 'epoch', k))
            with atomic_path(self.run_dir/'metrics.csv') as tmp, open(tmp, 'w', newline='') as f:
                w = csv.DictWriter(f, fieldnames=keys); w.writeheader(); w.writerows(self.history)
        barrier()   # under torchrun: the epoch's checkpoints and log are on disk before any process goes on


# %% [markdown]
# `run` is the whole pipeline for one configuration: data (full supervision uses ratio 1 on the same split), method,
# training (or resuming), and returns the trainer with its best weights loaded.

# %%
#| export
def run(cfg: RunConfig, data: DataBundle|None = None, progress: bool = True) -> Trainer:
    "Prepare data (unless given), train or resume `cfg`, return the trainer with its best weights."
    from sapl.data import prepare_data
    init_distributed(cfg.device)
    if data is None:
        with main_first(): data = prepare_data(cfg.dataset, cfg.data_dir, 1.0 if cfg.method == 'full' else cfg.ratio, cfg.profile,
                                               cfg.split_seed, cfg.split_dir, progress=progress)
    elif cfg.method == 'full' and data.train_u:
        data = replace(data, train_l=data.train_l + data.train_u, train_u=[])
    return Trainer(cfg, data, progress=progress).fit()

def evaluate_run(tr: Trainer, data: DataBundle, force: bool = False):
    "Per-volume test DSC/NSD of a trained run, cached in `run_dir/test.csv` (recomputed when the checkpoint is newer)."
    import pandas as pd
    from sapl.eval import evaluate
    p, ck = tr.run_dir/'test.csv', tr.cfg.checkpoint_path
    if p.exists() and not force and (not ck.exists() or p.stat().st_mtime >= ck.stat().st_mtime): return pd.read_csv(p)
    df = evaluate(tr.predict, data.test, device=tr.cfg.device)
    if is_main():
        with atomic_path(p) as tmp: df.to_csv(tmp, index=False)
    return df


# %% [markdown]
# ## Command line and several GPUs
#
# `main` trains one configuration (and evaluates it on the test volumes) from the command line; every `RunConfig`
# field is an option. The same command runs on one process or, under `torchrun`, on $N$ processes (one per GPU):
# the batch is the global batch, split over the processes (Eq. P1 of `sapl.parallel`), BatchNorm layers are
# synchronised, gradients are averaged by DistributedDataParallel, and rank 0 alone writes checkpoints, logs and
# reports. Resuming works as in one process.
#
# ```bash
# python -m sapl.train --variant sacps --profile paper --device cuda --data-dir /data/COVID-19-20 --dataset covid19-20
# torchrun --standalone --nproc_per_node 4 -m sapl.train --variant sacps --profile paper --device cuda ...
# ```

# %%
#| export
def _cli_value(s: str, kind: str):
    if s.lower() == 'none' and 'None' in kind: return None
    if kind.startswith('bool'): return s.lower() in ('1', 'true', 'yes', 'on')
    if kind.startswith('int'): return int(s)
    if kind.startswith('float'): return float(s)
    return s

def main(argv: list|None = None) -> Trainer:
    "Command line: train (or resume) one configuration, then evaluate it on the test volumes (rank 0)."
    import argparse, importlib
    for mod in ('sapl.sacps', 'sapl.sast', 'sapl.baselines', 'sapl.modern'):   # register every method
        try: importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod: raise
    p = argparse.ArgumentParser(prog='python -m sapl.train', description='Train and evaluate one sapl configuration.')
    p.add_argument('--variant', help=f'a named variant (sets method, opts, tag): {", ".join(sorted(VARIANTS))}')
    for f in fields(RunConfig):
        if f.name == 'opts': p.add_argument('--opts', type=json.loads, default={}, help='method options as JSON')
        else: p.add_argument('--' + f.name.replace('_', '-'), dest=f.name, type=lambda s, k=str(f.type): _cli_value(s, k), default=f.default)
    p.add_argument('--no-eval', action='store_true', help='skip the test evaluation')
    a = vars(p.parse_args(argv)); variant, no_eval = a.pop('variant'), a.pop('no_eval')
    cfg = RunConfig(**a)
    if variant: cfg = replace(cfg.variant(variant), opts={**VARIANTS[variant][1], **a['opts']})
    tr = run(cfg, progress=True)
    if not no_eval and is_main():
        df = evaluate_run(tr, tr.data)
        print(f"{cfg.name}: test DSC {df['dsc'].mean():.4f} over {len(df)} volumes ({tr.run_dir/'test.csv'})", flush=True)
    barrier()
    return tr

if __name__ == '__main__' and '__file__' in globals():   # python -m sapl.train / torchrun -m sapl.train
    from sapl.train import main as _main   # the registry of the imported module, not of __main__
    _main(sys.argv[1:])

# %%
test_fail(lambda: main(['--amp', 'fp8', '--no-eval']), contains='amp must be')
