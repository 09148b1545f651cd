"use strict";
// Wires the report's controls; Plotly draws. The data: #cb-summary (always parsed) and one
// payload per image (parsed, or loaded from images/<k>.js, when the image is opened).
const CB = JSON.parse(document.getElementById("cb-summary").textContent);
const cache = {}, waiting = {};
const PAIR = "__pair__", ALL = "__all__";
const state = {image: 0, model: ALL, focus: null};
const $ = (id) => document.getElementById(id);

function cbRegister(k, payload) {  // called by images/<k>.js in the folder layout
  cache[k] = payload;
  if (waiting[k]) { waiting[k](payload); delete waiting[k]; }
}

function loadImage(k) {
  if (cache[k]) return Promise.resolve(cache[k]);
  if (CB.split === "inline") {
    cache[k] = JSON.parse($("cb-img-" + k).textContent);
    return Promise.resolve(cache[k]);
  }
  return new Promise((resolve, reject) => {
    waiting[k] = resolve;
    const s = document.createElement("script");
    s.src = "images/" + k + ".js";
    s.onerror = () => reject(new Error("cannot load images/" + k + ".js"));
    document.head.appendChild(s);
  });
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(Math.abs(v) >= 100 ? 1 : 4);
  return String(v);
}

// A table whose header sorts it; onRow(row) makes rows clickable.
function fillTable(el, cols, rows, onRow, sortCol, desc) {
  el.innerHTML = "";
  const head = el.insertRow();
  cols.forEach((c, j) => {
    const th = document.createElement("th");
    th.textContent = c;
    if (j === sortCol) th.className = desc ? "desc" : "asc";
    th.onclick = () => fillTable(el, cols, rows, onRow, j, j === sortCol ? !desc : true);
    head.appendChild(th);
  });
  let sorted = rows;
  if (sortCol !== undefined && sortCol !== null) {
    const key = (r) => r.cells[sortCol];
    sorted = rows.slice().sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      const r = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return desc ? -r : r;
    });
  }
  sorted.forEach((r) => {
    const tr = el.insertRow();
    r.cells.forEach((v) => { tr.insertCell().textContent = fmt(v); });
    if (onRow) { tr.className = "click"; tr.onclick = () => onRow(r); }
  });
}

function options(sel, items) {
  sel.innerHTML = "";
  items.forEach(([value, text]) => { const o = document.createElement("option"); o.value = value; o.textContent = text; sel.appendChild(o); });
}

// ---- image browser -------------------------------------------------------------------------
function pairModels() { return [$("pair-a").value, $("pair-b").value]; }

function shownModels() {
  if (state.model === ALL) return CB.models;
  if (state.model === PAIR) return pairModels();
  return [state.model];
}

const OUTCOMES = Object.keys(CB.colors);

// The hover text and colour of each point of a panel, from the payload's compact columns.
function hoverPoints(q, isGt) {
  const P = q.pts, f = (v) => (v === null || v === undefined ? "-" : v.toFixed(2));
  if (isGt) return {
    text: P.k.map((k, j) => "gt " + k + " · " + (CB.classes[P.c[j]] || "cell") + " · area " + P.a[j] + " px"),
    color: P.k.map((k) => CB.gt_colors[k % CB.gt_colors.length])};
  return {
    text: P.k.map((k, j) => {
      const o = OUTCOMES[P.o[j]];
      if (o === "missed") return "gt " + k + " · missed · best IoU " + f(P.i[j]) + " · area " + P.a[j] + " px";
      return "pred " + k + " · " + o.replace("_", " ") + " · IoU " + f(P.i[j]) + " · score " + f(P.s[j]) +
        " · area " + P.a[j] + " px" + (P.p[j] >= 0 ? " · gt " + P.p[j] : "");
    }),
    color: P.o.map((o) => CB.colors[OUTCOMES[o]])};
}

