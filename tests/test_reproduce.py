"The reproduction driver end to end on the smoke profile: papermill runs, skipping finished runs, tables and figures."
import os
from pathlib import Path
import pandas as pd, pytest
from sapl.reproduce import main


def test_driver_smoke(tmp_path, capsys):
    args = ['--profile', 'smoke', '--data-dir', 'data/phantom-smoke', '--ratios', '0.1', '--seeds', '0',
            '--variants', 'baseline', 'full', 'sast+sacps', '--out-dir', str(tmp_path/'runs'),
            '--report-dir', str(tmp_path/'reports'), '--jobs', '2']
    main(args)
    rep = tmp_path/'reports'
    runs = sorted(p.name for p in (rep/'runs').glob('*.ipynb'))
    assert runs == ['baseline_phantom_smoke_r0.1_s0.ipynb', 'sacps_phantom_smoke_r0.1_s0.ipynb',
                    'sast+sacps_phantom_smoke_r0.1_s0.ipynb', 'sean_phantom_smoke_r0.1_s0.ipynb']
    t4 = pd.read_csv(rep/'table_IV.csv')
    assert set(t4.variant) == {'baseline', 'sacps', 'sast+sacps', 'full'}
    assert t4.dsc.between(0, 1).all() and (t4.seeds == 1).all()
    md = (rep/'table_IV.md').read_text()
    assert 'git SHA' in md and 'data hash' in md and 'SA-ST(+SA-CPS)' in md
    assert (rep/'fig5.png').exists() and (rep/'fig6.png').exists() and (rep/'fig7_r0.1.png').exists() and (rep/'baseline_full').is_dir()
    stamp = {p: p.stat().st_mtime for p in (rep/'runs').glob('*.ipynb')}
    capsys.readouterr()
    main(args)                                    # finished runs are not redone
    assert '[run]' not in capsys.readouterr().out
    assert all(p.stat().st_mtime == t for p, t in stamp.items())
