// vlmtune ui: a single page over the JSON API. The page keeps nothing of its own: every view is fetched
// again from the server (which reads the run dirs), so a reload shows the same thing.
"use strict";

const main = () => document.getElementById("main");
let timers = [];
let session = {};

function stopTimers() { timers.forEach(clearInterval); timers = []; }
function every(ms, fn) { timers.push(setInterval(fn, ms)); }

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function num(v, digits = 4) { return v === null || v === undefined ? "" : (typeof v === "number" ? String(+v.toPrecision(digits)) : esc(v)); }
function cookie(name) {
  const m = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return m ? decodeURIComponent(m.slice(name.length + 1)) : "";
}
function duration(s) {
  if (s === null || s === undefined) return "";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
function ago(t) { return t ? duration(Date.now() / 1000 - t) + " ago" : ""; }
function stateBadge(state) { return `<span class="state state-${esc(state)}" data-state="${esc(state)}">${esc(state)}</span>`; }

class ApiError extends Error {}

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: {} };
  if (options.body !== undefined) {
    init.method = options.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CSRF-Token"] = cookie("vlmtune_csrf");
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401 && path !== "/api/login") { showLogin(); throw new ApiError("log in first"); }
  const message = data.error && typeof data.error === "object" ? data.error.message : data.error;
  if (!response.ok) throw new ApiError(message || `${response.status} ${response.statusText}`);
  return data;
}

function showError(where, err) {
  where.insertAdjacentHTML("beforeend", `<p class="error">${esc(err.message || err)}</p>`);
}

// -- login ----------------------------------------------------------------------------------------------
function showLogin() {
  stopTimers();
  main().innerHTML = `<div class="card"><h1>Log in</h1>
    <p class="muted">This dashboard was started with a token (<code>--token</code> / VLMTUNE_UI_TOKEN).</p>
    <form id="login"><input type="password" id="token" placeholder="token" autocomplete="current-password">
    <button type="submit">Log in</button></form><div id="login-msg"></div></div>`;
  document.getElementById("login").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api("/api/login", { body: { token: document.getElementById("token").value } });
      route();
    } catch (err) { document.getElementById("login-msg").innerHTML = `<p class="error">${esc(err.message)}</p>`; }
  });
}

// -- runs -----------------------------------------------------------------------------------------------
async function runsView() {
  main().innerHTML = `<h1>Runs</h1><div id="runs"></div>
    <p><button id="compare" class="secondary" disabled>Compare selected</button></p>`;
  let shown = null;
  const draw = async () => {
    const data = await api("/api/runs");
    const key = JSON.stringify(data);
    if (key === shown) {  // nothing changed: keep the table (and what the user is clicking), refresh the ages
      document.querySelectorAll("td[data-updated]").forEach((td) => { td.textContent = ago(+td.dataset.updated); });
      return;
    }
    shown = key;
    const checked = new Set([...document.querySelectorAll("input.pick:checked")].map((c) => c.value));
    const rows = data.runs.map((r) => `<tr data-run="${esc(r.id)}">
      <td><input type="checkbox" class="pick" value="${esc(r.id)}" ${checked.has(r.id) ? "checked" : ""}></td>
      <td><a href="#/run?id=${encodeURIComponent(r.id)}">${esc(r.id)}</a></td>
      <td>${stateBadge(r.state)}${r.error ? ` <span class="muted" title="${esc(r.error)}">(${esc(r.error.slice(0, 60))})</span>` : ""}</td>
      <td class="num">${esc(r.step)}${r.max_steps ? " / " + esc(r.max_steps) : ""}</td>
      <td class="num">${duration(r.eta_s)}</td>
      <td class="num">${num(r.tokens_per_second)}</td>
      <td class="num">${num(r.loss)}</td>
      <td class="num">${num(r.eval_loss)}</td>
      <td class="muted" data-updated="${esc(r.updated || "")}">${ago(r.updated)}</td></tr>`).join("");
    document.getElementById("runs").innerHTML = data.runs.length
      ? `<table id="runs-table"><thead><tr><th></th><th>run</th><th>state</th><th class="num">step</th><th class="num">ETA</th>
         <th class="num">tokens/s</th><th class="num">loss</th><th class="num">eval loss</th><th>updated</th></tr></thead><tbody>${rows}</tbody></table>`
      : `<p class="muted">No run dirs under ${esc(data.roots.join(", ") || "(no --runs given)")}.</p>`;
    const update = () => {
      const picked = [...document.querySelectorAll("input.pick:checked")].map((c) => c.value);
      const button = document.getElementById("compare");
      button.disabled = picked.length < 2;
      button.onclick = () => { location.hash = "#/compare?ids=" + picked.map(encodeURIComponent).join(","); };
    };
    document.querySelectorAll("input.pick").forEach((c) => c.addEventListener("change", update));
    update();
  };
  await draw();
  every(2000, () => draw().catch(() => {}));
}

