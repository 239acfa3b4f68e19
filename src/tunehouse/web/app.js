// tunehouse dashboard: plain JS, no build step. Every figure comes from the same JSON API the SDK
// uses; the API key lives in sessionStorage and travels only in the Authorization header.

const KEY = "tunehouse.key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;

const main = document.getElementById("main");
const toast = document.getElementById("toast");
let me = { admin: false };
let page = null; // { alive, timers } of the page on screen; a new route stops the old one's polling

// ---- helpers --------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

function key() {
  return sessionStorage.getItem(KEY);
}

async function api(path, { method = "GET", body, raw = false, signal } = {}) {
  const headers = { Authorization: `Bearer ${key()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  if (raw) return res;
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    if (res.status === 401) signOut("Your key was refused: sign in again.");
    throw new ApiError(res.status, data);
  }
  return data;
}

function say(msg) {
  toast.textContent = msg;
  setTimeout(() => { if (toast.textContent === msg) toast.textContent = ""; }, 6000);
}

function fmtTime(t) {
  return t ? new Date(t * 1000).toLocaleString() : "";
}

function fmtNum(v, digits = 4) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  return Number.isInteger(v) ? v.toLocaleString() : v.toFixed(digits);
}

function kv(obj) {
  const dl = h("dl", { class: "kv" });
  const walk = (o, prefix) => {
    for (const [k, v] of Object.entries(o || {})) {
      if (v && typeof v === "object" && !Array.isArray(v)) walk(v, `${prefix}${k}.`);
      else dl.append(h("dt", {}, prefix + k), h("dd", {}, Array.isArray(v) ? JSON.stringify(v) : fmtNum(v)));
    }
  };
  walk(obj, "");
  return dl;
}

function table(columns, rows, { caption, label } = {}) {
  const t = h("table", { "aria-label": label });
  if (caption) t.append(h("caption", { class: "sr-only" }, caption));
  t.append(h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, c.title)))));
  const tb = h("tbody");
  for (const r of rows) tb.append(h("tr", {}, columns.map((c) => h("td", { class: c.num ? "num" : null }, c.render(r)))));
  if (!rows.length) tb.append(h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, "Nothing yet.")));
  t.append(tb);
  return t;
}

function statusBadge(s) {
  return h("span", { class: `status ${s}` }, s);
}

function field(id, labelText, control) {
  control.id = id;
  return [h("label", { for: id }, labelText), control];
}

function options(select, values, selected) {
  select.replaceChildren(...values.map(([v, t]) => h("option", { value: v, selected: v === selected }, t)));
  return select;
}

function every(ms, fn) {
  const p = page;
  const tick = async () => {
    if (!p.alive) return;
    try { if (await fn()) return; } catch (e) { console.warn(e); }
    if (p.alive) p.timers.push(setTimeout(tick, ms));
  };
  tick();
}

async function listAll(path) {
  const sep = path.includes("?") ? "&" : "?";
  return (await api(`${path}${sep}limit=100`)).data;
}

// ---- sign-in ----------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(KEY);
  me = { admin: false };
  route();
  if (message) say(message);
}

function signInPage() {
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("who").textContent = "";
  const input = h("input", { type: "password", autocomplete: "off", required: true, placeholder: "sk-…" });
  const err = h("p", { class: "error", role: "alert" });
  const form = h("form", { class: "grid", "aria-label": "Sign in" },
    ...field("api-key", "API key", input),
    h("div", { class: "full" }, h("button", { type: "submit" }, "Sign in")),
    h("div", { class: "full" }, err));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    const res = await fetch("/v1/models", { headers: { Authorization: `Bearer ${key()}` } });
    if (!res.ok) {
      sessionStorage.removeItem(KEY);
      err.textContent = res.status === 401 ? "That key is not valid." : `Sign-in failed (HTTP ${res.status}).`;
      return;
    }
    input.value = "";
    await whoAmI();
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    else route();
  });
  main.replaceChildren(h("section", { class: "signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an API key. It stays in this browser tab (sessionStorage) and is sent only as the Authorization header."),
    form));
  input.focus();
}

async function whoAmI() {
  // Only organization admin keys may list projects: the answer tells which pages to offer.
  const res = await api("/v1/organization/projects?limit=1", { raw: true });
  me.admin = res.ok;
  document.getElementById("nav-admin").hidden = !me.admin;
  document.getElementById("who").textContent = me.admin ? "organization admin key" : "project key";
}

// ---- jobs -------------------------------------------------------------------------------------

function hyperparameters(job) {
  const m = job.method;
  return (m && m[m.type] && m[m.type].hyperparameters) || job.hyperparameters || {};
}

async function jobsPage() {
  const list = h("div", { "aria-live": "polite" });
  main.replaceChildren(h("h1", {}, "Fine-tuning jobs"), h("p", {}, h("a", { href: "#/jobs/new" }, "Create a job")), list);
  every(2000, async () => {
    const jobs = (await api("/v1/fine_tuning/jobs?limit=100")).data;
    // Progress of the jobs under way: the step of each one's latest metrics event.
    const steps = new Map(await Promise.all(jobs.filter((j) => ["running", "paused"].includes(j.status)).map(async (j) => {
      const events = (await api(`/v1/fine_tuning/jobs/${j.id}/events?limit=50`)).data;
      const m = events.find((e) => e.type === "metrics" && e.data && e.data.total_steps);
      return [j.id, m ? m.data : null];
    })));
    const progress = (j) => {
      if (j.status === "succeeded") return "done";
      const m = steps.get(j.id);
      if (!m) return "";
      const label = `step ${m.step} of ${m.total_steps}`;
      return h("span", {}, h("progress", { max: m.total_steps, value: m.step, "aria-label": `${j.id}: ${label}` }), ` ${label}`);
    };
    list.replaceChildren(table([
      { title: "Job", render: (j) => h("a", { href: `#/jobs/${j.id}` }, j.id) },
      { title: "Status", render: (j) => statusBadge(j.status) },
      { title: "Progress", render: progress },
      { title: "Base model", render: (j) => j.model },
      { title: "Method", render: (j) => (j.method && j.method.type) || "supervised" },
      { title: "Fine-tuned model", render: (j) => j.fine_tuned_model || "" },
      { title: "Trained tokens", num: true, render: (j) => fmtNum(j.trained_tokens) },
      { title: "Created", render: (j) => fmtTime(j.created_at) },
    ], jobs, { label: "Jobs" }));
  });
}

