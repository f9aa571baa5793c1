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


# --------------------------------------------------------------------------- overview
def _cards(html: str) -> list[dict]:
    from html.parser import HTMLParser

    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cards, self.cur, self.scripts = [], None, 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "script":
                self.scripts += 1
            if tag == "article" and "card" in a.get("class", ""):
                self.cur = {**a, "imgs": [], "links": []}
                self.cards.append(self.cur)
            elif self.cur is not None and tag == "img":
                self.cur["imgs"].append(a["src"])
            elif self.cur is not None and tag == "a":
                self.cur["links"].append(a["href"])

        def handle_endtag(self, tag):
            if tag == "article":
                self.cur = None

    p = P()
    p.feed(html)
    return p.cards, p.scripts


def test_overview_one_thumbnail_per_screened_scan_worst_first(group_run):
    import base64
    import io

    from PIL import Image

    dv, written = group_run
    index = dv.root / "index.html"
    assert index in written
    html = index.read_text()
    cards, scripts = _cards(html)
    assert sorted(c["data-bids-name"] for c in cards) == sorted(s.bids_name for s in dv.scans)
    for c in cards:
        sc = dv.by_name(c["data-bids-name"])
        if sc.kind == "failed":
            assert c["imgs"] == [] and c["data-failed"] == "1"
            continue
        assert len(c["imgs"]) == 1, c["data-bids-name"]  # exactly one thumbnail per screened scan
        im = Image.open(io.BytesIO(base64.b64decode(c["imgs"][0].split(",", 1)[1])))
        assert 100 <= im.size[0] <= 200 and np.unique(np.asarray(im.convert("L"))).size > 2
        # links land on the scan's section, and the rating view has the big figure on disk
        for href in set(c["links"]):
            page, _, anchor = href.partition("#")
            assert f'id="{anchor}"' in (dv.root / page).read_text()
        assert (dv.root / c["data-mosaic"]).is_file()
    # worst first per suffix, in the group table's order; failed scans last
    t1 = [c["data-bids-name"] for c in cards if c["data-suffix"] == "T1w"]
    table = list(_csv_rows(dv.root / "group_T1w.csv"))
    assert t1 == table and t1[:3] == ["sub-05_T1w", "sub-12_T1w", "sub-01_ses-2_run-1_T1w"]
    flagged = {n for n, r in _csv_rows(dv.root / "group_T1w.csv").items()
               if r["flagged"] == "1" or r["background_flagged"] == "1"}
    assert {c["data-bids-name"] for c in cards if c["data-flagged"] == "1" and c["data-suffix"] == "T1w"} == flagged
    # filters for site, flags, rating and failures exist without any network
    for el in ('id="ov-site"', 'value="flagged"', 'value="failed"', 'value="unrated"', 'value="rated"'):
        assert el in html
    assert "http://" not in html and "https://" not in html and scripts == 1


def test_overview_escapes_hostile_names(group_run):
    dv, _ = group_run
    html = (dv.root / "index.html").read_text()
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_hostile_site_name_is_escaped_everywhere(derivs):
    import json

    hostile = '"><img src=x onerror=alert(2)>'
    for sc in derivs.scans:
        if sc.site == "B":
            d = json.loads(sc.qc_path.read_text())
            d["metadata"] = {"site": hostile}
            sc.qc_path.write_text(json.dumps(d))
    run_group(derivs.root)
    for page in ["index.html", "group_T1w.html", "sub-12.html"]:
        html = (derivs.root / page).read_text()
        assert hostile not in html and "<img src=x" not in html, page
        assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in html, page


