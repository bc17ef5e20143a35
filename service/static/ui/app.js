// congeal web page: plain JavaScript, no framework, no network but this service.
// Views live in the URL fragment (#/new, #/job/<id>, #/jobs, #/pairs/new, #/pair/<id>) so the
// one route /ui serves them all and the browser's back button works.
"use strict";

const KEY_STORE = "congeal.apiKey";
const BASE = location.pathname.replace(/ui\/?$/, ""); // the API's root, "/" unless behind a prefix
const POLL_MS = 1000;
const GALLERY_PAGE = 12;
const JOBS_PAGE = 20;
const MAIN_OPTIONS = ["method", "warp", "budget", "max_side", "seed"];
const SKIP_OPTIONS = new Set(["files", "dataset"]);
const FILE_EXT = /\.(png|jpe?g|tiff?|bmp|zip|tar|tgz|tar\.(gz|bz2|xz)|npy)$/i;

let viewToken = 0;          // bumped on every view change: stale polls and loads stop
let objectUrls = [];        // blob: URLs of the current view, revoked when it changes
let openapi = null;

// ------------------------------------------------------------------ the API

function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

function authHeaders() {
  const k = apiKey();
  return k ? { "Authorization": "Bearer " + k } : {};
}

function url(path) { return BASE + String(path).replace(/^\//, ""); }

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// A FastAPI error body in words: a string, or a list of {loc, msg} naming each field.
function detailText(body, status) {
  const d = body && body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) {
    return d.map(e => {
      const loc = (e.loc || []).filter(x => x !== "body" && x !== "query").join(".");
      return (loc ? loc + ": " : "") + (e.msg || JSON.stringify(e));
    }).join("; ");
  }
  if (status === 401) return "this service needs an API key: enter yours above";
  return "the service answered " + status;
}

async function api(path, opts = {}) {
  const r = await fetch(url(path), { ...opts, headers: { ...authHeaders(), ...(opts.headers || {}) } });
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { detail: text.slice(0, 300) }; }
  if (!r.ok) throw new ApiError(r.status, `${r.status}: ${detailText(body, r.status)}`);
  return { status: r.status, body };
}

async function blobUrl(path) {
  const r = await fetch(url(path), { headers: authHeaders() });
  if (!r.ok) {
    let msg = r.status + "";
    try { msg = `${r.status}: ${detailText(await r.json(), r.status)}`; } catch (e) { /* not JSON */ }
    throw new ApiError(r.status, msg);
  }
  const u = URL.createObjectURL(await r.blob());
  objectUrls.push(u);
  return u;
}

// An <img> whose picture is fetched with the key (an <img src> cannot send one).
function keyedImg(path, alt, cls) {
  const img = el("img", { alt, class: cls || "" });
  const token = viewToken;
  blobUrl(path).then(u => { if (token === viewToken) img.src = u; })
    .catch(e => { img.alt = `${alt} (not shown: ${e.message})`; img.title = e.message; });
  return img;
}

// A download link: a plain link without a key (the browser streams it); with a key, fetched
// into memory with the key and saved from there.
function downloadLink(path, label, filename) {
  const a = el("a", { href: url(path), download: filename || "" }, label);
  a.addEventListener("click", async ev => {
    if (!apiKey()) return;
    ev.preventDefault();
    try {
      const u = await blobUrl(path);
      const tmp = el("a", { href: u, download: filename || path.split("/").pop() });
      document.body.append(tmp); tmp.click(); tmp.remove();
    } catch (e) { flash(`Download failed: ${e.message}`); }
  });
  return a;
}

// ------------------------------------------------------------------ small DOM helpers

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function $(sel, root = document) { return root.querySelector(sel); }

function show(node, on) { node.hidden = !on; }

function flash(msg) { const f = $("#flash"); f.textContent = msg || ""; show(f, !!msg); }

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(digits);
  return String(v);
}

function duration(s) {
  if (s === null || s === undefined) return "unknown";
  s = Math.max(0, Math.round(s));
  const m = Math.floor(s / 60);
  return m ? `${m} min ${s % 60} s` : `${s} s`;
}

function mount(templateId) {
  const v = $("#view");
  v.replaceChildren($("#" + templateId).content.cloneNode(true));
  return v;
}

