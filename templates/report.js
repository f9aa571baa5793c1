/* itermask-qc reports: table sort/filter (group page), ratings (subject pages), filters
   and the keyboard rating mode (overview), linked plots (group page).
   Vanilla JS, no network. Ratings live in localStorage under the study's key (the body's
   data-ratings-key: every local page shares one storage) and export as a TSV:
   bids_name, rating, artifacts, comment, rater, timestamp. */
(function () {
  "use strict";
  var KEY = document.body.getAttribute("data-ratings-key") || "itermask-qc-ratings:v1";
  var RATER_KEY = "itermask-qc-rater:v1";
  var memory = {};          // fallback when localStorage is unavailable
  var storageOk = true;
  var errors = [];

  var consoleError = window.console && console.error;
  if (consoleError) {
    console.error = function () {
      errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
      writeSelfcheck();
      return consoleError.apply(console, arguments);
    };
  }

  window.addEventListener("error", function (ev) {
    errors.push(String(ev.message || ev));
    writeSelfcheck();
  });

  function writeSelfcheck() {
    var el = document.getElementById("selfcheck");
    if (!el) { return; }
    el.textContent = errors.length ? "selfcheck:error: " + errors.join(" | ") : "selfcheck:ok";
    document.body.setAttribute("data-selfcheck", errors.length ? "error" : "ok");
  }

  function loadAll() {
    try {
      var raw = window.localStorage.getItem(KEY);
      return raw ? JSON.parse(raw) : {};
    } catch (e) {
      storageOk = false;
      return memory;
    }
  }

  function saveAll(all) {
    memory = all;
    try {
      window.localStorage.setItem(KEY, JSON.stringify(all));
    } catch (e) {
      storageOk = false;
    }
  }

  function getRater() {
    try { return window.localStorage.getItem(RATER_KEY) || ""; } catch (e) { return memory.__rater || ""; }
  }

  function setRater(v) {
    try { window.localStorage.setItem(RATER_KEY, v); } catch (e) { memory.__rater = v; }
  }

  function clean(v) {
    return String(v == null ? "" : v).replace(/[\t\r\n]+/g, " ").trim();
  }

  function ratingsTsv(all) {
    var lines = ["bids_name\trating\tartifacts\tcomment\trater\ttimestamp"];
    Object.keys(all).sort().forEach(function (name) {
      if (name.indexOf("__") === 0) { return; }
      var r = all[name];
      if (!r || !r.rating && !(r.artifacts && r.artifacts.length) && !r.comment) { return; }
      lines.push([clean(name), clean(r.rating), clean((r.artifacts || []).join(";")), clean(r.comment),
                  clean(r.rater), clean(r.timestamp)].join("\t"));
    });
    return lines.join("\n") + "\n";
  }

  function download(text, filename) {
    var blob = new Blob([text], { type: "text/tab-separated-values;charset=utf-8" });
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = filename;
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(url); a.remove(); }, 0);
  }

  function exportRatings() {
    var stamp = new Date().toISOString().replace(/[:.]/g, "").slice(0, 15);
    var who = clean(getRater()).replace(/[^A-Za-z0-9_-]+/g, "") || "rater";
    download(ratingsTsv(loadAll()), "itermask-qc_ratings_" + who + "_" + stamp + ".tsv");
  }

  function readControl(fs) {
    var checked = fs.querySelector("input[type=radio]:checked");
    var arts = [];
    fs.querySelectorAll("input[type=checkbox]:checked").forEach(function (c) { arts.push(c.value); });
    return { rating: checked ? checked.value : "", artifacts: arts,
             comment: fs.querySelector("textarea").value };
  }

  function showState(fs, r) {
    var s = fs.querySelector(".saved");
    var rated = r && (r.rating || (r.artifacts && r.artifacts.length) || r.comment);
    fs.classList.toggle("rated", !!rated);
    if (s) { s.textContent = rated ? "saved " + (r.timestamp || "") + (storageOk ? "" : " (memory only: download before closing)") : ""; }
  }

  function initRatings() {
    var sets = document.querySelectorAll("fieldset.rating");
    var all = loadAll();
    var rater = document.getElementById("rater");
    if (rater) {
      rater.value = getRater();
      rater.addEventListener("change", function () { setRater(rater.value); });
    }
    sets.forEach(function (fs) {
      var name = fs.getAttribute("data-bids-name");
      var r = all[name];
      if (r) {
        fs.querySelectorAll("input[type=radio]").forEach(function (i) { i.checked = (i.value === r.rating); });
        fs.querySelectorAll("input[type=checkbox]").forEach(function (c) {
          c.checked = (r.artifacts || []).indexOf(c.value) >= 0;
        });
        fs.querySelector("textarea").value = r.comment || "";
      }
      showState(fs, r);
      var onChange = function () {
        var cur = loadAll();
        var v = readControl(fs);
        v.rater = rater ? rater.value : "";
        v.timestamp = new Date().toISOString();
        cur[name] = v;
        saveAll(cur);
        showState(fs, v);
      };
      fs.addEventListener("change", onChange);
    });
    var btn = document.getElementById("download-ratings");
    if (btn) {
      btn.addEventListener("click", exportRatings);
    }
    if (!storageOk) {
      var st = document.getElementById("ratings-status");
      if (st) { st.textContent = "This browser blocks local storage for files: ratings are kept until the page closes; download them before leaving."; }
    }
  }

  function cellValue(td, type) {
    var v = td.hasAttribute("data-v") ? td.getAttribute("data-v") : td.textContent.trim();
    if (type === "num") {
      var f = parseFloat(v);
      return isNaN(f) ? null : f;
    }
    return v.toLowerCase();
  }

  function initTable() {
    var table = document.getElementById("ranking");
    if (!table) { return; }
    var tbody = table.tBodies[0];
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.addEventListener("click", function () {
        var type = th.getAttribute("data-type") || "text";
        var asc = !th.classList.contains("sorted-asc");
        Array.prototype.forEach.call(heads, function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
        th.classList.add(asc ? "sorted-asc" : "sorted-desc");
        var rows = Array.prototype.slice.call(tbody.rows);
        rows.sort(function (a, b) {
          var x = cellValue(a.cells[col], type), y = cellValue(b.cells[col], type);
          if (x === null && y === null) { return 0; }
          if (x === null) { return 1; }           // empty (failed) always last
          if (y === null) { return -1; }
          var c = x < y ? -1 : (x > y ? 1 : 0);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { tbody.appendChild(r); });
      });
    });
    var text = document.getElementById("filter-text");
    var site = document.getElementById("filter-site");
    var flagged = document.getElementById("filter-flagged");
    var bgflagged = document.getElementById("filter-bgflagged");
    var failed = document.getElementById("filter-failed");
    var count = document.getElementById("row-count");
    function apply() {
      var q = (text && text.value || "").toLowerCase();
      var s = site ? site.value : "";
      var n = 0;
      Array.prototype.forEach.call(tbody.rows, function (r) {
        var show = (!q || r.textContent.toLowerCase().indexOf(q) >= 0) &&
                   (!s || r.getAttribute("data-site") === s) &&
                   (!flagged || !flagged.checked || r.getAttribute("data-flagged") === "1") &&
                   (!bgflagged || !bgflagged.checked || r.getAttribute("data-bgflagged") === "1") &&
                   (!failed || !failed.checked || r.getAttribute("data-failed") === "1");
        r.classList.toggle("hidden", !show);
        if (show) { n += 1; }
      });
      if (count) { count.textContent = n + " of " + tbody.rows.length + " scans shown"; }
    }
    [text, site, flagged, bgflagged, failed].forEach(function (el) {
      if (el) { el.addEventListener("input", apply); el.addEventListener("change", apply); }
    });
    apply();
  }

  // the anomaly overlay's opacity (subject pages): the plain mosaic lies underneath
  function initOverlays() {
    document.querySelectorAll("figure.mosaic label.opacity input").forEach(function (range) {
      var img = range.closest("figure").querySelector("img.overlay");
      range.addEventListener("input", function () { img.style.opacity = String(range.value / 100); });
    });
  }

  // ------------------------------------------------------------------ overview
  var overview = null;   // state of the overview page (null on other pages)

  function isRated(r) { return !!(r && r.rating); }

  function visibleCards() {
    return overview.cards.filter(function (c) { return !c.classList.contains("hidden"); });
  }

  function markCards() {
    var all = loadAll();
    var n = 0;
    overview.cards.forEach(function (c) {
      var r = all[c.getAttribute("data-bids-name")];
      var rated = isRated(r);
      if (rated) { n += 1; }
      c.classList.toggle("rated", rated);
      c.setAttribute("data-rated", rated ? "1" : "0");
      var el = c.querySelector(".myrating");
      if (el) {
        el.textContent = rated ? "your rating: " + r.rating +
          (r.artifacts && r.artifacts.length ? " (" + r.artifacts.join(", ") + ")" : "") : "";
      }
    });
    var p = document.getElementById("progress");
    if (p) { p.textContent = n + " of " + overview.cards.length + " rated"; }
    return n;
  }

  function applyFilters() {
    var f = overview.filters;
    var q = (f.text && f.text.value || "").toLowerCase();
    var site = f.site ? f.site.value : "";
    var show = f.show ? f.show.value : "";
    var rated = f.rated ? f.rated.value : "";
    var n = 0;
    overview.cards.forEach(function (c) {
      var ok = (!q || c.getAttribute("data-bids-name").toLowerCase().indexOf(q) >= 0) &&
        (!site || c.getAttribute("data-site") === site) &&
        (show !== "flagged" || c.getAttribute("data-flagged") === "1") &&
        (show !== "unflagged" || (c.getAttribute("data-flagged") === "0" && c.getAttribute("data-failed") === "0")) &&
        (show !== "failed" || c.getAttribute("data-failed") === "1") &&
        (rated !== "rated" || c.getAttribute("data-rated") === "1") &&
        (rated !== "unrated" || c.getAttribute("data-rated") !== "1");
      c.classList.toggle("hidden", !ok);
      if (ok) { n += 1; }
    });
    var count = document.getElementById("ov-count");
    if (count) { count.textContent = n + " of " + overview.cards.length + " scans shown"; }
  }

  function currentCard() {
    return overview.order[overview.pos] || null;
  }

  function showCurrent(message) {
    var c = currentCard();
    var view = overview.view;
    if (!c) { closeRater("nothing to rate with these filters"); return; }
    var name = c.getAttribute("data-bids-name");
    var r = loadAll()[name] || {};
    view.querySelector("#rv-name").textContent = name;
    view.querySelector("#rv-pos").textContent = "scan " + (overview.pos + 1) + " of " + overview.order.length +
      " shown; " + markCards() + " of " + overview.cards.length + " rated";
    view.querySelector("#rv-open").setAttribute("href", c.getAttribute("data-href"));
    var img = view.querySelector("#rv-img");
    var thumb = c.querySelector("img");
    img.setAttribute("src", c.getAttribute("data-mosaic") || (thumb ? thumb.getAttribute("src") : ""));
    var info = c.querySelector(".cardtext .small");
    var mine = c.querySelector(".myrating");
    var text = info ? info.textContent.replace(mine ? mine.textContent : "", "") : "";
    view.querySelector("#rv-verdict").textContent = text.replace(/\s+/g, " ").trim();
    view.querySelectorAll("input[name=rv-rating]").forEach(function (i) { i.checked = (i.value === r.rating); });
    view.querySelectorAll(".rv-tags input").forEach(function (i) {
      i.checked = (r.artifacts || []).indexOf(i.value) >= 0;
      var hint = (c.getAttribute("data-tags") || "").split(";").indexOf(i.value) >= 0;
      i.parentNode.classList.toggle("hint", hint);
    });
    view.querySelector("#rv-comment").value = r.comment || "";
    var msg = view.querySelector("#rv-message");
    msg.textContent = message || "";
    msg.className = message === "saved" ? "muted small" : "err small";
    c.scrollIntoView({ block: "nearest" });
    try { window.localStorage.setItem(KEY + ":position", name); } catch (e) { /* memory only */ }
  }

  function saveCurrent() {
    var c = currentCard();
    if (!c) { return; }
    var view = overview.view;
    var checked = view.querySelector("input[name=rv-rating]:checked");
    var arts = [];
    view.querySelectorAll(".rv-tags input:checked").forEach(function (i) { arts.push(i.value); });
    var all = loadAll();
    all[c.getAttribute("data-bids-name")] = {
      rating: checked ? checked.value : "", artifacts: arts, comment: view.querySelector("#rv-comment").value,
      rater: getRater(), timestamp: new Date().toISOString() };
    saveAll(all);
    showCurrent("saved");
  }

  function openRater() {
    overview.order = visibleCards();
    if (!overview.order.length) { return; }
    var all = loadAll();
    var last = null;
    try { last = window.localStorage.getItem(KEY + ":position"); } catch (e) { last = null; }
    var pos = -1;
    overview.order.forEach(function (c, i) { if (pos < 0 && c.getAttribute("data-bids-name") === last) { pos = i; } });
    if (pos < 0 || isRated(all[last])) {   // resume at the first unrated scan after the last one
      var start = Math.max(pos, 0);
      pos = -1;
      for (var i = 0; i < overview.order.length; i += 1) {
        var j = (start + i) % overview.order.length;
        if (!isRated(all[overview.order[j].getAttribute("data-bids-name")])) { pos = j; break; }
      }
      if (pos < 0) { pos = 0; }
    }
    overview.pos = pos;
    overview.view.hidden = false;
    document.body.classList.add("rating-mode");
    showCurrent("");
  }

  function closeRater(message) {
    overview.view.hidden = true;
    document.body.classList.remove("rating-mode");
    var st = document.getElementById("ratings-status");
    if (st && message) { st.textContent = message; }
    applyFilters();
  }

  function say(text) {
    var msg = overview.view.querySelector("#rv-message");
    msg.textContent = text;
    msg.className = "err small";
  }

  function move(step, force) {
    var c = currentCard();
    if (step > 0 && c && !force && !isRated(loadAll()[c.getAttribute("data-bids-name")])) {
      say("Not rated yet: press 1, 2 or 3 first (Shift+\u2192 skips it on purpose).");
      return;
    }
    var next = overview.pos + step;
    if (next < 0 || next >= overview.order.length) {
      say(next < 0 ? "This is the first scan." : "This is the last scan shown: " + markCards() + " of " +
        overview.cards.length + " rated. Export the TSV when you are done.");
      return;
    }
    overview.pos = next;
    showCurrent("");
  }

  function onKey(ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var t = ev.target;
    var typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && /^(text|search)$/.test(t.type)));
    var open = !overview.view.hidden;
    if (typing) {
      if (ev.key === "Escape") { t.blur(); if (t.id === "rv-comment") { saveCurrent(); } ev.preventDefault(); }
      return;
    }
    if (!open) {
      if (ev.key === "r" || ev.key === "R") { openRater(); ev.preventDefault(); }
      return;
    }
    var key = ev.key;
    var handled = true;
    if (key === "1" || key === "2" || key === "3") {
      var value = { 1: "good", 2: "questionable", 3: "bad" }[key];
      overview.view.querySelectorAll("input[name=rv-rating]").forEach(function (i) { i.checked = (i.value === value); });
      saveCurrent();
    } else if (key === "ArrowRight" || key === "j") {
      move(1, ev.shiftKey);
    } else if (key === "ArrowLeft" || key === "k") {
      move(-1, false);
    } else if (key === "/") {
      overview.view.querySelector("#rv-comment").focus();
    } else if (key === "Escape") {
      closeRater("");
    } else if (key === "o") {
      window.open(currentCard().getAttribute("data-href"), "_blank", "noopener");
    } else {
      var box = overview.view.querySelector(".rv-tags input[data-key='" + key.toLowerCase() + "']");
      if (box && key.length === 1) {
        box.checked = !box.checked;
        saveCurrent();
      } else {
        handled = false;
      }
    }
    if (handled) { ev.preventDefault(); }
  }

  function initOverview() {
    var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));
    var view = document.getElementById("rater-view");
    if (!cards.length || !view) { return; }
    overview = { cards: cards, view: view, order: [], pos: 0, filters: {
      text: document.getElementById("ov-text"), site: document.getElementById("ov-site"),
      show: document.getElementById("ov-show"), rated: document.getElementById("ov-rated") } };
    Object.keys(overview.filters).forEach(function (k) {
      var el = overview.filters[k];
      if (el) { el.addEventListener("input", applyFilters); el.addEventListener("change", applyFilters); }
    });
    markCards();
    applyFilters();
    document.getElementById("rate-start").addEventListener("click", function (ev) { ev.target.blur(); openRater(); });
    document.getElementById("rv-close").addEventListener("click", function () { closeRater(""); });
    view.querySelectorAll("input").forEach(function (i) { i.addEventListener("change", saveCurrent); });
    view.querySelector("#rv-comment").addEventListener("change", saveCurrent);
    document.addEventListener("keydown", onKey);
    window.addEventListener("storage", function () { markCards(); applyFilters(); });
  }

  // ------------------------------------------------------------------ linked plots
  function initPlots() {
    var dots = document.querySelectorAll("svg.strip [data-scan]");
    if (!dots.length) { return; }
    var label = document.getElementById("plot-highlight");
    var pinned = null;
    function highlight(name) {
      document.querySelectorAll("svg.strip .hl").forEach(function (d) { d.classList.remove("hl"); });
      document.querySelectorAll("table.ranking tr.hl").forEach(function (d) { d.classList.remove("hl"); });
      if (!name) { if (label) { label.textContent = ""; } return; }
      document.querySelectorAll("svg.strip [data-scan]").forEach(function (d) {
        if (d.getAttribute("data-scan") === name) { d.classList.add("hl"); }
      });
      document.querySelectorAll("table.ranking tr[data-bids-name]").forEach(function (r) {
        if (r.getAttribute("data-bids-name") === name) { r.classList.add("hl"); }
      });
      if (label) { label.textContent = name; }
    }
    dots.forEach(function (d) {
      d.addEventListener("mouseenter", function () { highlight(d.getAttribute("data-scan")); });
      d.addEventListener("mouseleave", function () { highlight(pinned); });
      d.addEventListener("focus", function () { highlight(d.getAttribute("data-scan")); });
    });
    document.querySelectorAll("table.ranking tr[data-bids-name]").forEach(function (r) {
      r.addEventListener("mouseenter", function () { pinned = r.getAttribute("data-bids-name"); highlight(pinned); });
    });
    // arriving from a subject page (#row-...): that scan is marked in every plot
    var row = window.location.hash.indexOf("#row-") === 0 ? document.getElementById(window.location.hash.slice(1)) : null;
    if (row) { pinned = row.getAttribute("data-bids-name"); highlight(pinned); }
  }

  // exposed for tests and power users (e.g. console: itermaskQC.ratingsTsv())
  window.itermaskQC = { ratingsTsv: function () { return ratingsTsv(loadAll()); }, key: KEY };

  // "#selftest" in the URL exercises sorting, filtering and the ratings store, then
  // writes "selftest:ok" or "selftest:fail: ..." into #selfcheck (used by the tests).
  function selftest() {
    var fails = [];
    var table = document.getElementById("ranking");
    if (table) {
      var tbody = table.tBodies[0];
      var heads = table.tHead.rows[0].cells;
      var col = -1;
      Array.prototype.forEach.call(heads, function (h, i) { if (/anomaly fraction/.test(h.textContent)) { col = i; } });
      heads[col].click();   // ascending
      var first = cellValue(tbody.rows[0].cells[col], "num");
      heads[col].click();   // descending
      var top = cellValue(tbody.rows[0].cells[col], "num");
      if (!(first <= top)) { fails.push("sort"); }
      var fl = document.getElementById("filter-flagged");
      fl.checked = true;
      fl.dispatchEvent(new Event("change"));
      var shown = Array.prototype.filter.call(tbody.rows, function (r) { return !r.classList.contains("hidden"); });
      var bad = shown.filter(function (r) { return r.getAttribute("data-flagged") !== "1"; });
      if (bad.length) { fails.push("filter"); }
      fl.checked = false;
      fl.dispatchEvent(new Event("change"));
    }
    if (overview) {
      var show = document.getElementById("ov-show");
      show.value = "flagged";
      show.dispatchEvent(new Event("change"));
      if (overview.cards.some(function (c) { return !c.classList.contains("hidden") && c.getAttribute("data-flagged") !== "1"; })) {
        fails.push("overview-filter");
      }
      show.value = "";
      show.dispatchEvent(new Event("change"));
      if (visibleCards().length !== overview.cards.length) { fails.push("overview-reset"); }
    }
    var range = document.querySelector("figure.mosaic label.opacity input");
    if (range) {
      range.value = "30";
      range.dispatchEvent(new Event("input"));
      if (range.closest("figure").querySelector("img.overlay").style.opacity !== "0.3") { fails.push("overlay-opacity"); }
    }
    var fs = document.querySelector("fieldset.rating");
    if (fs) {
      var before = loadAll();
      var radio = fs.querySelector("input[value=bad]");
      radio.checked = true;
      radio.dispatchEvent(new Event("change", { bubbles: true }));
      var tsv = ratingsTsv(loadAll());
      var name = fs.getAttribute("data-bids-name");
      if (tsv.indexOf(name + "\tbad\t") < 0) { fails.push("ratings"); }
      saveAll(before);
    }
    return fails.length ? "selftest:fail: " + fails.join(",") : "selftest:ok";
  }

  function init() {
    try {
      initRatings();
      initTable();
      initOverview();
      initPlots();
      initOverlays();
    } catch (e) {
      errors.push(String(e && e.message || e));
    }
    writeSelfcheck();
    if (window.location.hash === "#selftest") {
      var el = document.getElementById("selfcheck");
      var res;
      try { res = selftest(); } catch (e) { res = "selftest:fail: " + (e && e.message || e); }
      if (el) { el.textContent += " " + res; }
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
}());