const PANELS = [
  { title: "loss", keys: ["loss", "eval_loss"] },
  { title: "learning rate", keys: ["lr"] },
  { title: "grad norm", keys: ["grad_norm"] },
  { title: "tokens/s", keys: ["tokens_per_second"] },
  { title: "padding ratio", keys: ["padding_ratio"] },
];

function panelsFor(series) {
  const known = new Set(PANELS.flatMap((p) => p.keys));
  const panels = PANELS.filter((p) => p.keys.some((k) => series[k] && series[k].length));
  const skip = /runtime|samples_per_second|steps_per_second|^train_loss$/;
  for (const key of Object.keys(series).sort()) {
    if (!known.has(key) && !skip.test(key)) panels.push({ title: key, keys: [key] });
  }
  return panels;
}

function drawPanels(container, series) {
  const panels = panelsFor(series);
  const ids = panels.map((p) => "chart-" + p.title.replace(/\W+/g, "_"));
  if (container.dataset.layout !== ids.join()) {
    container.innerHTML = panels.map((p, i) => `<div class="chart"><canvas id="${ids[i]}" data-title="${esc(p.title)}"></canvas></div>`).join("")
      || `<p class="muted">metrics.jsonl has no rows yet.</p>`;
    container.dataset.layout = ids.join();
  }
  panels.forEach((p, i) => {
    const lines = p.keys.filter((k) => series[k]).map((k) => ({ name: k, points: series[k], markers: k.startsWith("eval") }));
    window.vlmChart.drawChart(document.getElementById(ids[i]), lines, { title: p.title });
  });
}