// ------------------------------------------------------------------ routing

function route() {
  viewToken += 1;
  objectUrls.forEach(u => URL.revokeObjectURL(u));
  objectUrls = [];
  flash("");
  const h = location.hash.replace(/^#\/?/, "");
  const [path, query] = h.split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query || "");
  let nav = "new";
  if (parts[0] === "job" && parts[1]) { nav = ""; viewJob(parts[1]); }
  else if (parts[0] === "jobs") { nav = "jobs"; viewJobs(parseInt(params.get("offset") || "0", 10) || 0); }
  else if (parts[0] === "pairs") { nav = "pairs"; viewPairNew(); }
  else if (parts[0] === "pair" && parts[1]) { nav = "pairs"; viewPair(parts[1]); }
  else viewNew();
  document.querySelectorAll("nav a[data-nav]").forEach(a => {
    if (a.dataset.nav === nav) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  });
}

async function schema() {
  if (!openapi) openapi = (await api("/openapi.json")).body;
  return openapi;
}

function formSchema(oa, path) {
  try { return oa.paths[path].post.requestBody.content["multipart/form-data"].schema.properties; }
  catch (e) { return {}; }
}

// ------------------------------------------------------------------ new job

function optionInput(name, spec) {
  const id = "opt-" + name;
  const anyOf = spec.anyOf ? spec.anyOf.find(s => s.type !== "null") : null;
  const s = anyOf ? { ...anyOf, description: spec.description, default: spec.default } : spec;
  let input;
  if (s.enum) {
    input = el("select", { id, name });
    // An optional choice (no default of its own) starts at "default": nothing is sent for it.
    if (s.default === undefined || s.default === null) input.append(el("option", { value: "", selected: true }, "default"));
    for (const v of s.enum) input.append(el("option", { value: v, selected: v === s.default }, v));
  } else if (s.type === "integer" || s.type === "number") {
    input = el("input", { id, name, type: "number", step: s.type === "integer" ? "1" : "any",
      min: s.minimum ?? s.exclusiveMinimum, max: s.maximum, placeholder: s.default ?? "default",
      value: s.default ?? null });
  } else if (s.type === "boolean") {
    input = el("select", { id, name }, el("option", { value: "" }, "default"), el("option", { value: "true" }, "yes"),
      el("option", { value: "false" }, "no"));
  } else {
    input = el("input", { id, name, type: "text", placeholder: "default" });
  }
  input.dataset.default = s.default ?? "";
  return [el("label", { for: id }, name.replace(/_/g, " ")), input,
    el("span", { class: "help" }, spec.description || "")];
}

async function viewNew() {
  const v = mount("tpl-new");
  const token = viewToken;
  let files = [];
  let skipped = 0;
  const chosen = $("#chosen", v);

  const setFiles = (list, fromFolder) => {
    files = [];
    skipped = 0;
    for (const f of list) {
      const name = f.name;
      // A folder brings stray files (.DS_Store, notes): keep what the service accepts. Files chosen
      // one by one are all sent, so a wrong one is refused by the service, which says why.
      if (fromFolder && (name.startsWith(".") || !FILE_EXT.test(name))) { skipped += 1; continue; }
      files.push(f);
    }
    const size = files.reduce((a, f) => a + f.size, 0);
    chosen.textContent = files.length
      ? `${files.length} file(s) chosen, ${(size / 1024).toFixed(1)} KiB` + (skipped ? `; ${skipped} other file(s) left out` : "")
      : "No files chosen.";
  };
  $("#pick-files", v).addEventListener("change", e => setFiles([...e.target.files], false));
  $("#pick-folder", v).addEventListener("change", e => setFiles([...e.target.files], true));
  const drop = $("#drop", v);
  drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async e => {
    e.preventDefault();
    drop.classList.remove("over");
    const items = [...(e.dataTransfer.items || [])].map(i => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
    if (items.some(i => i.isDirectory)) setFiles(await readEntries(items), true);
    else setFiles([...e.dataTransfer.files], false);
  });

  try {
    const props = formSchema(await schema(), "/jobs");
    if (token !== viewToken) return;
    for (const [name, spec] of Object.entries(props)) {
      if (SKIP_OPTIONS.has(name)) continue;
      $(MAIN_OPTIONS.includes(name) ? "#options-main" : "#options-more", v).append(...optionInput(name, spec));
    }
  } catch (e) { flash(`Could not read the service's options: ${e.message}`); }

  $("#new-form", v).addEventListener("submit", e => {
    e.preventDefault();
    const err = $("#new-error", v);
    show(err, false);
    if (!files.length) { err.textContent = "Choose images, a folder or an archive first."; show(err, true); return; }
    const fd = new FormData();
    for (const f of files) fd.append("files", f, f.name);
    v.querySelectorAll("#options select, #options input").forEach(i => {
      // Only what differs from the service's default is sent: its defaults stay its own.
      if (i.value !== "" && i.value !== String(i.dataset.default)) fd.append(i.name, i.value);
    });
    upload(fd, v);
  });
}