# --------------------------------------------------------------------------- linked plots
def test_group_plots_link_every_scan_and_clip_nothing(derivs, with_quality):
    import xml.etree.ElementTree as ET

    # one scan far beyond the others: the axis must reach it
    with_quality(derivs, spikes={"sub-12_T1w": ("noise", 400.0)})
    run_group(derivs.root, labels=derivs.labels_tsv)
    html = (derivs.root / "group_T1w.html").read_text()
    table = _csv_rows(derivs.root / "group_T1w.csv")
    ok = {n for n, r in table.items() if r["status"] == "ok"}
    svgs = re.findall(r'<svg class="strip".*?</svg>', html, flags=re.S)
    assert len(svgs) >= 4  # ranking score, anomaly fraction, and each measurement
    for svg in svgs:
        root = ET.fromstring(svg)  # well-formed, every name escaped
        w, h = (float(v) for v in root.get("viewBox").split()[2:])
        links = root.findall("a")
        names = [a.find("circle").get("data-scan") for a in links]
        assert sorted(names) == sorted(ok), root.findtext("title")
        for a in links:
            dot = a.find("circle")
            assert 0 < float(dot.get("cy")) < h and 0 < float(dot.get("cx")) < w  # nothing clipped
            assert dot.get("data-scan") in dot.findtext("title")  # hover names it
            page, _, anchor = a.get("href").partition("#")
            assert f'id="{anchor}"' in (derivs.root / page).read_text()  # click opens its report
    # the score plot marks the flagged scans and the shared site-z threshold
    score = ET.fromstring(svgs[0])
    flagged = {a.find("circle").get("data-scan") for a in score.findall("a")
               if "flag" in a.find("circle").get("class")}
    assert flagged == {n for n in ok if table[n]["flagged"] == "1" or table[n]["background_flagged"] == "1"}
    assert "sub-12_T1w" in flagged and score.find("line[@class='thr']") is not None
    # rated artifacts are ringed; the rating's artifact tags reach the table
    assert 'class="ok art"' in html or 'class="flag art"' in html
    assert table["sub-01_ses-2_run-1_T1w"]["rated_artifacts"] == "metal/susceptibility; motion"


def test_background_driven_scan_shows_the_air_first(derivs, with_quality):
    with_quality(derivs, spikes={"sub-05_T1w": ("background_artifact_fraction", 0.3)})
    run_group(derivs.root)
    sec = _section((derivs.root / "sub-05.html").read_text(), "sub-05_T1w")
    air, overlay = sec.find('class="mosaic air"'), sec.find('class="overlay"')
    assert 0 < air < overlay
    # a scan driven by something else keeps the background view folded after the mosaic
    sec = _section((derivs.root / "sub-02.html").read_text(), "sub-02_T1w")
    assert 'class="mosaic air"' not in sec and sec.find('<details class="mosaic">') > sec.find('class="overlay"')


def test_air_window_shows_a_faint_ghost():
    from qc_pipeline.reports import air_window

    shape = (40, 40, 40)
    head = np.zeros(shape, bool)
    head[12:28, 12:28, 12:28] = True
    scan = np.where(head, 1000.0, 15.0)      # noise floor 1.5 % of the brain
    scan[2:8, 12:28, 12:28] = 80.0           # a ghost at 8 %
    lo, hi = air_window(scan, head)
    assert (80.0 - lo) / (hi - lo) > 0.4 and (15.0 - lo) / (hi - lo) < 0.15


def test_verdict_is_drawn_against_the_site(derivs, with_quality):
    with_quality(derivs, spikes={"sub-05_T1w": ("background_artifact_fraction", 0.3)})
    run_group(derivs.root)
    sec = _section((derivs.root / "sub-05.html").read_text(), "sub-05_T1w")
    plots = re.findall(r'<svg class="strip".*?</svg>', sec, flags=re.S)
    site_a = [s.bids_name for s in derivs.scans if s.suffix == "T1w" and s.site == "A" and s.kind != "failed"]
    assert len(plots) == 2 and "background_artifact_fraction" in plots[1]
    for svg in plots:
        assert sorted(re.findall(r'data-scan="([^"]+)"', svg)) == sorted(n.replace("<", "&lt;").replace(">", "&gt;")
                                                                        for n in site_a)
        assert re.search(r'class="flag me"[^>]*data-scan="sub-05_T1w"', svg)


def test_verdict_leads_with_the_flags_that_fired():
    data = {"qc_score": 2.0, "qc_score_driver": "axis_sharpness", "anomaly_fraction": 0.01}
    group = {"score": "qc_score_site", "score_value": 2.0, "driver": "axis_sharpness", "flagged": True,
             "background_flagged": False, "engine_flagged": True, "score_flagged": False}
    v = scan_verdict(data, group)
    assert v["reasons"][0].startswith("a region unlike the same place in this site's other scans")
    assert len(v["reasons"]) == 2 and "blurring along one axis" in v["reasons"][1]  # the ranking's driver, after
    v = scan_verdict(data, {**group, "score_flagged": True, "engine_flagged": False})
    assert v["reasons"] == ["blurring along one axis (thick slices or through-plane motion)"]