async function runView(params) {
  const id = params.get("id");
  const metricsUrl = (offset) => `/api/run/metrics?id=${encodeURIComponent(id)}&offset=${offset}`;
  const firstMetrics = api(metricsUrl(0));  // fetched while the run's details are
  firstMetrics.catch(() => {});
  const run = await api("/api/run?id=" + encodeURIComponent(id));
  const data = run.data || {};
  const dataRow = (name, d) => d ? `<tr><td>${name}</td><td class="num">${esc(d.rows)}</td><td class="num">${esc(d.valid ?? "")}</td>
      <td class="num">${esc(d.invalid ?? "")}</td><td class="num">${esc(d.truncated ?? "")}</td><td class="num">${esc(d.tokens ?? "")}</td>
      <td class="num">${esc(d.longest ?? "")}</td><td class="muted">${esc(d.source)}</td></tr>` : "";
  main().innerHTML = `<h1>${esc(run.id)} <span id="run-state">${stateBadge(run.state)}</span></h1>
    <p class="muted">${esc(run.path)} · model ${esc(run.model)} · <span id="run-step"></span>
      · <a href="#/data?id=${encodeURIComponent(id)}">data as the model sees it</a></p>
    ${run.error ? `<p class="error">${esc(run.error)}</p>` : ""}
    ${run.state === "resumable" ? `<p class="warn">stopped with a complete checkpoint; continue it with <code>vlmtune train ${esc(run.path)}/config.yaml resume=auto</code></p>` : ""}
    <div id="charts" class="charts"></div>
    <h2>Data</h2>
    <table><thead><tr><th>split</th><th class="num">rows</th><th class="num">valid</th><th class="num">invalid</th><th class="num">truncated</th>
      <th class="num">tokens</th><th class="num">longest</th><th>source</th></tr></thead>
      <tbody>${dataRow("train", data.train)}${dataRow("eval", data.eval)}</tbody></table>
    <h2>Checkpoints</h2>
    <table><thead><tr><th>folder</th><th>complete</th><th class="num">files</th><th class="num">MB</th></tr></thead><tbody>
    ${run.checkpoints.map((c) => `<tr><td>${esc(c.name)}</td><td>${c.complete ? "yes" : "no (missing " + esc(c.missing.join(", ")) + ")"}</td>
      <td class="num">${c.files}</td><td class="num">${(c.bytes / 1e6).toFixed(2)}</td></tr>`).join("")}
    ${run.adapter ? `<tr><td>adapter/ (final)</td><td>yes</td><td></td><td></td></tr>` : ""}</tbody></table>
    <h2>Resolved config</h2><pre id="config">${esc(run.config_text)}</pre>`;
  const series = {};
  let offset = 0, state = run.state;
  const setStep = (s) => {
    document.getElementById("run-step").textContent =
      `step ${s.step}${s.max_steps ? " of " + s.max_steps : ""}${s.eta_s !== null && s.eta_s !== undefined ? " · ETA " + duration(s.eta_s) : ""}`;
  };
  setStep(run);
  let pending = firstMetrics, busy = false, again = false;
  const poll = async () => {
    // One read at a time (two reads from one offset would append the rows twice); a poll asked for
    // meanwhile runs right after, so the rows written just before the run ended are never missed.
    if (busy) { again = true; return; }
    busy = true;
    try {
      do {
        again = false;
        const m = await (pending || api(metricsUrl(offset)));
        pending = null;
        if (m.reset) for (const k of Object.keys(series)) delete series[k];
        for (const [k, pts] of Object.entries(m.series)) (series[k] = series[k] || []).push(...pts);
        offset = m.offset;
        if (m.rows || m.reset) drawPanels(document.getElementById("charts"), series);
      } while (again);
    } finally { pending = null; busy = false; }
  };
  await poll();
  drawPanels(document.getElementById("charts"), series);
  every(1000, async () => {
    if (state !== "running") return;
    await poll().catch(() => {});
  });
  every(2000, async () => {
    const s = (await api("/api/runs")).runs.find((r) => r.id === id);
    if (!s) return;
    setStep(s);
    if (s.state !== state) { state = s.state; document.getElementById("run-state").innerHTML = stateBadge(state); await poll(); }
  });
}

async function compareView(params) {
  const ids = params.get("ids");
  const data = await api("/api/compare?ids=" + encodeURIComponent(ids));
  const keys = [...new Set(Object.values(data.series).flatMap((s) => Object.keys(s)))]
    .filter((k) => ["loss", "eval_loss", "lr", "grad_norm", "tokens_per_second"].includes(k) || /padding/.test(k));
  const diffRows = Object.entries(data.config_diff).map(([k, values]) =>
    `<tr><td>${esc(k)}</td>${values.map((v) => `<td>${esc(JSON.stringify(v))}</td>`).join("")}</tr>`).join("");
  main().innerHTML = `<h1>Compare ${data.runs.length} runs</h1><div class="charts" id="overlay">
    ${keys.map((k) => `<div class="chart"><canvas id="cmp-${esc(k)}"></canvas></div>`).join("")}</div>
    <h2>Config differences</h2>
    ${diffRows ? `<table class="diff"><thead><tr><th>key</th>${data.runs.map((r) => `<th>${esc(r)}</th>`).join("")}</tr></thead><tbody>${diffRows}</tbody></table>`
      : `<p class="muted">The configs are the same (apart from output_dir).</p>`}`;
  for (const k of keys) {
    const lines = data.runs.filter((r) => data.series[r][k]).map((r) => ({ name: r, points: data.series[r][k], markers: k.startsWith("eval") }));
    window.vlmChart.drawChart(document.getElementById("cmp-" + k), lines, { title: k });
  }
}

