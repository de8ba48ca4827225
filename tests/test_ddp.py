"Two processes (torchrun, gloo, CPU) train to the same weights as one process with the same global batch, and resume."
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from sapl.train import Trainer, load_checkpoint
import ddp_worker as W

ROOT = Path(__file__).resolve().parents[1]


def launch(out, epochs, die_at=0):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nnodes', '1', '--nproc_per_node', '2',
           str(Path(__file__).with_name('ddp_worker.py')), str(out), str(epochs), str(die_at)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_same_weights_as_one(tmp_path):
    seen1, saves1 = [], []
    nb, sv = Trainer.next_batch, torch.save
    try:
        W.instrument(seen1, saves1)
        one = Trainer(W.cfg(tmp_path/'one'), W.bundle(), progress=False).fit()
    finally: Trainer.next_batch, torch.save = nb, sv
    two = tmp_path/'two'; two.mkdir()
    r = launch(two, 2, die_at=2)                        # killed during epoch 2
    assert r.returncode != 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = W.cfg(two).run_dir
    assert load_checkpoint(run_dir/'last.pt')['epoch'] == 1
    r = launch(two, 2)                                   # resumes at epoch 2 and finishes
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = load_checkpoint(one.run_dir/'last.pt'), load_checkpoint(run_dir/'last.pt')
    assert b['epoch'] == 2
    for ma, mb in zip(a['models'], b['models']):
        for k in ma:
            assert torch.allclose(ma[k].float(), mb[k].float(), rtol=1e-4, atol=1e-5), k
    assert [h['loss'] for h in a['history']] != [] and len(b['history']) == 2
    assert abs(a['history'][-1]['val_dsc'] - b['history'][-1]['val_dsc']) < 1e-4
    r0, r1 = [json.loads((two/f'rank{k}-2.json').read_text()) for k in (0, 1)]
    assert r0['world'] == 2 and r0['ddp'] and r0['bn'] == ['GlooSyncBatchNorm']
    assert r0['saves'] and not r1['saves']              # rank 0 alone writes
    assert not json.loads((two/'rank1-0.json').read_text())['saves']
    for (e0, i0), (e1, i1), (e, i) in zip(r0['seen'], r1['seen'], seen1):   # shards of the same global batches
        assert e0 == e1 == e and len(i0) == len(i1) == 2 and i0 + i1 == i
    assert len(r0['seen']) == len(seen1) == 6
