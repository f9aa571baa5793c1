"""The engine mask's regions: counted, ordered by size, placed in scanner and MNI space."""
import numpy as np
import pytest

from qc_pipeline.qc.regions import MIDLINE_MM, RegionsError, anomaly_regions

SHAPE = (40, 40, 40)
#: 2 mm voxels, voxel (0, 0, 0) at scanner (-40, -40, -40) mm: voxel 20 is the origin
GRID = np.diag([2.0, 2.0, 2.0, 1.0])
GRID[:3, 3] = -40.0


def _brain():
    g = np.indices(SHAPE)
    return ((g - 19.5) ** 2).sum(0) < 18 ** 2


def test_regions_are_counted_ordered_and_placed():
    brain = _brain()
    mask = np.zeros(SHAPE, bool)
    mask[8:12, 18:22, 18:22] = True     # 64 voxels, centre voxel (9.5, 19.5, 19.5)
    mask[26:29, 18:21, 18:21] = True    # 27 voxels, centre voxel (27, 19, 19)
    mask[20, 30, 20] = True             # a single voxel
    err = np.full(SHAPE, 0.1)
    err[8:12, 18:22, 18:22] = 2.0
    err[10, 20, 20] = 5.0
    n, regions = anomaly_regions(mask, brain_mask=brain, grid_affine=GRID, error_map=err)
    assert n == 3 and [r.voxels for r in regions] == [64, 27, 1] and [r.rank for r in regions] == [1, 2, 3]
    big = regions[0]
    assert big.volume_ml == pytest.approx(64 * 8 / 1000)
    assert big.fraction_of_brain == pytest.approx(64 / brain.sum(), rel=1e-4)
    assert big.fraction_of_mask == pytest.approx(64 / 92, rel=1e-4)
    assert big.centre_scanner_mm == pytest.approx([2 * 9.5 - 40, 2 * 19.5 - 40, 2 * 19.5 - 40])
    assert big.peak_error == 5.0 and big.mean_error == pytest.approx((63 * 2.0 + 5.0) / 64, rel=1e-3)
    # no template fit: no MNI centre, no hemisphere
    assert big.centre_mni_mm is None and big.hemisphere is None
    # only the largest are listed; the count covers every region
    n2, top = anomaly_regions(mask, brain_mask=brain, grid_affine=GRID, listed=1)
    assert n2 == 3 and len(top) == 1 and top[0].mean_error is None


def test_mni_centre_and_hemisphere_follow_the_template_fit():
    brain = _brain()
    mask = np.zeros(SHAPE, bool)
    mask[4:8, 18:22, 18:22] = True       # scanner x = -29 mm
    mask[30:34, 18:22, 18:22] = True     # scanner x = +23 mm
    mask[19:21, 4:8, 18:22] = True       # scanner x = -1 mm
    # MNI -> scanner: the scanner's head sits 10 mm to the right of MNI's origin
    t2w = np.eye(4)
    t2w[0, 3] = 10.0
    n, regions = anomaly_regions(mask, brain_mask=brain, grid_affine=GRID, template_to_world=t2w)
    by_x = {round(r.centre_scanner_mm[0]): r for r in regions}
    assert n == 3 and set(by_x) == {-29, 23, -1}
    assert by_x[-29].centre_mni_mm[0] == pytest.approx(-39.0) and by_x[-29].hemisphere == "left"
    assert by_x[23].centre_mni_mm[0] == pytest.approx(13.0) and by_x[23].hemisphere == "right"
    # scanner x = -1 is MNI x = -11: left, although it is the scanner's midline
    assert by_x[-1].hemisphere == "left" and abs(by_x[-1].centre_mni_mm[0]) > MIDLINE_MM
    d = regions[0].to_dict()
    assert set(d) >= {"rank", "voxels", "volume_ml", "centre_scanner_mm", "centre_mni_mm", "hemisphere"}


def test_empty_mask_and_bad_input():
    brain = _brain()
    assert anomaly_regions(np.zeros(SHAPE, bool), brain_mask=brain, grid_affine=GRID) == (0, [])
    with pytest.raises(RegionsError, match=r"mask \(40, 40, 40\) and brain mask \(40, 40, 39\)"):
        anomaly_regions(np.zeros(SHAPE, bool), brain_mask=brain[:, :, :39], grid_affine=GRID)
    with pytest.raises(RegionsError, match="error map"):
        anomaly_regions(brain, brain_mask=brain, grid_affine=GRID, error_map=np.zeros((4, 4, 4)))
    with pytest.raises(RegionsError, match="grid_affine: expected a finite 4 x 4 affine"):
        anomaly_regions(brain, brain_mask=brain, grid_affine=np.eye(3))
    bad = np.eye(4)
    bad[0, 0] = np.nan
    with pytest.raises(RegionsError, match="template_to_world"):
        anomaly_regions(brain, brain_mask=brain, grid_affine=GRID, template_to_world=bad)