function panelTraces(p, q, k, showOv) {
  const ax = k ? String(k + 1) : "", xa = "x" + ax, ya = "y" + ax;
  const dx = p.w / p.tw, dy = p.h / p.th;
  const img = (src, name) => ({type: "image", source: src, x0: dx / 2, y0: dy / 2, dx: dx, dy: dy,
    xaxis: xa, yaxis: ya, hoverinfo: "skip", name: name});
  const traces = [img(p.img, "image")];
  if (showOv) traces.push(img(q.ov, "masks"));
  const h = hoverPoints(q, k === 0);
  traces.push({type: "scatter", mode: "markers", x: q.pts.x, y: q.pts.y, text: h.text, xaxis: xa, yaxis: ya,
    hovertemplate: "%{text}<extra></extra>", marker: {size: 5, color: h.color, line: {width: 0.5, color: "#fff"}}});
  if (state.focus) traces.push({type: "scatter", mode: "markers", x: [state.focus.x], y: [state.focus.y],
    xaxis: xa, yaxis: ya, hoverinfo: "skip", marker: {size: 28, color: "rgba(0,0,0,0)", line: {width: 2, color: "#ff0"}}});
  return traces;
}

function browserFigure(p, meta) {
  const names = shownModels();
  const panels = [{q: p.gt, title: "ground truth · " + meta.n_gt + " cells"}].concat(names.map((m) => {
    const s = meta.m[m] || {};
    return {q: p.models[m], title: m + " · score " + fmt(s.score)};
  }));
  const n = panels.length, ncol = Math.min(n, 3), nrow = Math.ceil(n / ncol), gap = 0.01;
  const panelW = (document.body.clientWidth || 1200) / ncol;
  const layout = {showlegend: false, hovermode: "closest", dragmode: "zoom", annotations: [],
    margin: {l: 5, r: 5, t: 25, b: 5}, height: nrow * (panelW * p.h / p.w + 30)};
  let data = [];
  const showOv = $("show-ov").checked;
  const f = state.focus, half = Math.max(p.w, p.h) / 8;
  panels.forEach((panel, k) => {
    const ax = k ? String(k + 1) : "", r = Math.floor(k / ncol), c = k % ncol;
    layout["xaxis" + ax] = {domain: [c / ncol + gap, (c + 1) / ncol - gap], anchor: "y" + ax, visible: false,
      range: f ? [f.x - half, f.x + half] : [0, p.w]};
    layout["yaxis" + ax] = {domain: [1 - (r + 1) / nrow + gap, 1 - r / nrow - 3 * gap], anchor: "x" + ax, visible: false,
      range: f ? [f.y + half, f.y - half] : [p.h, 0]};
    if (k) { layout["xaxis" + ax].matches = "x"; layout["yaxis" + ax].matches = "y"; }
    else layout.yaxis.scaleanchor = "x";
    layout.annotations.push({text: panel.title, showarrow: false, xref: "x" + ax + " domain", yref: "y" + ax + " domain",
      x: 0.5, y: 1, xanchor: "center", yanchor: "bottom", font: {size: 12}});
    if (panel.q) data = data.concat(panelTraces(p, panel.q, k, showOv));
  });
  return {data: data, layout: layout};
}

function showImage(k, model, focus) {
  state.image = k;
  if (model !== undefined) { state.model = model; $("model").value = model; }
  state.focus = focus || null;
  $("image").value = String(k);
  return loadImage(k).then((p) => {
    const fig = browserFigure(p, CB.images[k]);
    return Plotly.react("browser-plot", fig.data, fig.layout, {displaylogo: false, responsive: true});
  });
}

function initBrowser() {
  if (!CB.images.length) { $("browser").insertAdjacentHTML("beforeend", "<p>No images to show.</p>"); return; }
  options($("model"), [[ALL, "all models"]].concat(CB.models.map((m) => [m, m]),
    CB.models.length > 1 ? [[PAIR, "pair A vs B"]] : []));
  options($("image"), CB.images.map((im, k) => [String(k), im.id + " (" + im.cls + ")"]));
  $("model").onchange = () => showImage(state.image, $("model").value);
  $("image").onchange = () => showImage(Number($("image").value));
  $("prev").onclick = () => showImage((state.image + CB.images.length - 1) % CB.images.length);
  $("next").onclick = () => showImage((state.image + 1) % CB.images.length);
  $("show-ov").onchange = () => showImage(state.image, undefined, state.focus);
  $("legend").innerHTML = Object.entries(CB.colors).map(([k, c]) => "<span><i style='background:" + c + "'></i>" + k.replace("_", " ") + "</span>").join("");
  const rows = CB.images.map((im, k) => ({k: k, cells: [im.id, im.cls, im.n_gt].concat(CB.models.map((m) => (im.m[m] || {}).score))}));
  fillTable($("images"), ["image", "class", "cells"].concat(CB.models.map((m) => m + " score")), rows, (r) => showImage(r.k));
  showImage(0);
}

