"""One short training run of a tiny in-memory split, launched by tests/test_ddp.py under torchrun (gloo, CPU).
Each process records the checkpoint writes it made, the slices of its batches and its BatchNorm layers."""
import json, os, sys
from pathlib import Path
import numpy as np, torch
from sapl.data import Volume, DataBundle, get_profile, Split
from sapl.train import RunConfig, Trainer


def _vol(i, n=4, S=32):
    r = np.random.default_rng(i)
    img = r.random((n, S, S)).astype(np.float32)*.3
    lab = np.zeros((n, S, S), np.uint8); lab[:, 8 + i % 5:18, 6:16 + i % 7] = 1
    img[lab > 0] += .5
    return Volume(f'v{i}', img.clip(0, 1), lab, np.ones((n, S, S), np.uint8), np.arange(n), (0, S, 0, S), (n, S, S), (1., 1., 1.), np.eye(4))


def bundle():
    vs = [_vol(i) for i in range(6)]
    return DataBundle(vs[:2], vs[2:4], vs[4:5], vs[5:], get_profile('smoke'), Split((), (), (), ()), '')


def cfg(out, epochs=2):
    "Global batch 4: one process takes 4 slices per iteration, each of two processes 2."
    return RunConfig(profile='smoke', epochs=epochs, iters_per_epoch=3, batch=4, lr=0.05, out_dir=str(out))


def instrument(seen: list, saves: list):
    "Record (epoch, slice indices) of every batch and the path of every torch.save."
    nb, save = Trainer.next_batch, torch.save
    def next_batch(self, name, ds):
        b = nb(self, name, ds); seen.append([self.epoch, b['idx'].tolist()]); return b
    def rec_save(obj, f, *a, **k): saves.append(str(f)); return save(obj, f, *a, **k)
    Trainer.next_batch, torch.save = next_batch, rec_save


if __name__ == '__main__':
    out, epochs, die_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    seen, saves = [], []
    instrument(seen, saves)
    if die_at:   # killed while validating epoch `die_at` (after the checkpoints of epoch die_at - 1)
        val, calls = Trainer.validate, [0]
        def dying(self, vols=None):
            calls[0] += 1
            if calls[0] == die_at: raise KeyboardInterrupt
            return val(self, vols)
        Trainer.validate = dying
    rank, info = int(os.environ['RANK']), {}
    try:
        tr = Trainer(cfg(out, epochs), bundle(), progress=False)
        info = dict(world=tr.world, ddp=tr.ddp is not None, bn=sorted({type(m).__name__ for m in tr.models.modules() if 'BatchNorm' in type(m).__name__}))
        tr.fit()
    finally:
        (out/f'rank{rank}-{die_at}.json').write_text(json.dumps(dict(rank=rank, seen=seen, saves=saves, **info)))