async function newJobPage() {
  const [models, files] = await Promise.all([listAll("/v1/models"), listAll("/v1/files?purpose=fine-tune")]);
  const base = models.filter((m) => !m.id.startsWith("ft:"));
  const model = options(h("select"), models.map((m) => [m.id, m.id]), base.length ? base[0].id : undefined);
  const fileChoices = files.map((f) => [f.id, `${f.filename} (${f.id})`]);
  const training = options(h("select", { required: true }), fileChoices);
  const validation = options(h("select"), [["", "none"], ...fileChoices], "");
  const method = options(h("select"), [["supervised", "supervised"], ["dpo", "dpo (preference pairs)"]], "supervised");
  const num = (ph) => h("input", { type: "text", inputmode: "decimal", placeholder: ph });
  const epochs = num("auto"), batch = num("auto"), lr = num("auto");
  const suffix = h("input", { type: "text", maxlength: 64 });
  const estimate = h("div", { "aria-live": "polite" });
  const err = h("p", { class: "error", role: "alert" });
  const hp = () => {
    const out = {};
    for (const [k, el, parse] of [["n_epochs", epochs, parseInt], ["batch_size", batch, parseInt], ["learning_rate_multiplier", lr, parseFloat]]) {
      const v = el.value.trim();
      out[k] = v === "" || v === "auto" ? "auto" : parse(v);
    }
    return out;
  };
  const check = async () => {
    estimate.replaceChildren(h("p", { class: "muted" }, "Checking the data…"));
    try {
      const r = await api("/v1/fine_tuning/data_checks", { method: "POST", body: {
        training_file: training.value, validation_file: validation.value || undefined, model: model.value.startsWith("ft:") ? undefined : model.value,
        method: method.value, n_epochs: hp().n_epochs,
      } });
      estimate.replaceChildren(h("h2", {}, "Estimate"), r.error ? h("p", { class: "error" }, r.error.message) : h("p", { class: "ok" }, "The data passes every check."), kv(r.estimate || {}));
    } catch (e) {
      estimate.replaceChildren(h("p", { class: "error" }, e.message));
    }
  };
  const form = h("form", { class: "grid", "aria-label": "Create a fine-tuning job" },
    ...field("job-model", "Base model", model),
    ...field("job-training", "Training file", training),
    ...field("job-validation", "Validation file", validation),
    ...field("job-method", "Method", method),
    ...field("job-epochs", "Epochs", epochs),
    ...field("job-batch", "Batch size", batch),
    ...field("job-lr", "Learning rate multiplier", lr),
    ...field("job-suffix", "Suffix", suffix),
    h("div", { class: "full row" },
      h("button", { type: "button", class: "secondary", onclick: check }, "Estimate cost and time"),
      h("button", { type: "submit" }, "Create job")),
    h("div", { class: "full" }, err));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const body = { model: model.value, training_file: training.value, method: { type: method.value, [method.value]: { hyperparameters: hp() } } };
    if (validation.value) body.validation_file = validation.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", body });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      err.textContent = e.body && e.body.error && e.body.error.param ? `${e.message} (${e.body.error.param})` : e.message;
    }
  });
  main.replaceChildren(h("h1", {}, "Create a fine-tuning job"),
    files.length ? form : h("p", {}, "Upload a training file first: ", h("a", { href: "#/files" }, "Files")), estimate);
}