// Files under dropped folders, depth first (readEntries answers in batches).
async function readEntries(entries) {
  const out = [];
  const walk = async entry => {
    if (entry.isFile) { out.push(await new Promise((ok, no) => entry.file(ok, no))); return; }
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((ok, no) => reader.readEntries(ok, no));
      if (!batch.length) break;
      for (const b of batch) await walk(b);
    }
  };
  for (const e of entries) await walk(e);
  return out;
}

// XMLHttpRequest, not fetch: it reports upload progress.
function upload(fd, v) {
  const bar = $("#upload-progress", v), state = $("#upload-state", v), err = $("#new-error", v);
  const btn = $("#submit", v);
  btn.disabled = true;
  show(bar, true);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", url("/jobs"));
  for (const [k, val] of Object.entries(authHeaders())) xhr.setRequestHeader(k, val);
  xhr.upload.onprogress = e => { if (e.lengthComputable) { bar.value = e.loaded / e.total; state.textContent = `uploading ${Math.round(100 * e.loaded / e.total)}%`; } };
  xhr.upload.onload = () => { state.textContent = "checking the images…"; };
  xhr.onload = () => {
    btn.disabled = false;
    show(bar, false);
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (e) { body = { detail: xhr.responseText.slice(0, 300) }; }
    if (xhr.status === 202) { state.textContent = ""; location.hash = "#/job/" + body.id; return; }
    state.textContent = "";
    err.textContent = `The upload was refused (${xhr.status}): ${detailText(body, xhr.status)}`;
    show(err, true);
  };
  xhr.onerror = () => {
    btn.disabled = false; show(bar, false); state.textContent = "";
    err.textContent = "The upload failed: the service could not be reached."; show(err, true);
  };
  xhr.send(fd);
}

// ------------------------------------------------------------------ one job

function progressText(j) {
  const p = j.progress;
  if (j.status === "queued") return "Waiting for a worker…";
  if (!p) return j.status === "running" ? "Starting…" : "";
  const parts = [`stage: ${p.stage}`];
  if (p.total) parts.push(`step ${p.step} of ${p.total}`); else if (p.step) parts.push(`step ${p.step}`);
  if (p.loss !== null && p.loss !== undefined) parts.push(`loss ${fmt(p.loss, 4)}`);
  if (p.apsnr !== null && p.apsnr !== undefined) parts.push(`APSNR ${fmt(p.apsnr, 4)} dB`);
  if (j.status === "running" && p.eta_s !== null && p.eta_s !== undefined) parts.push(`about ${duration(p.eta_s)} left in this stage`);
  if (p.message) parts.push(p.message);
  return parts.join(" · ");
}

