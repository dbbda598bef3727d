// A small line chart on <canvas> (our own: a chart library would be the largest file shipped, for this).
// Points are decimated per pixel column (first, min, max, last), so 10k steps draw as fast as 1k.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];

function niceTicks(lo, hi, count) {
  if (!isFinite(lo) || !isFinite(hi)) return [];
  if (hi === lo) { hi = lo + 1; }
  const raw = (hi - lo) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(Math.round(v * 1000) / 1000);
}

// Reduce points to at most ~4 per pixel column of the plot area.
function decimate(points, x0, x1, width) {
  if (points.length <= width * 4) return points;
  const out = [];
  let col = -1, bucket = [];
  const flush = () => {
    if (!bucket.length) return;
    let lo = bucket[0], hi = bucket[0];
    for (const p of bucket) { if (p[1] < lo[1]) lo = p; if (p[1] > hi[1]) hi = p; }
    const keep = [bucket[0], lo, hi, bucket[bucket.length - 1]];
    keep.sort((a, b) => a[0] - b[0]);
    for (const p of keep) if (out[out.length - 1] !== p) out.push(p);
  };
  for (const p of points) {
    const c = Math.floor(((p[0] - x0) / (x1 - x0 || 1)) * width);
    if (c !== col) { flush(); bucket = []; col = c; }
    bucket.push(p);
  }
  flush();
  return out;
}

// series: [{name, points: [[x, y], ...], color?, dashed?, markers?}]. Returns the number of points drawn.
function drawChart(canvas, series, options = {}) {
  const ratio = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 600, cssH = canvas.clientHeight || 240;
  canvas.width = cssW * ratio;
  canvas.height = cssH * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const pad = { left: 56, right: 12, top: 24, bottom: 28 };
  const w = cssW - pad.left - pad.right, h = cssH - pad.top - pad.bottom;
  const all = series.flatMap((s) => s.points);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#374151";
  if (options.title) ctx.fillText(options.title, pad.left, 14);
  if (!all.length) {
    ctx.fillStyle = "#9ca3af";
    ctx.fillText("no data yet", pad.left + w / 2 - 30, pad.top + h / 2);
    canvas.dataset.points = "0";
    return 0;
  }
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const margin = (y1 - y0) * 0.05; y0 -= margin; y1 += margin;
  const X = (x) => pad.left + ((x - x0) / (x1 - x0)) * w;
  const Y = (y) => pad.top + h - ((y - y0) / (y1 - y0)) * h;
  ctx.strokeStyle = "#e5e7eb"; ctx.lineWidth = 1; ctx.fillStyle = "#6b7280";
  for (const t of niceTicks(y0, y1, 4)) {
    ctx.beginPath(); ctx.moveTo(pad.left, Y(t)); ctx.lineTo(pad.left + w, Y(t)); ctx.stroke();
    ctx.fillText(fmt(t), 4, Y(t) + 4);
  }
  for (const t of niceTicks(x0, x1, 6)) {
    ctx.fillText(fmt(t), X(t) - 8, pad.top + h + 16);
  }
  ctx.strokeStyle = "#9ca3af";
  ctx.strokeRect(pad.left, pad.top, w, h);
  let drawn = 0, legendX = pad.left + (options.title ? ctx.measureText(options.title).width + 16 : 0);
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const pts = decimate(s.points, x0, x1, w);
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 1.5;
    ctx.setLineDash(s.dashed ? [5, 3] : []);
    ctx.beginPath();
    pts.forEach((p, k) => (k ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    if (s.markers || pts.length === 1) {
      for (const p of pts) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 2 * Math.PI); ctx.fill(); }
    }
    ctx.setLineDash([]);
    drawn += pts.length;
    ctx.fillRect(legendX, 7, 10, 3);
    ctx.fillStyle = "#374151";
    ctx.fillText(s.name, legendX + 14, 14);
    legendX += ctx.measureText(s.name).width + 28;
  });
  canvas.dataset.points = String(drawn);
  canvas.dataset.series = series.map((s) => s.name).join(",");
  return drawn;
}

window.vlmChart = { drawChart, decimate, COLORS };