function lossChart(container, what = "loss") {
  // Steps on x; the train figure every step, the validation one where it was measured (gaps
  // spanned). `what`: "loss", or "reward" for a reinforcement job (its loss is ~0 by design).
  const width = () => Math.max(320, Math.min(1100, container.clientWidth || 800));
  const plot = new uPlot({
    width: width(), height: 300, title: what === "reward" ? "Reward" : "Loss",
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: what }],
    series: [{ label: "step" },
      { label: `train ${what}`, stroke: "#2457c5", width: 2, spanGaps: true },
      { label: `validation ${what}`, stroke: "#d0471b", width: 2, spanGaps: true, points: { show: true, size: 6 } }],
  }, [[], [], []], container);
  addEventListener("resize", () => plot.setSize({ width: width(), height: 300 }));
  return plot;
}

async function jobPage(id) {
  let job;
  try {
    job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`);
  } catch (e) {
    main.replaceChildren(h("h1", {}, "Job not found"), h("p", { class: "error", role: "alert" }, e.message));
    return;
  }
  const head = h("div");
  const controls = h("div", { class: "row" });
  const chartBox = h("div", { class: "chart", id: "loss-chart", role: "img", "aria-label": "Loss curves: train and validation loss by step", "data-points": "0" });
  const chartText = h("p", { class: "muted", "aria-live": "polite", id: "loss-summary" });
  const hyper = h("div");
  const ckpts = h("div");
  const events = h("ul");
  main.replaceChildren(
    h("p", {}, h("a", { href: "#/jobs" }, "← all jobs")),
    h("h1", {}, `Job ${id}`), head, controls,
    h("h2", {}, "Loss curves"), chartBox, chartText,
    h("div", { class: "cards" },
      h("section", { class: "card", "aria-labelledby": "hp-h" }, h("h2", { id: "hp-h" }, "Hyperparameters (resolved)"), hyper),
      h("section", { class: "card", "aria-labelledby": "ev-h" }, h("h2", { id: "ev-h" }, "Events"), h("div", { class: "events" }, events))),
    h("h2", {}, "Checkpoints"), ckpts);
  const rft = (job.method && job.method.type) === "reinforcement";
  if (rft) chartBox.setAttribute("aria-label", "Reward curves: train and validation reward by step");
  const plot = lossChart(chartBox, rft ? "reward" : "loss");

  const act = (verb) => async () => {
    try { job = await api(`/v1/fine_tuning/jobs/${id}/${verb}`, { method: "POST" }); draw(); } catch (e) { say(e.message); }
  };
  const drawHead = () => {
    head.replaceChildren(kv({
      status: job.status, model: job.model, fine_tuned_model: job.fine_tuned_model, method: (job.method && job.method.type) || "supervised",
      training_file: job.training_file, validation_file: job.validation_file, trained_tokens: job.trained_tokens,
      estimated_cost: job.estimated_cost, cost: job.cost, created: fmtTime(job.created_at), finished: fmtTime(job.finished_at),
      error: job.error && job.error.message,
    }));
    const st = job.status;
    controls.replaceChildren(
      h("button", { type: "button", class: "secondary", onclick: act("pause"), disabled: !["queued", "running"].includes(st) }, "Pause"),
      h("button", { type: "button", class: "secondary", onclick: act("resume"), disabled: st !== "paused" }, "Resume"),
      h("button", { type: "button", class: "secondary", onclick: act("cancel"), disabled: TERMINAL.has(st) }, "Cancel"),
      job.fine_tuned_model ? h("a", { href: `#/playground?a=${encodeURIComponent(job.model)}&b=${encodeURIComponent(job.fine_tuned_model)}` }, "Try it in the playground") : null);
    hyper.replaceChildren(kv(hyperparameters(job)));
  };
  const draw = () => drawHead();

  const refresh = async () => {
    job = await api(`/v1/fine_tuning/jobs/${id}`);
    const [ev, ck] = await Promise.all([
      api(`/v1/fine_tuning/jobs/${id}/events?limit=10000`),
      api(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`),
    ]);
    drawHead();
    const metrics = ev.data.filter((e) => e.type === "metrics" && e.data).map((e) => e.data).sort((a, b) => a.step - b.step);
    const byStep = new Map();
    for (const m of metrics) byStep.set(m.step, m);
    const steps = [...byStep.keys()];
    const pick = (k) => steps.map((s) => { const v = byStep.get(s)[k]; return typeof v === "number" ? v : null; });
    const train = pick(rft ? "train_reward_mean" : "train_loss"), valid = pick(rft ? "valid_reward" : "valid_loss");
    plot.setData([steps, train, valid]);
    chartBox.dataset.points = String(train.filter((v) => v !== null).length);
    chartBox.dataset.validPoints = String(valid.filter((v) => v !== null).length);
    const last = metrics[metrics.length - 1];
    chartText.textContent = !last ? "No training steps yet." : rft
      ? `Step ${last.step} of ${last.total_steps}: train reward ${fmtNum(last.train_reward_mean)}${last.valid_reward != null ? `, validation reward ${fmtNum(last.valid_reward)}` : ""}${last.base_valid_reward != null ? ` (before training: ${fmtNum(last.base_valid_reward)})` : ""}.`
      : `Step ${last.step} of ${last.total_steps}: train loss ${fmtNum(last.train_loss)}${last.valid_loss != null ? `, validation loss ${fmtNum(last.valid_loss)}` : ""}.`;
    events.replaceChildren(...ev.data.map((e) => h("li", { class: `lvl-${e.level}` }, h("span", { class: "muted" }, new Date(e.created_at * 1000).toLocaleTimeString(), " "), e.message)));
    ckpts.replaceChildren(table([
      { title: "Step", num: true, render: (c) => c.step_number },
      { title: "Checkpoint model", render: (c) => c.fine_tuned_model_checkpoint },
      { title: "Train loss", num: true, render: (c) => fmtNum(c.metrics.train_loss) },
      { title: "Validation loss", num: true, render: (c) => fmtNum(c.metrics.valid_loss ?? c.metrics.full_valid_loss) },
      { title: "Validation score", num: true, render: (c) => fmtNum(c.metrics.valid_score) },
      { title: "Base score", num: true, render: (c) => fmtNum(c.metrics.base_valid_score) },
      { title: "", render: (c) => h("a", { href: `#/playground?a=${encodeURIComponent(job.model)}&b=${encodeURIComponent(c.fine_tuned_model_checkpoint)}` }, "Chat") },
    ], ck.data, { label: "Checkpoints" }));
    return TERMINAL.has(job.status); // a finished job's page stops polling
  };
  drawHead();
  every(POLL_MS, refresh);
}

