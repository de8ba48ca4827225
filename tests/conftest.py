import os
from pathlib import Path
import numpy as np, nibabel as nib, pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('SAPL_SHARED', ROOT.parent/'shared'))


def pytest_configure(config):
    config.addinivalue_line('markers', "slow: minutes of CPU (every method at 512 px); left out by make test-fast")


def toy_chest(Z=6, Y=64, X=64, lesion=True, seed=0):
    "A toy chest in (z,y,x): body 40 HU, two lungs at -850 HU (x toward the patient's left), a -400 HU lesion in the left lung."
    r = np.random.default_rng(seed)
    hu = np.full((Z, Y, X), -1000, np.float32)
    hu[:, 8:56, 4:60] = 40
    hu[:, 16:48, 10:28] = -850   # right lung (low x)
    hu[:, 16:48, 36:54] = -850   # left lung (high x)
    hu += r.normal(0, 5, hu.shape).astype(np.float32)
    lab = np.zeros((Z, Y, X), np.uint8)
    if lesion:
        lab[1:Z-1, 24:34, 40:48] = 1
        hu[lab > 0] = -400
    return hu, lab


def write_nii(path, arr_zyx, spacing=(2.5, .8, .8), dtype=np.int16, affine=None):
    aff = np.diag([-spacing[2], -spacing[1], spacing[0], 1.]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(arr_zyx).transpose(2, 1, 0).astype(dtype), aff), str(path))
    return Path(path)


@pytest.fixture
def covid_dir(tmp_path):
    "Three tiny volumes in the COVID-19-20 layout."
    for i in range(3):
        hu, lab = toy_chest(seed=i, lesion=i != 2)
        write_nii(tmp_path/f'volume-covid19-A-{i:04d}_ct.nii.gz', hu)
        write_nii(tmp_path/f'volume-covid19-A-{i:04d}_seg.nii.gz', lab, dtype=np.uint8)
    return tmp_path