// -- data view ------------------------------------------------------------------------------------------
async function dataView(params) {
  const id = params.get("id"), split = params.get("split") || "train";
  const start = parseInt(params.get("start") || "0", 10);
  main().innerHTML = `<h1>Data of ${esc(id)} (${esc(split)})</h1><p class="muted">rendering with the training collator…</p>`;
  const data = await api(`/api/run/data?id=${encodeURIComponent(id)}&split=${encodeURIComponent(split)}&start=${start}&count=4`);
  const rows = data.rows.map((r) => {
    const errors = r.errors.map((e) => `<p class="error">${esc(e)}</p>`).join("");
    if (!r.spans) return `<div class="card" data-row="${r.index}"><b>${esc(r.where)}</b>${errors}</div>`;
    const spans = r.spans.map((s) => {
      const cut = s.cut ? " tok-cut" : "";
      if (s.kind === "image") return `<span class="tok-image${cut}" title="${s.count} image tokens">${esc(data.image_token || "<image>")} ×${s.count}</span>`;
      return `<span class="tok-${s.kind}${cut}" title="tokens ${s.start}–${s.start + s.count - 1}">${esc(s.text)}</span>`;
    }).join("");
    return `<div class="card" data-row="${r.index}"><b>${esc(r.where)}</b>
      <span class="muted">· ${r.tokens} tokens · ${r.image_tokens} image tokens · ${r.supervised} supervised</span>
      ${r.warnings.map((w) => `<p class="warn">${esc(w)}</p>`).join("")}${errors}
      <div class="row-images">${r.images.map((im) => `<img src="${im.src}" alt="image ${im.width}×${im.height}" title="${im.width}×${im.height}">`).join("")}</div>
      <div class="tokens">${spans}</div>
      <details><summary class="muted">chat template output (before image expansion)</summary><pre>${esc(r.template)}</pre></details></div>`;
  }).join("");
  main().innerHTML = `<h1>Data of <a href="#/run?id=${encodeURIComponent(id)}">${esc(id)}</a> (${esc(split)})</h1>
    <p class="muted">${esc(data.file)} · loss on ${esc(data.loss_on)} · max_length ${esc(data.max_length ?? "none")}</p>
    <p class="legend"><span class="tok-label">supervised (label) tokens</span><span class="tok-image">image tokens</span>
      <span class="tok-text">prompt / template tokens</span><span class="tok-cut">cut by max_length</span></p>
    ${rows}
    <p>${start > 0 ? `<a href="#/data?id=${encodeURIComponent(id)}&split=${split}&start=${Math.max(0, start - 4)}">← previous</a> · ` : ""}
      <a href="#/data?id=${encodeURIComponent(id)}&split=${split}&start=${start + 4}">next →</a></p>`;
}