// ---- files ------------------------------------------------------------------------------------

// Files larger than this go through /v1/uploads in parts of half this size, one after another
// (sessionStorage "tunehouse.chunkBytes" overrides it: the browser test uploads small files in parts).
const CHUNK_BYTES = 8 * 1024 * 1024;

// POST a multipart body with progress (XMLHttpRequest, not fetch: it reports upload progress).
function send(path, body, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); };
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText || "null"); } catch (e) { /* not JSON: reported below */ }
      if (xhr.status === 200) resolve(data);
      else reject(new ApiError(xhr.status, data));
    };
    xhr.onerror = () => reject(new Error("the server could not be reached"));
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${key()}`);
    xhr.send(body);
  });
}

// One file through /v1/uploads: create, its parts in order, complete. Returns the File.
async function uploadInParts(file, purpose, partBytes, onProgress) {
  const mime = /\.jsonl$/i.test(file.name) ? "text/jsonl" : (file.type || "application/octet-stream");
  const upload = await api("/v1/uploads", { method: "POST", body: { filename: file.name, purpose, bytes: file.size, mime_type: mime } });
  try {
    const partIds = [];
    for (let start = 0; start < file.size; start += partBytes) {
      const body = new FormData();
      body.append("data", file.slice(start, start + partBytes), file.name);
      const part = await send(`/v1/uploads/${upload.id}/parts`, body, (loaded) => onProgress(start + Math.min(loaded, partBytes), file.size));
      partIds.push(part.id);
      onProgress(Math.min(start + partBytes, file.size), file.size);
    }
    return (await api(`/v1/uploads/${upload.id}/complete`, { method: "POST", body: { part_ids: partIds } })).file;
  } catch (e) {
    api(`/v1/uploads/${upload.id}/cancel`, { method: "POST" }).catch(() => {});
    throw e;
  }
}

async function filesPage() {
  const input = h("input", { type: "file", accept: ".jsonl,.json,.txt" });
  const purpose = options(h("select"), [["fine-tune", "fine-tune"], ["evals", "evals"], ["batch", "batch"]], "fine-tune");
  const bar = h("progress", { max: 100, value: 0, id: "upload-progress", "aria-label": "Upload progress" });
  const note = h("p", { "aria-live": "polite" });
  const list = h("div");
  const chunkBytes = parseInt(sessionStorage.getItem("tunehouse.chunkBytes"), 10) || CHUNK_BYTES;
  const form = h("form", { class: "grid", "aria-label": "Upload a file", "data-chunk-bytes": chunkBytes },
    ...field("upload-file", "File", input), ...field("upload-purpose", "Purpose", purpose),
    h("div", { class: "full row" }, h("button", { type: "submit" }, "Upload"), bar), h("div", { class: "full" }, note));
  const progress = (loaded, total) => { bar.value = Math.round((100 * loaded) / total); };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!input.files.length) { note.textContent = "Choose a file first."; return; }
    const file = input.files[0];
    note.className = "";
    note.textContent = "Uploading…";
    try {
      let data;
      if (file.size > chunkBytes) {
        data = await uploadInParts(file, purpose.value, Math.max(1, Math.floor(chunkBytes / 2)), progress);
      } else {
        const body = new FormData();
        body.append("purpose", purpose.value);
        body.append("file", file);
        data = await send("/v1/files", body, progress);
      }
      bar.value = 100;
      location.hash = `#/files/${data.id}`;
    } catch (e) {
      note.textContent = e instanceof ApiError ? (e.body && e.body.error ? e.body.error.message : `Upload failed (HTTP ${e.status}).`) : `Upload failed: ${e.message}.`;
      note.className = "error";
    }
  });
  main.replaceChildren(h("h1", {}, "Files"), form, h("h2", {}, "Uploaded files"), list);
  const files = await listAll("/v1/files");
  list.replaceChildren(table([
    { title: "File", render: (f) => h("a", { href: `#/files/${f.id}` }, f.filename) },
    { title: "Id", render: (f) => f.id },
    { title: "Purpose", render: (f) => f.purpose },
    { title: "Bytes", num: true, render: (f) => fmtNum(f.bytes) },
    { title: "Uploaded", render: (f) => fmtTime(f.created_at) },
  ], files, { label: "Files" }));
}

