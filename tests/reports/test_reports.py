"""Subject and group HTML: sections, embedded figures, links, escaping, missing raw data."""
import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from qc_pipeline.reports import choose_slices, mosaic_png, write_subject_report
EVIL = "<script>alert(1)</script>"  # same label as the conftest fixture


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.imgs, self.links, self.scripts, self.ext = [], [], [], 0, []
        self.in_script = False
        self.script_text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and a.get("data-bids-name"):
            self.sections.append(a["data-bids-name"])
        if tag == "img":
            self.imgs.append(a)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "script":
            self.scripts += 1
            self.in_script = True
            if a.get("src"):
                self.ext.append(a["src"])
        if tag == "link" and a.get("href"):
            self.ext.append(a["href"])

    def handle_endtag(self, tag):
        if tag == "script":
            self.in_script = False

    def handle_data(self, data):
        if self.in_script:
            self.script_text.append(data)


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    im.load()
    return im


def test_subject_page_sections_and_figures(group_run):
    dv, _ = group_run
    page = _parse(dv.root / "sub-01.html")
    expect = sorted(s.bids_name for s in dv.scans if s.subject == "01")
    assert sorted(page.sections) == expect and len(expect) == 4  # 2 sessions, 2 runs, 2 suffixes
    # each successful scan: mosaic, the same without overlay, error map, tau curve, and with
    # the scan itself as background the window raised on the air; all decodable PNG data URIs
    scans = [s for s in dv.scans if s.subject == "01"]
    assert len(page.imgs) == sum(5 if s.source else 4 for s in scans)
    for img in page.imgs:
        im = _png(img["src"])
        assert im.size[0] > 100 and np.unique(np.asarray(im.convert("L"))).size > 2
    assert page.ext == [] and page.scripts == 1
    html = (dv.root / "sub-01.html").read_text()
    assert "http://" not in html and "https://" not in html and "@import" not in html
    # scores, ranks and flag from the group tables
    assert re.search(r"rank \d+ of 10 in site A", html) and "flagged" in html
    assert "run the group level" not in html


def test_failed_scan_section_shows_error(group_run):
    dv, _ = group_run
    html = (dv.root / "sub-14.html").read_text()
    page = _parse(dv.root / "sub-14.html")
    assert page.sections == ["sub-14_T1w"] and page.imgs == []
    assert "Not3D: image has 4 dimensions (32, 36, 30, 5)" in html and "failed" in html


def test_group_page_links_resolve_and_rows(group_run):
    dv, _ = group_run
    page = _parse(dv.root / "group_T1w.html")
    assert page.links, "ranked table links to subject reports"
    for href in page.links:
        if href.startswith("#"):
            continue
        target, _, anchor = href.partition("#")
        assert (dv.root / target).is_file(), href
        if anchor:  # a scan link lands on the scan's section
            assert f'id="{anchor}"' in (dv.root / target).read_text(), href
    html = (dv.root / "group_T1w.html").read_text()
    # worst first in the HTML table too
    order = re.findall(r'<a href="sub-\d+\.html#scan-[^"]+">(sub-[^<]+)</a>', html)
    assert order[:3] == ["sub-05_T1w", "sub-12_T1w", "sub-01_ses-2_run-1_T1w"]
    assert "robust per site" in html and "Flag rule" in html
    for k in ("AUROC", "AUPRC", "FPR80", "FPR90", "FNR80", "FNR90"):
        assert k in html
    assert "CorruptImage: truncated gzip stream" in html
    assert page.imgs == [] and html.count('<svg class="strip"') >= 1  # plots are inline SVG
    assert page.ext == []


def test_escaping(group_run):
    dv, _ = group_run
    for name in ("sub-06.html", "group_T1w.html"):
        html = (dv.root / name).read_text()
        assert EVIL not in html, name
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, name
    # the only <script> element is ours
    assert _parse(dv.root / "sub-06.html").scripts == 1
    assert _parse(dv.root / "group_T1w.html").scripts == 1


