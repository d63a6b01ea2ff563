// The search page: plain ES module, no build step. Errors are shown in the page (#error).
// With an API key on the server, the page asks for it once (kept for this tab) and sends it with
// every request; thumbnails are then fetched with it too. Two views: Search, and Label (label.js),
// chosen by the address's #hash (#label/NAME opens selection NAME), so a reload keeps the view.
import { setupLabelling } from "./label.js";

const $ = (id) => document.getElementById(id);
const state = { indexes: [], last: null, key: sessionStorage.getItem("embedder-key") || "" };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function status(message) { $("status").textContent = message; }

function headers(extra = {}) {
  return state.key ? { ...extra, "X-API-Key": state.key } : extra;
}

async function request(path, options = {}) {
  try {
    return await fetch(path, { ...options, headers: headers(options.headers) });
  } catch (e) {
    throw new Error(`cannot reach the server (${e.message})`);
  }
}

async function api(path, options = {}) {
  let response = await request(path, options);
  if (response.status === 401) {  // ask once; a wrong key asks again on the next request
    const key = window.prompt("This server needs its API key:", "");
    if (key) {
      state.key = key;
      sessionStorage.setItem("embedder-key", key);
      response = await request(path, options);
    }
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function thumbnail(img, index, id) {
  const url = `/items/${encodeURIComponent(index)}/${encodeURIComponent(id)}/thumbnail`;
  if (!state.key) { img.src = url; return; }
  request(url).then((r) => (r.ok ? r.blob() : null)).then((b) => { if (b) img.src = URL.createObjectURL(b); })
    .catch(() => {});
}

function current() { return state.indexes.find((i) => i.name === $("index").value); }

function showInfo() {
  const info = current();
  const box = $("info");
  const labels = $("label");
  const chosen = labels.value;
  labels.replaceChildren(new Option("any", ""));
  const text = $("text");
  const canText = Boolean(info && info.text_queries);
  text.disabled = $("textgo").disabled = !canText;
  text.placeholder = canText ? "describe what to find, e.g. a red shoe"
    : "text search needs an index made with a CLIP-family backbone (open_clip:…)";
  if (!info) { box.textContent = "No index is served."; return; }
  for (const l of info.labels) labels.append(new Option(l, l));
  if (info.labels.includes(chosen)) labels.value = chosen;
  const p = info.provenance || {};
  const q = info.quality || {};
  const recall = q.exact ? "exact search: recall@10 1.000 by construction"
    : q.recall_at_10 == null ? `recall@10 not measured (${q.not_measured || "no held-out queries"})`
      : `recall@10 ${q.recall_at_10.toFixed(3)} on ${q.queries} held-out queries`;
  box.textContent = `${info.count.toLocaleString()} images · ${info.factory} (${info.metric}) · ` +
    `${p.backbone} ${p.weights ? p.weights.name : ""} layer ${p.layer} · ${recall} · generation ${info.generation}`;
}

function filters() {
  const label = $("label").value;
  return label ? { label } : null;
}

function k() { return Math.max(1, Math.min(100, parseInt($("k").value, 10) || 12)); }

function clearResults() { $("results").replaceChildren(); }

function render(result) {
  const list = $("results");
  list.replaceChildren();
  const hits = result.results[0] || [];
  for (const hit of hits) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = hit.id;
    button.title = "search by this image";
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = hit.label ? `${hit.label}: ${hit.path}` : hit.path;
    thumbnail(img, result.index, hit.id);
    const meta = document.createElement("div");
    meta.className = "meta";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = hit.label ?? "—";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(label, score);
    const path = document.createElement("div");
    path.className = "path";
    // shown from its end (the file name) when too long; the marks keep its slashes in place
    path.textContent = `\u200e${hit.path}\u200e`;
    path.title = hit.path;
    button.append(img, meta, path);
    button.addEventListener("click", () => searchById(hit.id));
    li.append(button);
    list.append(li);
  }
  status(`${hits.length} results from ${result.index} (generation ${result.generation})`);
}

async function run(ask) {
  showError("");
  status("searching…");
  try {
    render(await ask());
  } catch (e) {
    clearResults();  // never an old answer under a new error
    showError(e.message);
    status("");
  }
}

function imageSearch(file) {
  const form = new FormData();
  form.append("file", file);
  form.append("index", $("index").value);
  form.append("k", String(k()));
  const where = filters();
  if (where) form.append("where", JSON.stringify(where));
  return api("/search", { method: "POST", body: form });
}

function textSearch(text) {
  return api("/search", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ index: $("index").value, text, k: k(), where: filters() }),
  });
}