function problemsTable(problems, label) {
  return table([
    { title: "Line", num: true, render: (p) => (p.line == null ? "file" : p.line) },
    { title: "Field", render: (p) => p.field || "" },
    { title: "Code", render: (p) => p.code },
    { title: "Problem and fix", render: (p) => p.message },
  ], problems, { label });
}

function reportView(r) {
  const out = [h("p", { class: r.error ? "error" : "ok", role: "status" }, r.error ? r.error.message : `No errors in ${r.n_examples} examples (${r.format} format).`)];
  if (r.errors && r.errors.length) out.push(h("h3", {}, `Errors (${r.errors.length})`), problemsTable(r.errors, "Errors"));
  if (r.warnings && r.warnings.length) out.push(h("h3", {}, `Warnings (${r.warnings.length})`), problemsTable(r.warnings, "Warnings"));
  out.push(h("div", { class: "cards" },
    h("section", { class: "card" }, h("h3", {}, "Token statistics, duplicates, overlap"), kv(r.stats || {})),
    h("section", { class: "card" }, h("h3", {}, "Cost and time estimate"), kv(r.estimate || {}))));
  if (r.validation) out.push(h("h3", {}, "Validation file"), ...reportView(r.validation));
  return out;
}

async function filePage(id) {
  let file;
  try { file = await api(`/v1/files/${encodeURIComponent(id)}`); } catch (e) {
    main.replaceChildren(h("h1", {}, "File not found"), h("p", { class: "error", role: "alert" }, e.message));
    return;
  }
  const [models, files] = await Promise.all([listAll("/v1/models"), listAll("/v1/files?purpose=fine-tune")]);
  const base = options(h("select"), models.filter((m) => !m.id.startsWith("ft:")).map((m) => [m.id, m.id]));
  const validation = options(h("select"), [["", "none"], ...files.filter((f) => f.id !== id).map((f) => [f.id, `${f.filename} (${f.id})`])], "");
  const method = options(h("select"), [["supervised", "supervised"], ["dpo", "dpo"]], "supervised");
  const report = h("div", { id: "report", "aria-live": "polite" });
  const line = h("input", { type: "number", min: 1, value: 1 });
  const preview = h("div", { id: "mask-preview", "aria-live": "polite" });
  const runCheck = async () => {
    report.replaceChildren(h("p", { class: "muted" }, "Checking…"));
    try {
      const r = await api("/v1/fine_tuning/data_checks", { method: "POST", body: { training_file: id, validation_file: validation.value || undefined, model: base.value, method: method.value } });
      report.replaceChildren(...reportView(r));
    } catch (e) { report.replaceChildren(h("p", { class: "error" }, e.message)); }
  };
  const runPreview = async () => {
    try {
      const r = await api("/v1/fine_tuning/mask_preview", { method: "POST", body: { file_id: id, line: parseInt(line.value, 10) || 1, model: base.value } });
      preview.replaceChildren(
        h("p", {}, `Line ${r.line}: ${r.n_tokens} tokens, ${r.n_trained} trained (highlighted)${r.truncated ? ", truncated to the context" : ""}.`),
        h("div", { class: "tokens", role: "group", "aria-label": `Line ${r.line} token by token` },
          r.tokens.map((t) => h("span", { class: t.trained ? "tok trained" : "tok", title: t.trained ? "trained" : "context" }, t.text))),
        h("p", { class: "sr-only" }, `Trained text: ${r.tokens.filter((t) => t.trained).map((t) => t.text).join("")}`));
    } catch (e) { preview.replaceChildren(h("p", { class: "error" }, e.message)); }
  };
  main.replaceChildren(
    h("p", {}, h("a", { href: "#/files" }, "← all files")),
    h("h1", {}, file.filename),
    kv({ id: file.id, purpose: file.purpose, bytes: file.bytes, uploaded: fmtTime(file.created_at) }),
    h("h2", {}, "Data check"),
    h("form", { class: "grid", "aria-label": "Data check", onsubmit: (e) => { e.preventDefault(); runCheck(); } },
      ...field("check-model", "Base model (tokenizer)", base), ...field("check-validation", "Validation file", validation),
      ...field("check-method", "Method", method), h("div", { class: "full" }, h("button", { type: "submit" }, "Check again"))),
    report,
    h("h2", {}, "Mask preview"),
    h("form", { class: "row", "aria-label": "Mask preview", onsubmit: (e) => { e.preventDefault(); runPreview(); } },
      ...field("preview-line", "Line", line), h("button", { type: "submit" }, "Show tokens")),
    preview);
  runCheck();
  if (file.purpose === "fine-tune") runPreview();
}