def test_missing_raw_data_uses_error_map(group_run):
    dv, _ = group_run
    html = (dv.root / "sub-12.html").read_text()   # site B: raw data never existed
    assert "source scan not available" in html
    assert len(_parse(dv.root / "sub-12.html").imgs) == 4  # mosaic, without overlay, error map, tau
    html = (dv.root / "sub-05.html").read_text()   # site A: raw scan is the background
    assert "small ones ringed) on the scan;" in html and "source scan not available" not in html


def test_subject_page_before_group_level(derivs):
    p = write_subject_report(derivs.root, "sub-05")
    html = p.read_text()
    assert p.name == "sub-05.html"
    assert "no group statistics yet: run the group level" in html


def test_a_page_that_cannot_be_drawn_falls_back_to_a_minimal_one(derivs, monkeypatch, caplog):
    import qc_pipeline.reports.pages as pages

    def broken(*args, **kwargs):
        raise ValueError("figure engine exploded")

    monkeypatch.setattr(pages, "write_subject_report", broken)
    p = pages.write_subject_page(derivs.root, "sub-05")
    html = p.read_text()
    assert p.name == "sub-05.html" and "minimal report" in html and "sub-05_" in html
    assert any("figure engine exploded" in r.getMessage() for r in caplog.records)


def test_stale_group_tables_are_not_shown(group_run, tmp_path):
    import json
    import shutil

    dv, _ = group_run
    root = tmp_path / "copy"
    shutil.copytree(dv.root, root)
    qc = root / "sub-07" / "anat" / "sub-07_T1w_qc.json"
    d = json.loads(qc.read_text())
    d["anomaly_fraction"] = 0.5
    qc.write_text(json.dumps(d))
    html = write_subject_report(root, "07").read_text()
    assert "older than this scan" in html


def test_figures_without_any_nifti(derivs):
    import json

    qc = next(s.qc_path for s in derivs.scans if s.bids_name == "sub-03_T1w")
    d = json.loads(qc.read_text())
    d["mask_file"] = "gone_mask.nii.gz"
    d["error_map_file"] = None
    qc.write_text(json.dumps(d))
    html = write_subject_report(derivs.root, "03").read_text()
    assert "no anomaly mask or error map file found" in html
    assert len(_parse(derivs.root / "sub-03.html").imgs) == 1  # tau curve only


def test_ratings_controls_and_tsv_columns(group_run):
    dv, _ = group_run
    html = (dv.root / "sub-01.html").read_text()
    assert html.count('<fieldset class="rating"') == 4
    for v in ("good", "questionable", "bad"):
        assert f'value="{v}"' in html
    assert "bids_name\\trating\\tartifacts\\tcomment\\trater\\ttimestamp" in html
    assert "localStorage" in html and "new Blob" in html


# --------------------------------------------------------------------------- figures
def _vol_with_blob(centre, n=3):
    shape = (40, 44, 36)
    g = np.indices(shape)
    brain = sum(((g[i] - s / 2) / (0.4 * s)) ** 2 for i, s in enumerate(shape)) <= 1
    mask = np.zeros(shape, bool)
    mask[centre[0]:centre[0] + n, centre[1]:centre[1] + 1, centre[2]:centre[2] + 1] = True
    return np.where(brain, 100.0, 0.0).astype(np.float32), mask


def test_slices_go_through_the_anomaly():
    bg, mask = _vol_with_blob((12, 30, 20))
    slices, centre, through = choose_slices(mask, bg != 0)
    assert through
    assert mask[centre]
    for ax in range(3):
        assert centre[ax] in slices[ax] and len(slices[ax]) == 5
    # no anomaly: through the brain centre
    slices, centre, through = choose_slices(np.zeros_like(mask), bg != 0)
    assert not through and all(abs(c - s / 2) <= 1.5 for c, s in zip(centre, bg.shape))