// ---- pair view -----------------------------------------------------------------------------
function pairData(a, b) {
  if (CB.pairs[a + "\t" + b]) return {d: CB.pairs[a + "\t" + b], swap: false};
  return {d: CB.pairs[b + "\t" + a], swap: true};
}

function renderPair() {
  const [a, b] = pairModels();
  if (a === b) { $("pair-msg").textContent = "choose two different models"; return; }
  $("pair-msg").textContent = "";
  const {d, swap} = pairData(a, b);
  const only = (r) => swap ? [r[3], r[2]] : [r[2], r[3]];
  const score = (k, m) => (CB.images[k].m[m] || {}).score;
  const imgRows = d.images.map((r) => ({k: r[0], cells: [CB.images[r[0]].id, CB.images[r[0]].cls, r[1], ...only(r),
    score(r[0], a), score(r[0], b), (score(r[0], a) ?? 0) - (score(r[0], b) ?? 0)]}));
  fillTable($("pair-images"), ["image", "class", "cells disagreeing", "only " + a, "only " + b, a + " score", b + " score", "Δ score"],
    imgRows, (r) => showImage(r.k, PAIR).then(() => $("browser").scrollIntoView()), 2, true);
  const cellRows = d.cells.map((c) => {
    const [ia, ib] = swap ? [c[3], c[2]] : [c[2], c[3]];
    return {k: c[0], x: c[4], y: c[5], cells: [CB.images[c[0]].id, c[1], ia, ib, Math.abs(ia - ib)]};
  });
  fillTable($("pair-cells"), ["image", "gt cell", "IoU " + a, "IoU " + b, "|Δ IoU|"], cellRows,
    (r) => showImage(r.k, PAIR, {x: r.x, y: r.y}).then(() => $("browser").scrollIntoView()), 4, true);
  const xs = CB.images.map((im, k) => score(k, a)), ys = CB.images.map((im, k) => score(k, b));
  Plotly.react("pair-plot", [
    {type: "scatter", mode: "markers", x: xs, y: ys, text: CB.images.map((im) => im.id), customdata: CB.images.map((im, k) => k),
      hovertemplate: "%{text}<br>" + a + " %{x:.3f} · " + b + " %{y:.3f}<extra></extra>", marker: {size: 8}},
    {type: "scatter", mode: "lines", x: [0, 1], y: [0, 1], hoverinfo: "skip", line: {dash: "dot", color: "#999"}}],
    {title: {text: "Per-image Kaggle score (click a point to open the image)"}, showlegend: false, height: 420,
      xaxis: {title: {text: a}, range: [0, 1]}, yaxis: {title: {text: b}, range: [0, 1], scaleanchor: "x"}},
    {displaylogo: false, responsive: true}).then((el) => {
    el.removeAllListeners && el.removeAllListeners("plotly_click");
    el.on("plotly_click", (ev) => { const pt = ev.points.find((q) => q.customdata !== undefined); if (pt) showImage(pt.customdata, PAIR); });
  });
  if (state.model === PAIR) showImage(state.image, PAIR);
}

function initPair() {
  if (CB.models.length < 2) { $("pair-msg").textContent = "needs two models with predictions on the same split"; return; }
  const items = CB.models.map((m) => [m, m]);
  options($("pair-a"), items); options($("pair-b"), items);
  $("pair-b").value = CB.models[1];
  $("pair-a").onchange = renderPair; $("pair-b").onchange = renderPair;
  renderPair();
}

// ---- leaderboard, charts, notes ----------------------------------------------------------
function initLeaderboard() {
  fillTable($("lb"), CB.leaderboard.cols, CB.leaderboard.rows.map((r) => ({cells: r})), null);
}

function initCharts() {
  CB.charts.forEach((spec, k) => {
    const div = document.createElement("div");
    div.id = "chart-" + k; div.className = "chart";
    $("chart-list").appendChild(div);
    Plotly.newPlot(div, spec.data, spec.layout, {displaylogo: false, responsive: true});
  });
}

function init() {
  $("notes").innerHTML = "";
  CB.notes.forEach((n) => { const p = document.createElement("p"); p.textContent = n; $("notes").appendChild(p); });
  initLeaderboard();
  initCharts();
  initBrowser();
  initPair();
  document.body.dataset.ready = "1";
}
init();