// -- adapters, gallery, merges ----------------------------------------------------------------------------
function inspectHtml(x) {
  const r = x.report, lora = r.lora || {}, vllm = r.vllm || {};
  const groups = Object.values(lora.groups || {}).map((g) =>
    `<tr><td>${esc(g.role)}</td><td class="num">${g.r}</td><td class="num">${g.alpha}</td><td class="num">${g.modules}</td><td>${esc(g.layers.join(", "))}</td></tr>`).join("");
  const fit = r.fit || {};
  return `<table class="kv"><tbody>
      <tr><td>format / family</td><td>${esc(r.format)} / ${esc(r.family)}</td></tr>
      <tr><td>made for</td><td>${esc(r.made_for)}</td></tr>
      <tr><td>fits ${esc(x.base || "")}</td><td>${fit.checked ? (fit.fits ? "yes" : `<span class="error">no: ${esc(fit.error)}</span>`) : esc(fit.note)}</td></tr>
      <tr><td>fully trained modules</td><td>${esc((r.full_modules?.modules || []).join(", ") || "none")}</td></tr>
      <tr><td>vLLM</td><td>${vllm.servable_as_is ? "servable as is: " + esc((vllm.flags || []).join(" ")) : "not as is: " + esc((vllm.problems || []).join(" "))}</td></tr>
      <tr><td>size</td><td>${r.size ? `${r.size.tensors} tensors, ${r.size.parameters} parameters` : ""}</td></tr>
    </tbody></table>
    <table><thead><tr><th>role</th><th class="num">r</th><th class="num">alpha</th><th class="num">modules</th><th>layers</th></tr></thead><tbody>${groups}</tbody></table>`;
}

async function adaptersView() {
  const data = await api("/api/adapters");
  main().innerHTML = `<h1>Adapters</h1>${data.adapters.length ? "" : `<p class="muted">No adapters: pass --adapter NAME=DIR (with --model) or --runs with finished runs.</p>`}
    <div id="adapter-list">${data.adapters.map((a) => `<div class="card" data-adapter="${esc(a.id)}">
      <b>${esc(a.name)}</b> <span class="muted">(${esc(a.source)}) ${esc(a.path)}</span>
      ${session.merge_dir && a.base ? `<form class="merge-form"><input type="text" name="name" value="${esc(a.name.replace(/[^A-Za-z0-9_.-]+/g, "-"))}-merged">
        <label><input type="checkbox" name="verify" checked> verify</label><button type="submit">Merge into ${esc(a.base.split("/").pop())}</button></form>` : ""}
      <div class="inspect muted">inspecting…</div></div>`).join("")}</div>`;
  for (const a of data.adapters) {
    const card = document.querySelector(`[data-adapter="${CSS.escape(a.id)}"]`);
    api("/api/adapter/inspect?id=" + encodeURIComponent(a.id))
      .then((x) => { card.querySelector(".inspect").outerHTML = `<div class="inspect">${inspectHtml(x)}</div>`; })
      .catch((err) => { card.querySelector(".inspect").outerHTML = `<p class="error">${esc(err.message)}</p>`; });
    const form = card.querySelector(".merge-form");
    if (form) form.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        await api("/api/merge", { body: { adapter: a.id, name: form.elements.name.value, verify: form.elements.verify.checked } });
        location.hash = "#/merges";
      } catch (err) { showError(card, err); }
    });
  }
}

async function galleryView() {
  const data = await api("/api/adapters");
  if (!data.engine.length) {
    main().innerHTML = `<h1>Side by side</h1><p class="muted">No model loaded: start with <code>vlmtune ui --model BASE --adapter NAME=DIR ...</code>.</p>`;
    return;
  }
  main().innerHTML = `<h1>Side by side</h1>
    <div class="card"><p>One image and prompt, answered by the base and each adapter in one batch of the engine (greedy; as <code>vlmtune predict</code>).</p>
      <p><input type="file" id="image" accept="image/png,image/jpeg,image/webp"> <img id="preview" class="thumb" alt="" hidden></p>
      <p><textarea id="prompt" placeholder="prompt, e.g. What colour is the shape?"></textarea></p>
      <p>${data.engine.map((n) => `<label><input type="checkbox" class="use" value="${esc(n)}" checked> ${esc(n)}</label>`).join("")}
        max new tokens <input type="text" id="max-new" value="32" size="4"></p>
      <p><button id="ask">Ask all</button> <span id="busy" class="muted"></span></p></div>
    <div id="answers" class="cards"></div>`;
  let image = null;
  document.getElementById("image").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (!file) { image = null; return; }
    const reader = new FileReader();
    reader.onload = () => { image = reader.result; const p = document.getElementById("preview"); p.src = image; p.hidden = false; };
    reader.readAsDataURL(file);
  });
  document.getElementById("ask").addEventListener("click", async () => {
    const adapters = [...document.querySelectorAll("input.use:checked")].map((c) => c.value);
    const out = document.getElementById("answers");
    document.getElementById("busy").textContent = "generating…";
    out.innerHTML = "";
    try {
      const result = await api("/api/generate", { body: {
        prompt: document.getElementById("prompt").value, image, adapters,
        max_new_tokens: parseInt(document.getElementById("max-new").value, 10) || 32 } });
      out.innerHTML = result.answers.map((a) => `<div class="card answer" data-adapter="${esc(a.adapter)}"><h3>${esc(a.adapter)}</h3>
        <div class="text">${esc(a.text)}</div><p class="muted">${a.generated_tokens} tokens · ${esc(a.finish_reason)}</p></div>`).join("");
    } catch (err) { showError(out, err); }
    document.getElementById("busy").textContent = "";
  });
}

