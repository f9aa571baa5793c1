"""The rater's workflow: one verdict per scan, links that land on the scan, mosaics
through the head, the overview page, the ratings round trip."""
import csv
import re
from pathlib import Path

import numpy as np

from qc_pipeline.grouplevel import run_group
from qc_pipeline.reports import choose_slices, head_mask, scan_anchor, scan_verdict

EVIL = "<script>alert(1)</script>"  # same label as the conftest fixture


def _csv_rows(path: Path) -> dict:
    with open(path, encoding="utf-8", newline="") as fh:
        return {r["bids_name"]: r for r in csv.DictReader(fh)}


def _section(html: str, bids_name: str) -> str:
    start = html.index(f'id="{scan_anchor(bids_name)}"')
    end = html.find('<section class="scan"', start)
    return html[start:end if end > 0 else None]


def test_subject_page_leads_with_the_number_the_group_ranks_by(derivs, with_quality):
    # the model's reference says "noise, 12.6"; against its site the background drives it
    with_quality(derivs, spikes={"sub-05_T1w": ("background_artifact_fraction", 0.3)},
                driver={"sub-05_T1w": (12.6, "noise")})
    run_group(derivs.root)
    row = _csv_rows(derivs.root / "group_T1w.csv")["sub-05_T1w"]
    assert row["qc_score_site_driver"] == "background_artifact_fraction"
    site_score = float(row["qc_score_site"])
    sec = _section((derivs.root / "sub-05.html").read_text(), "sub-05_T1w")
    verdict = sec[sec.index('class="verdict'):sec.index("</div>", sec.index('class="verdict'))]
    shown = float(re.search(r"QC score <b>([^<]+)</b>", verdict).group(1))
    assert shown == float(f"{site_score:.3g}")
    assert "ghosting / wrap-around in the background" in verdict
    assert "12.6" not in verdict  # the reference score is not a second verdict
    assert verdict.index("QC score") < sec.index('class="score"')  # it leads the section
    # the group table names the same driver in the same words
    group = (derivs.root / "group_T1w.html").read_text()
    assert "ghosting / wrap-around in the background" in group
    # the suggested artifact tag is marked in the rating form
    assert re.search(r'class="hint"[^>]*><input type="checkbox" value="ghosting/wrap-around"', sec)


def test_verdict_before_the_group_level_says_so():
    v = scan_verdict({"qc_score": 7.5, "qc_score_driver": "spectral_peak", "anomaly_fraction": 0.01}, None)
    assert not v["ranked"] and v["value"] == 7.5 and v["reasons"] == ["spike / zipper stripes (a k-space spike)"]
    v = scan_verdict({"anomaly_fraction": 0.01}, None)
    assert v["score"] == "anomaly_fraction" and v["reasons"] == []


def test_scan_links_land_on_the_scan_and_lead_back(group_run):
    dv, _ = group_run
    group = (dv.root / "group_T1w.html").read_text()
    hrefs = re.findall(r'<a href="(sub-[^"#]+\.html)#([^"]+)">', group)
    assert len(hrefs) >= 14
    for page, anchor in hrefs:
        html = (dv.root / page).read_text()
        assert f'id="{anchor}"' in html
        sec = html[html.index(f'id="{anchor}"'):]
        back = re.search(r'<a href="group_T1w\.html#(row-[^"]+)">', sec)
        assert back and f'id="{back.group(1)}"' in group
    # the hostile acquisition label makes a safe anchor that still matches
    evil = next(s for s in dv.scans if EVIL in s.bids_name)
    assert re.fullmatch(r"scan-[A-Za-z0-9_.-]+", scan_anchor(evil.bids_name))
    assert f'id="{scan_anchor(evil.bids_name)}"' in (dv.root / "sub-06.html").read_text()


def test_mosaic_slices_cut_through_the_head_in_a_noisy_field_of_view():
    """A real scan's background is noise everywhere: every tile must still show head."""
    rng = np.random.default_rng(0)
    shape = (90, 100, 80)
    g = np.indices(shape)
    head = sum(((g[i] - c) / r) ** 2 for i, (c, r) in enumerate(zip((45, 40, 45), (22, 25, 20)))) <= 1
    scan = np.abs(rng.normal(0, 8, shape)) + np.where(head, 300.0, 0.0)
    found = head_mask(scan)
    assert found[45, 40, 45] and not found[2, 2, 2]
    slices, _, _ = choose_slices(None, found)
    for ax in range(3):
        assert len(slices[ax]) == 5
        for k in slices[ax]:
            assert np.take(head, k, axis=ax).any(), (ax, k)
    # the error map (written inside the brain only) decides when there is one
    err = np.where(head, 1.0, 0.0)
    assert (head_mask(scan, err) == head).all()