def test_small_anomaly_visible_on_thumbnail():
    """A 3-voxel anomaly must leave many saturated overlay pixels on a 400-px-wide thumbnail."""
    bg, mask = _vol_with_blob((12, 30, 20))
    im = _png(mosaic_png(bg, mask, (1.0, 1.0, 1.0))).convert("RGB")
    im = im.resize((400, int(400 * im.size[1] / im.size[0])), Image.BILINEAR)
    a = np.asarray(im).astype(int)
    red = (a[..., 0] > 150) & (a[..., 1] < 110) & (a[..., 2] < 110)
    yellow = (a[..., 0] > 180) & (a[..., 1] > 160) & (a[..., 2] < 90)
    assert red.sum() + yellow.sum() > 60
    clean = np.asarray(_png(mosaic_png(bg, np.zeros_like(mask), (1.0, 1.0, 1.0))).convert("RGB")).astype(int)
    assert not ((clean[..., 0] > 150) & (clean[..., 1] < 110) & (clean[..., 2] < 110)).any()


def test_subject_page_shows_background_statistic_and_flag(derivs):
    import json

    from qc_pipeline.grouplevel import run_group

    t1 = [s for s in derivs.scans if s.suffix == "T1w" and s.kind != "failed"]
    for i, s in enumerate(t1):
        d = json.loads(s.qc_path.read_text())
        v = 0.2 if s.subject == "01" and i == 0 else 0.0
        d["background_artifact_fraction"] = v
        d["background"] = {"available": True, "background_artifact_fraction": v, "background_ml": 4000.0,
                           "artifact_ml": 800.0 if v else 0.0, "noise_sigma": 12.5, "snr": 21.0,
                           "ghost_ratio": 0.02, "ghost_axis": 1}
        s.qc_path.write_text(json.dumps(d))
    run_group(derivs.root)
    html = (derivs.root / "sub-01.html").read_text()
    assert "Background (outside the head)" in html and "noise sigma 12.5" in html
    assert "Flagged for background artifact" in html and "background_artifact_fraction 0.2" in html
    assert "badge flag\">background artifact" in html
    # a scan without the statistic says so
    other = next(s for s in derivs.scans if s.subject == "01" and s.suffix == "FLAIR" and s.kind != "failed")
    assert other.bids_name in html and "No background statistic recorded" in html


def test_subject_page_lists_the_engine_regions(derivs):
    """The regions of the engine's mask (from the qc.json) appear on the page, largest first,
    with their volume, hemisphere and MNI centre; a scan without any says nothing of them."""
    import json

    s = next(x for x in derivs.scans if x.subject == "01" and x.kind != "failed")
    d = json.loads(s.qc_path.read_text())
    d["anomaly_region_count"] = 7
    d["anomaly_regions"] = [
        {"rank": 1, "voxels": 1500, "volume_ml": 12.0, "fraction_of_brain": 0.0857, "fraction_of_mask": 0.9,
         "centre_scanner_mm": [-20.5, 31.0, 48.0], "centre_mni_mm": [-24.0, 30.0, 52.0], "hemisphere": "left",
         "mean_error": 2.5, "peak_error": 9.25},
        {"rank": 2, "voxels": 20, "volume_ml": 0.16, "fraction_of_brain": 0.0011, "fraction_of_mask": 0.01,
         "centre_scanner_mm": [10.0, 0.0, 0.0], "centre_mni_mm": None, "hemisphere": None,
         "mean_error": 1.1, "peak_error": 1.4}]
    s.qc_path.write_text(json.dumps(d))
    write_subject_report(derivs.root, "01")
    html = (derivs.root / "sub-01.html").read_text()
    assert "7 regions, the 2 largest below" in html
    assert "12 mL" in html and "left" in html and "-24.0, 30.0, 52.0" in html and "9.25" in html
    assert html.count('<table class="kv regions">') == 1