// ---- playground -------------------------------------------------------------------------------

async function streamChat(body, out, signal) {
  out.textContent = "";
  const res = await api("/v1/chat/completions", { method: "POST", body: { ...body, stream: true }, raw: true, signal });
  if (!res.ok) {
    const data = await res.json().catch(() => null);
    out.textContent = "";
    out.append(h("span", { class: "error" }, (data && data.error && data.error.message) || `HTTP ${res.status}`));
    return;
  }
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const ln of chunk.split("\n")) {
        if (!ln.startsWith("data: ")) continue;
        const payload = ln.slice(6);
        if (payload === "[DONE]") { out.dataset.done = "true"; return; }
        const ev = JSON.parse(payload);
        if (ev.error) { out.append(h("span", { class: "error" }, ev.error.message)); continue; }
        const delta = ev.choices && ev.choices[0] && ev.choices[0].delta;
        if (delta && delta.content) out.append(delta.content);
      }
    }
  }
  out.dataset.done = "true";
}

async function playgroundPage(params) {
  const models = (await listAll("/v1/models")).map((m) => [m.id, m.id]);
  const firstFt = models.find(([id]) => id.startsWith("ft:"));
  const a = options(h("select"), models, params.get("a") || (models[0] && models[0][0]));
  const b = options(h("select"), models, params.get("b") || (firstFt ? firstFt[0] : models[0] && models[0][0]));
  const system = h("textarea", { rows: 2 });
  const prompt = h("textarea", { rows: 4, required: true });
  const temp = h("input", { type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const maxTok = h("input", { type: "number", min: 1, max: 4096, value: 128 });
  const fmt = options(h("select"), [["text", "text"], ["json_object", "JSON object"]], "text");
  const outA = h("div", { class: "answer", id: "answer-a", "aria-live": "polite", "aria-label": "Answer from model A" });
  const outB = h("div", { class: "answer", id: "answer-b", "aria-live": "polite", "aria-label": "Answer from model B" });
  const labelA = h("h2", {}, "A"), labelB = h("h2", {}, "B");
  const form = h("form", { class: "grid", "aria-label": "Playground" },
    ...field("pg-a", "Model A", a), ...field("pg-b", "Model B", b),
    ...field("pg-system", "System message", system), ...field("pg-prompt", "Prompt", prompt),
    ...field("pg-temp", "Temperature", temp), ...field("pg-max", "Max tokens", maxTok), ...field("pg-format", "Response format", fmt),
    h("div", { class: "full" }, h("button", { type: "submit" }, "Send to both")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value });
    messages.push({ role: "user", content: prompt.value });
    const common = { messages, temperature: parseFloat(temp.value) || 0, max_completion_tokens: parseInt(maxTok.value, 10) || 128 };
    if (fmt.value !== "text") common.response_format = { type: fmt.value };
    labelA.textContent = `A: ${a.value}`;
    labelB.textContent = `B: ${b.value}`;
    delete outA.dataset.done; delete outB.dataset.done;
    streamChat({ ...common, model: a.value }, outA).catch((e) => { outA.textContent = e.message; });
    streamChat({ ...common, model: b.value }, outB).catch((e) => { outB.textContent = e.message; });
  });
  main.replaceChildren(h("h1", {}, "Playground"), form,
    h("div", { class: "side" }, h("section", {}, labelA, outA), h("section", {}, labelB, outB)));
}