async function viewJob(id) {
  const v = mount("tpl-job");
  const token = viewToken;
  $("#job-id", v).textContent = id;
  let rendered = false;
  $("#job-cancel", v).addEventListener("click", async () => {
    if (!confirm("Cancel this job?")) return;
    try { await api(`/jobs/${id}`, { method: "DELETE" }); } catch (e) { flash(`Cancel failed: ${e.message}`); }
  });
  const poll = async () => {
    if (token !== viewToken) return;
    let j;
    try { j = (await api(`/jobs/${id}`)).body; } catch (e) {
      flash(`Could not read job ${id}: ${e.message}`);
      if (e.status >= 500 || !e.status) setTimeout(poll, 3 * POLL_MS);
      return;
    }
    if (token !== viewToken) return;
    if (j.kind === "pair") { location.replace("#/pair/" + id); return; }
    flash("");
    const badge = $("#job-status", v);
    badge.textContent = j.status; badge.className = "badge " + j.status;
    const p = j.progress;
    const bar = $("#job-bar", v);
    if (j.status === "succeeded") bar.value = 1;
    else if (p && p.total) bar.value = Math.min(1, p.step / p.total); else bar.removeAttribute("value");
    $("#job-progress-text", v).textContent = progressText(j);
    show($("#job-cancel", v), j.status === "queued" || j.status === "running");
    $("#job-cancel", v).disabled = !!j.cancel_requested;
    if (j.status === "failed" || j.status === "cancelled") {
      const err = $("#job-error", v);
      err.textContent = j.status === "cancelled" ? "This job was cancelled."
        : `This job failed${j.error_type ? " (" + j.error_type + ")" : ""}: ${j.error || "no reason recorded"}`;
      show(err, true);
    }
    if (j.status === "succeeded" && !rendered) { rendered = true; renderResults(j, v, token); }
    if (!["succeeded", "failed", "cancelled"].includes(j.status)) setTimeout(poll, POLL_MS);
  };
  poll();
}

async function renderResults(j, v, token) {
  const id = j.id;
  show($("#job-results", v), true);
  try {
    const s = (await api(j.links.summary)).body;
    if (token !== viewToken) return;
    $("#apsnr", v).textContent = `APSNR ${fmt(s.apsnr_before, 4)} dB before alignment, ${fmt(s.apsnr_after, 4)} dB after ` +
      `(${s.n_images} images, method ${s.method || "?"}, ${s.warp || "?"} warps).`;
    const stats = $("#stats", v);
    stats.append(el("span"), el("span", { class: "head" }, "before"), el("span", { class: "head" }, "after"));
    for (const what of ["mean", "var"]) {
      stats.append(el("span", { class: "head" }, what === "mean" ? "mean" : "variance"));
      for (const when of ["before", "after"]) {
        const k = `${what}_${when}`;
        stats.append(s.images[k] ? keyedImg(s.images[k], `${what === "mean" ? "mean" : "variance"} ${when} alignment`, "px stat")
          : el("span", {}, "n/a"));
      }
    }
    stats.querySelectorAll("img").forEach(i => { i.width = 160; i.height = 160; i.style.objectFit = "contain"; });
    const w = $("#warnings", v);
    if (s.warnings.length) w.append(el("ul", { class: "warnings" }, ...s.warnings.map(x => el("li", {}, x))));
    else w.append(el("p", { class: "ok" }, "No warnings: the framing and consistency checks are within their limits."));
    const tb = $("#checks tbody", v);
    for (const c of s.checks) tb.append(el("tr", {}, el("th", { scope: "row" }, c.name), el("td", {}, c.value), el("td", {}, c.meaning)));
    if (s.notes.length) w.append(el("p", { class: "notes-head" }, "Notes"), el("ul", { class: "notes" }, ...s.notes.map(x => el("li", {}, x))));
  } catch (e) { flash(`Could not read the summary: ${e.message}`); }

  const L = j.links;
  const dl = $("#downloads", v);
  const add = (path, label, name) => { if (path) dl.append(el("li", {}, downloadLink(path, label, name))); };
  add(L.transforms, "transforms (JSON)", `transforms-${id}.json`);
  add(L.aligned_zip, "aligned images (zip)", `aligned-${id}.zip`);
  add(L.metrics, "metrics (JSON)", `metrics-${id}.json`);
  add(L.report, "report (HTML page)", `report-${id}.html`);
  add(L.transforms_npy, "transforms (NumPy, N×3×3)", `${id}-transforms.npy`);
  add(L.per_image_npy, "per-image metrics (NumPy)", `${id}-per_image.npy`);
  add(L.names_txt, "image names (text)", `${id}-names.txt`);
  add(L.model_download, "trained model (zip)", `model-${id}.zip`);

  if (L.gallery) gallery(L.gallery, 0, v, token);
  if (L.align_with_model) tryModel(L.align_with_model, v);
}

