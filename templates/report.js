/* itermask-qc reports: table sort/filter (group page) and ratings (subject pages).
   Vanilla JS, no network. Ratings live in localStorage under one key for all pages of
   this browser/origin and download as a TSV: bids_name, rating, artifacts, comment,
   rater, timestamp. */
(function () {
  "use strict";
  var KEY = "itermask-qc-ratings:v1";
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
    if (!sets.length) { return; }
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
      btn.addEventListener("click", function () {
        var stamp = new Date().toISOString().replace(/[:.]/g, "").slice(0, 15);
        download(ratingsTsv(loadAll()), "itermask-qc_ratings_" + stamp + ".tsv");
      });
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

  // exposed for tests and power users (e.g. console: itermaskQC.ratingsTsv())
  window.itermaskQC = { ratingsTsv: function () { return ratingsTsv(loadAll()); } };

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