// ---- evals ------------------------------------------------------------------------------------

// The API names a run's criterion "<name>-<uuid>", as OpenAI's does; people read the name.
const criterionLabel = (n) => n.replace(/-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, "");

function criteriaTable(runs) {
  const names = [...new Set(runs.flatMap((r) => (r.per_testing_criteria_results || []).map((c) => c.testing_criteria)))];
  return table([
    { title: "Run", render: (r) => h("a", { href: `#/evals/${r.eval_id}/runs/${r.id}` }, r.name || r.id) },
    { title: "Model", render: (r) => r.model || (r.data_source && r.data_source.model) || "" },
    { title: "Status", render: (r) => statusBadge(r.status) },
    { title: "Passed / total", num: true, render: (r) => (r.result_counts ? `${r.result_counts.passed} / ${r.result_counts.total}` : "") },
    ...names.map((n) => ({ title: criterionLabel(n), num: true, render: (r) => {
      const c = (r.per_testing_criteria_results || []).find((x) => x.testing_criteria === n);
      return c ? `${Math.round((100 * c.passed) / Math.max(1, c.passed + c.failed))}% (${c.passed}/${c.passed + c.failed})` : "";
    } })),
  ], runs, { label: "Runs: pass rate per criterion" });
}

async function evalsPage() {
  const evals = await listAll("/v1/evals");
  main.replaceChildren(h("h1", {}, "Evals"), table([
    { title: "Eval", render: (e) => h("a", { href: `#/evals/${e.id}` }, e.name || e.id) },
    { title: "Id", render: (e) => e.id },
    { title: "Criteria", render: (e) => (e.testing_criteria || []).map((c) => c.name).join(", ") },
    { title: "Created", render: (e) => fmtTime(e.created_at) },
  ], evals, { label: "Evals" }));
}

async function evalPage(id) {
  const [ev, runs] = await Promise.all([api(`/v1/evals/${id}`), listAll(`/v1/evals/${id}/runs`)]);
  main.replaceChildren(h("p", {}, h("a", { href: "#/evals" }, "← all evals")), h("h1", {}, ev.name || ev.id),
    h("h2", {}, "Runs, base and fine-tunes side by side"), criteriaTable(runs));
}

async function runPage(evalId, runId) {
  const [run, items] = await Promise.all([api(`/v1/evals/${evalId}/runs/${runId}`), listAll(`/v1/evals/${evalId}/runs/${runId}/output_items`)]);
  main.replaceChildren(h("p", {}, h("a", { href: `#/evals/${evalId}` }, "← the eval's runs")), h("h1", {}, run.name || run.id),
    criteriaTable([run]), h("h2", {}, "Output items"),
    table([
      { title: "Item", render: (o) => JSON.stringify(o.datasource_item).slice(0, 200) },
      { title: "Output", render: (o) => ((o.sample && o.sample.output) || []).map((m) => m.content).join("\n").slice(0, 400) },
      { title: "Status", render: (o) => o.status },
      { title: "Verdicts", render: (o) => (o.results || []).map((r) => `${criterionLabel(r.name)}: ${r.passed ? "pass" : "fail"} (${fmtNum(r.score, 2)})`).join("; ") },
    ], items, { label: "Output items" }));
}

// ---- usage ------------------------------------------------------------------------------------