async function gallery(link, offset, v, token) {
  const box = $("#gallery", v);
  let page;
  try { page = (await api(`${link}?offset=${offset}&limit=${GALLERY_PAGE}`)).body; }
  catch (e) { box.replaceChildren(el("p", { class: "error" }, `Could not read the gallery: ${e.message}`)); return; }
  if (token !== viewToken) return;
  const cards = page.data.map(r => {
    const flags = [];
    if (r.outlier) flags.push("outlier");
    if (r.content_kept !== null && r.content_kept !== undefined && r.content_kept < 0.85) flags.push(`keeps ${fmt(r.content_kept, 2)} of its content`);
    if (r.touches_edge) flags.push("touches border");
    const imgs = el("div", { class: "pair-imgs" }, keyedImg(r.input_url + "?max_side=128", `input ${r.name}`, "px"),
      r.aligned_url ? keyedImg(r.aligned_url, `aligned ${r.name}`, "px") : el("span", {}, "no aligned PNG"));
    return el("figure", { class: "card" + (r.outlier ? " outlier" : ""), "data-rank": r.rank, "data-residual": r.residual ?? "" },
      imgs, el("figcaption", {}, el("span", { title: r.name }, `#${r.rank + 1} ${r.name}`), el("br"),
        `residual ${fmt(r.residual)}`, ...(flags.length ? [el("br"), el("em", {}, flags.join(", "))] : [])));
  });
  box.replaceChildren(...cards);
  const last = offset + page.data.length;
  $("#gallery-range", v).textContent = page.total ? `Images ${offset + 1}–${last} of ${page.total}; each card: the input, then its aligned image.` : "No images.";
  const prev = $("#gallery-prev", v), next = $("#gallery-next", v);
  prev.disabled = offset === 0; next.disabled = !page.next;
  prev.onclick = () => gallery(link, Math.max(0, offset - GALLERY_PAGE), v, token);
  next.onclick = () => gallery(link, offset + GALLERY_PAGE, v, token);
}

function tryModel(link, v) {
  show($("#try", v), true);
  $("#try-form", v).addEventListener("submit", async e => {
    e.preventDefault();
    const files = [...$("#try-files", v).files];
    const err = $("#try-error", v), state = $("#try-state", v), out = $("#try-results", v);
    show(err, false);
    if (!files.length) { err.textContent = "Choose one or more images first."; show(err, true); return; }
    const fd = new FormData();
    for (const f of files) fd.append("files", f, f.name);
    state.textContent = "aligning…";
    out.replaceChildren();
    try {
      const r = await api(`${link}?include_images=true`, { method: "POST", body: fd });
      state.textContent = "";
      if (r.status === 202) {
        out.append(el("p", {}, "A large batch: it runs as a job, ", el("a", { href: "#/job/" + r.body.id }, "follow it here"), "."));
        return;
      }
      const local = new Map(files.map(f => [f.name, f]));
      for (const im of r.body.images) {
        const src = local.get(im.name);
        const input = el("img", { alt: `input ${im.name}`, class: "px" });
        if (src) { const u = URL.createObjectURL(src); objectUrls.push(u); input.src = u; }
        const aligned = el("img", { alt: `aligned ${im.name}`, class: "px", src: "data:image/png;base64," + im.png_base64 });
        const m = im.matrix.map(row => row.map(x => x.toFixed(3)).join(" ")).join(" / ");
        out.append(el("figure", { class: "card try" }, el("div", { class: "pair-imgs" }, input, aligned),
          el("figcaption", {}, im.name, el("br"), `matrix ${m}`)));
      }
    } catch (e2) { state.textContent = ""; err.textContent = `Inference failed: ${e2.message}`; show(err, true); }
  });
}

// ------------------------------------------------------------------ job list