async function mergesView() {
  const draw = async () => {
    const data = await api("/api/merges");
    if (!data.merge_dir) { main().innerHTML = `<h1>Merges</h1><p class="muted">Merging is off: start with <code>--merge-dir DIR</code>.</p>`; return false; }
    const jobs = data.jobs.map((j) => `<tr data-job="${esc(j.id)}"><td>${esc(j.name)}</td><td>${stateBadge(j.state)}</td>
      <td>${j.state === "running" ? `<span class="progress"><div></div></span> ${esc(j.phase)} (${j.shards_written.length} shard(s) written)` : esc(j.phase)}</td>
      <td>${j.error ? `<span class="error">${esc(j.error)}</span>` : `<pre>${esc(j.summary || "")}</pre>`}</td></tr>`).join("");
    const merged = data.merged.map((m) => {
      const v = m.manifest.verification || {};
      return `<tr><td>${esc(m.name)}</td><td>${esc((m.manifest.adapters || []).map((a) => a.path || a.name).join(", "))}</td>
        <td>${v.run === false ? "not verified" : v.passed ? `verified (max logit diff ${num(v.max_abs_logit_diff, 3)})` : "verification failed"}</td></tr>`;
    }).join("");
    main().innerHTML = `<h1>Merges</h1><p class="muted">into ${esc(data.merge_dir)}; start one from the Adapters page</p>
      <h2>Jobs</h2>${jobs ? `<table><thead><tr><th>name</th><th>state</th><th>progress</th><th>result</th></tr></thead><tbody>${jobs}</tbody></table>` : `<p class="muted">none since start-up</p>`}
      <h2>Merged folders</h2>${merged ? `<table><thead><tr><th>folder</th><th>adapters</th><th>verification</th></tr></thead><tbody>${merged}</tbody></table>` : `<p class="muted">none yet</p>`}`;
    return data.jobs.some((j) => j.state === "running");
  };
  if (await draw()) every(1000, () => draw().then((running) => { if (!running) stopTimers(); }).catch(() => {}));
}

// -- routing --------------------------------------------------------------------------------------------
const ROUTES = { "": runsView, run: runView, compare: compareView, data: dataView, adapters: adaptersView, gallery: galleryView, merges: mergesView };

async function route() {
  stopTimers();
  const hash = location.hash.replace(/^#\/?/, "");
  const [name, query] = hash.split("?");
  const view = ROUTES[name] || runsView;
  document.querySelectorAll("header a").forEach((a) => a.classList.toggle("active", a.dataset.nav === (name || "runs")));
  try {
    session = await api("/api/session");
    document.getElementById("who").textContent = session.model ? `model ${session.model}` : "";
    if (session.auth_required && !session.authenticated) { showLogin(); return; }
    await view(new URLSearchParams(query || ""));
  } catch (err) {
    if (!(err instanceof ApiError && err.message === "log in first")) { main().innerHTML = ""; showError(main(), err); }
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