async function usagePage() {
  const days = 30;
  const start = Math.floor(Date.now() / 1000 / 86400 - days + 1) * 86400;
  const [costs, usage] = await Promise.all([
    api(`/v1/organization/costs?start_time=${start}&limit=${days}&group_by=line_item`),
    api(`/v1/organization/usage/completions?start_time=${start}&limit=${days}&group_by=model&group_by=project_id`),
  ]);
  const chartBox = h("div", { class: "chart", role: "img", "aria-label": `Cost per day over the last ${days} days, by line item` });
  const rows = [];
  for (const b of usage.data) for (const r of b.results) rows.push({ day: b.start_time, ...r });
  main.replaceChildren(h("h1", {}, "Usage and cost"), h("h2", {}, "Cost per day (USD)"), chartBox,
    h("h2", {}, "Inference tokens per day, project and model"),
    table([
      { title: "Day", render: (r) => new Date(r.day * 1000).toISOString().slice(0, 10) },
      { title: "Project", render: (r) => r.project_id || "" },
      { title: "Model", render: (r) => r.model || "" },
      { title: "Input tokens", num: true, render: (r) => fmtNum(r.input_tokens) },
      { title: "Output tokens", num: true, render: (r) => fmtNum(r.output_tokens) },
      { title: "Requests", num: true, render: (r) => fmtNum(r.num_model_requests) },
    ], rows, { label: "Inference usage" }));
  const items = [...new Set(costs.data.flatMap((b) => b.results.map((r) => r.line_item || "total")))];
  const x = costs.data.map((b) => b.start_time);
  const series = items.map((it) => costs.data.map((b) => b.results.filter((r) => (r.line_item || "total") === it).reduce((s, r) => s + r.amount.value, 0)));
  const palette = ["#2457c5", "#d0471b", "#1b7f3b", "#8a5a00", "#6b3fa0", "#0f7c8c"];
  new uPlot({
    width: Math.max(320, Math.min(1100, main.clientWidth - 40)), height: 280,
    axes: [{}, { label: "USD", size: 70, values: (u, vs) => vs.map((v) => (v === 0 ? "0" : Math.abs(v) < 0.01 ? v.toExponential(1) : v.toFixed(2))) }],
    series: [{}, ...items.map((it, i) => ({ label: it, stroke: palette[i % palette.length], width: 2, points: { show: true } }))],
  }, [x, ...series], chartBox);
}

// ---- organization (admin keys) --------------------------------------------------------------------

async function organizationPage() {
  const [projects, keys] = await Promise.all([listAll("/v1/organization/projects"), listAll("/v1/organization/admin_api_keys")]);
  const projectKeys = await Promise.all(projects.map((p) => listAll(`/v1/organization/projects/${p.id}/api_keys`).then((ks) => ks.map((k) => ({ ...k, project: p.name })))));
  main.replaceChildren(h("h1", {}, "Organization"),
    h("h2", {}, "Projects"), table([
      { title: "Project", render: (p) => p.name }, { title: "Id", render: (p) => p.id },
      { title: "Status", render: (p) => p.status }, { title: "Created", render: (p) => fmtTime(p.created_at) },
    ], projects, { label: "Projects" }),
    h("h2", {}, "Keys"), table([
      { title: "Name", render: (k) => k.name || "" }, { title: "Key", render: (k) => k.redacted_value },
      { title: "Project", render: (k) => k.project || "(organization admin)" }, { title: "Role", render: (k) => k.role || "" },
      { title: "Last used", render: (k) => fmtTime(k.last_used_at) },
    ], [...keys, ...projectKeys.flat()], { label: "Keys" }));
}

// ---- router -----------------------------------------------------------------------------------

async function route() {
  if (page) { page.alive = false; page.timers.forEach(clearTimeout); }
  page = { alive: true, timers: [] };
  toast.textContent = "";
  if (!key()) return signInPage();
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.getAttribute("href") === `#/${parts[0] || "jobs"}`) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  try {
    const [p0, p1, p2, p3] = parts;
    if (!p0 || p0 === "jobs") {
      if (!p1) await jobsPage(); else if (p1 === "new") await newJobPage(); else await jobPage(p1);
    } else if (p0 === "files") {
      if (p1) await filePage(p1); else await filesPage();
    } else if (p0 === "playground") await playgroundPage(params);
    else if (p0 === "evals") {
      if (p2 === "runs" && p3) await runPage(p1, p3); else if (p1) await evalPage(p1); else await evalsPage();
    } else if (p0 === "usage") await usagePage();
    else if (p0 === "organization") await organizationPage();
    else main.replaceChildren(h("h1", {}, "Not found"));
  } catch (e) {
    main.replaceChildren(h("h1", {}, "Something went wrong"), h("p", { class: "error", role: "alert" }, e.message));
  }
  main.focus();
}

document.getElementById("sign-out").addEventListener("click", () => signOut());
addEventListener("hashchange", route);
(async () => {
  if (key()) await whoAmI().catch(() => {});
  route();
})();