async function viewJobs(offset) {
  const v = mount("tpl-jobs");
  const token = viewToken;
  let page;
  try { page = (await api(`/jobs?offset=${offset}&limit=${JOBS_PAGE}`)).body; }
  catch (e) { flash(`Could not list the jobs: ${e.message}`); return; }
  if (token !== viewToken) return;
  const tb = $("#jobs-table tbody", v);
  for (const j of page.data) {
    const link = j.kind === "pair" ? "#/pair/" + j.id : "#/job/" + j.id;
    const apsnr = j.metrics && j.metrics.apsnr_after;
    tb.append(el("tr", {}, el("td", {}, new Date(j.created_at).toLocaleString()),
      el("td", {}, el("a", { href: link }, el("code", {}, j.id))), el("td", {}, j.kind),
      el("td", {}, el("span", { class: "badge " + j.status }, j.status)), el("td", {}, j.n_images),
      el("td", {}, apsnr === null || apsnr === undefined ? "" : `${fmt(apsnr, 4)} dB`)));
  }
  $("#jobs-range", v).textContent = page.total
    ? `Jobs ${offset + 1}–${offset + page.data.length} of ${page.total}, newest first.` : "No jobs yet.";
  const prev = $("#jobs-prev", v), next = $("#jobs-next", v);
  prev.disabled = offset === 0; next.disabled = !page.next;
  prev.onclick = () => { location.hash = `#/jobs?offset=${Math.max(0, offset - JOBS_PAGE)}`; };
  next.onclick = () => { location.hash = `#/jobs?offset=${offset + JOBS_PAGE}`; };
}

// ------------------------------------------------------------------ pairs

async function viewPairNew() {
  const v = mount("tpl-pair-new");
  const token = viewToken;
  try {
    const m = formSchema(await schema(), "/pairs").method || { enum: [] };
    if (token !== viewToken) return;
    for (const x of m.enum) $("#pair-method", v).append(el("option", { value: x, selected: x === m.default }, x));
    const d = m.description ? el("p", { class: "help" }, m.description) : null;
    if (d) $("#pair-form", v).after(d);
  } catch (e) { flash(`Could not read the service's options: ${e.message}`); }
  $("#pair-form", v).addEventListener("submit", async e => {
    e.preventDefault();
    const err = $("#pair-error", v);
    show(err, false);
    const s = $("#pair-source", v).files[0], t = $("#pair-target", v).files[0];
    const fd = new FormData();
    fd.append("files", s, s.name);
    // Two files of one name would be one image to the service: the target gets its own name.
    fd.append("files", t, t.name === s.name ? "target-" + t.name : t.name);
    fd.append("method", $("#pair-method", v).value);
    try {
      const r = await api("/pairs", { method: "POST", body: fd });
      location.hash = "#/pair/" + r.body.job.id;
    } catch (e2) { err.textContent = `The pair was refused: ${e2.message}`; show(err, true); }
  });
}

async function viewPair(id) {
  const v = mount("tpl-pair");
  const token = viewToken;
  $("#pair-id", v).textContent = id;
  const poll = async () => {
    if (token !== viewToken) return;
    let r;
    try { r = (await api(`/pairs/${id}`)).body; } catch (e) { flash(`Could not read pair job ${id}: ${e.message}`); return; }
    if (token !== viewToken) return;
    const j = r.job;
    const badge = $("#pair-status", v);
    badge.textContent = j.status; badge.className = "badge " + j.status;
    $("#pair-progress", v).textContent = progressText(j);
    if (j.status === "failed" || j.status === "cancelled") {
      const err = $("#pair-job-error", v);
      err.textContent = j.status === "cancelled" ? "This job was cancelled." : `This job failed: ${j.error || "no reason recorded"}`;
      show(err, true);
    }
    if (j.status === "succeeded") { pairChooser(id, r, v); return; }
    if (!["failed", "cancelled"].includes(j.status)) setTimeout(poll, POLL_MS);
  };
  poll();
}

// A job of many pairs (made through the API) shows one at a time.
function pairChooser(id, r, v) {
  if (r.pairs.length > 1) {
    const sel = el("select", { id: "pair-choose" }, ...r.pairs.map((p, i) => el("option", { value: i },
      `${p.name}: ${p.source} → ${p.target}${p.aligned ? "" : " (not aligned)"}`)));
    sel.addEventListener("change", () => renderPair(id, r, v, +sel.value));
    $("#pair-result", v).before(el("p", {}, el("label", { for: "pair-choose" }, `Pair (${r.n_aligned} of ${r.n_pairs} aligned) `), sel));
  }
  renderPair(id, r, v, 0);
}