async function searchText(text) {
  if (!text.trim()) { showError("type some words to search by"); return; }
  const query = $("query");
  query.hidden = true;
  query.removeAttribute("src");
  state.last = { kind: "text", text };
  await run(() => textSearch(text));
}

function idSearch(id) {
  return api("/search", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ index: $("index").value, id, k: k(), where: filters(),
                           exclude_self: $("exclude").checked }),
  });
}

async function searchImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(`${file.name || "that"} is not an image`); return; }
  const query = $("query");
  query.src = URL.createObjectURL(file);
  query.alt = `query: ${file.name || "pasted image"}`;
  query.hidden = false;
  state.last = { kind: "image", file };
  await run(() => imageSearch(file));
}

async function searchById(id) {
  const query = $("query");
  thumbnail(query, $("index").value, id);
  query.alt = `query: item ${id}`;
  query.hidden = false;
  state.last = { kind: "id", id, index: $("index").value };
  await run(() => idSearch(id));
}

function again() {  // the settings changed: the same query again
  const last = state.last;
  if (!last) return;
  if (last.kind === "image") run(() => imageSearch(last.file));
  else if (last.kind === "text") run(() => textSearch(last.text));
  else if (last.index === $("index").value) run(() => idSearch(last.id));
  else { state.last = null; clearResults(); $("query").hidden = true; status("drop an image to search"); }
}

function wireControls() {
  $("controls").addEventListener("submit", (e) => { e.preventDefault(); again(); });  // Enter in k
  $("label").addEventListener("change", again);
  $("k").addEventListener("change", again);
  $("exclude").addEventListener("change", () => { if (state.last?.kind === "id") again(); });
  $("index").addEventListener("change", () => { showInfo(); again(); });
  $("textform").addEventListener("submit", (e) => { e.preventDefault(); searchText($("text").value); });
}

function wireDrop() {
  const zone = $("drop");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    searchImage(e.dataTransfer.files[0]);
  });
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = "";  // choosing the same file again is a new search
    searchImage(file);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) searchImage(item.getAsFile());
  });
}

async function loadIndexes() {
  for (let wait = 500; ; wait = Math.min(wait * 2, 5000)) {
    try {
      return await api("/indexes");
    } catch (e) {
      if (e.status !== 503) throw e;
      status("the server is still loading its indexes… retrying");
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }
}

function searchHint() {
  return state.indexes.length ? (current()?.text_queries ? "type a text or drop an image to search"
    : "drop an image to search") : "no index is served";
}

let labelling = null;

function route() {  // the view the address names
  const labelView = location.hash.startsWith("#label");
  $("search-view").hidden = labelView;
  $("controls").hidden = labelView;
  $("label-view").hidden = !labelView;
  for (const [tab, on] of [["tab-search", !labelView], ["tab-label", labelView]]) {
    if (on) $(tab).setAttribute("aria-current", "page"); else $(tab).removeAttribute("aria-current");
  }
  // the status and error lines: under the drop zone when searching, above the grid when labelling
  const slot = labelView ? $("lab-current") : $("info");
  slot.before($("status"), $("error"));
  showError("");
  if (labelView) labelling.open();
  else if (!$("results").children.length) status(searchHint());
  else status("");
}

async function init() {
  wireDrop();
  wireControls();
  labelling = setupLabelling({ api, thumbnail, showError, status, indexes: () => state.indexes });
  window.addEventListener("hashchange", route);
  try {
    state.indexes = await loadIndexes();
  } catch (e) { showError(e.message); status(""); return; }
  const select = $("index");
  for (const i of state.indexes) select.append(new Option(`${i.name} (${i.count})`, i.name));
  showInfo();
  route();
}

init();