function renderPair(id, r, v, index) {
  const p = r.pairs[index];
  const fresh = $("#pair-result", v).cloneNode(true);  // drops the previous pair's click handlers
  $("#pair-result", v).replaceWith(fresh);
  fresh.querySelectorAll(".marker").forEach(m => m.remove());
  $("#pair-point", v).textContent = "";
  delete $("#pair-point", v).dataset.x;
  delete $("#pair-point", v).dataset.y;
  $("#pair-overlay-img", v).closest("figure").hidden = false;
  show($("#pair-result", v), true);
  $("#pair-summary", v).textContent = `${p.source} → ${p.target}: method ${r.method}, confidence ${fmt(p.confidence, 3)}, ` +
    (p.aligned ? "aligned." : "not aligned: treat the matrix as a guess.") +
    (p.matrix ? ` Matrix (target pixel → source pixel): ${p.matrix.map(row => row.map(x => x.toFixed(4)).join(" ")).join(" / ")}` : " No matrix.");
  const side = Math.max(...p.source_size, ...p.target_size, 64);
  const maxSide = Math.min(1024, side);
  const srcImg = $("#pair-source-img", v), tgtImg = $("#pair-target-img", v);
  for (const [img, name] of [[srcImg, p.source], [tgtImg, p.target]]) {
    blobUrl(`/jobs/${id}/inputs/${encodeURIComponent(name)}?max_side=${maxSide}`).then(u => { img.src = u; })
      .catch(e => { img.alt += ` (not shown: ${e.message})`; });
  }
  if (p.links.overlay) blobUrl(p.links.overlay).then(u => { $("#pair-overlay-img", v).src = u; });
  else $("#pair-overlay-img", v).closest("figure").hidden = true;
  if (!p.matrix) return;
  const sizes = { source: p.source_size, target: p.target_size };
  // Pixel convention: pixel centres at integer coordinates, (0, 0) the top-left pixel's centre.
  const toPixel = (box, ev, hw) => {
    const rect = box.getBoundingClientRect();
    return [(ev.clientX - rect.left) / rect.width * hw[1] - 0.5, (ev.clientY - rect.top) / rect.height * hw[0] - 0.5];
  };
  const place = (box, xy, hw, cls) => {
    box.querySelectorAll(".marker").forEach(m => m.remove());
    if (!xy) return;
    const m = el("span", { class: "marker " + cls });
    m.style.left = `${(xy[0] + 0.5) / hw[1] * 100}%`;
    m.style.top = `${(xy[1] + 0.5) / hw[0] * 100}%`;
    box.append(m);
  };
  const click = (from, to) => async ev => {
    const fromBox = $("#pick-" + from, v), toBox = $("#pick-" + to, v);
    const xy = toPixel(fromBox, ev, sizes[from]);
    place(fromBox, xy, sizes[from], "clicked");
    try {
      const res = (await api(p.links.points, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ points: [xy], direction: `${from}_to_${to}` }),
      })).body;
      const q = res.points[0];
      place(toBox, q, sizes[to], "mapped");
      const inside = q && q[0] >= -0.5 && q[1] >= -0.5 && q[0] <= sizes[to][1] - 0.5 && q[1] <= sizes[to][0] - 0.5;
      $("#pair-point", v).textContent = `${from} (${xy[0].toFixed(1)}, ${xy[1].toFixed(1)}) → ${to} ` +
        (q ? `(${q[0].toFixed(1)}, ${q[1].toFixed(1)})` + (inside ? "" : ", outside the image") : "at infinity");
      $("#pair-point", v).dataset.x = q ? q[0] : ""; $("#pair-point", v).dataset.y = q ? q[1] : "";
    } catch (e) { $("#pair-point", v).textContent = `Could not transfer the point: ${e.message}`; }
  };
  $("#pick-target", v).addEventListener("click", click("target", "source"));
  $("#pick-source", v).addEventListener("click", click("source", "target"));
}

// ------------------------------------------------------------------ the key

function keyUi() {
  const input = $("#api-key"), state = $("#key-state");
  const say = () => { state.textContent = apiKey() ? "key in use for this tab" : "no key"; };
  input.value = apiKey();
  $("#key-form").addEventListener("submit", e => {
    e.preventDefault();
    const k = input.value.trim();
    if (k) sessionStorage.setItem(KEY_STORE, k); else sessionStorage.removeItem(KEY_STORE);
    say();
    route();
  });
  $("#key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); input.value = ""; say(); route(); });
  say();
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => { keyUi(); route(); });
