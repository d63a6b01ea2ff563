// The search page: plain ES module, no build step. Errors are shown in the page (#error).
const $ = (id) => document.getElementById(id);
const state = { indexes: [] };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function status(message) { $("status").textContent = message; }

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error(`cannot reach the server (${e.message})`);
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function current() { return state.indexes.find((i) => i.name === $("index").value); }

function showInfo() {
  const info = current();
  const box = $("info");
  const labels = $("label");
  labels.replaceChildren(new Option("any", ""));
  if (!info) { box.textContent = "No index is served."; return; }
  for (const l of info.labels) labels.append(new Option(l, l));
  const p = info.provenance || {};
  const q = info.quality || {};
  const recall = q.recall_at_10 == null ? "n/a" : q.recall_at_10.toFixed(3);
  box.textContent = `${info.count.toLocaleString()} images · ${info.factory} (${info.metric}) · ` +
    `${p.backbone} ${p.weights ? p.weights.name : ""} layer ${p.layer} · ` +
    `recall@10 ${recall} measured on ${q.queries ?? 0} held-out queries · generation ${info.generation}`;
}

function filters() {
  const label = $("label").value;
  return label ? { label } : null;
}

function k() { return Math.max(1, Math.min(100, parseInt($("k").value, 10) || 12)); }

function render(result) {
  const list = $("results");
  list.replaceChildren();
  const hits = result.results[0] || [];
  for (const hit of hits) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = hit.id;
    button.title = `${hit.path}\nclick to search by this image`;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = hit.label ? `${hit.label}: ${hit.path}` : hit.path;
    img.src = `/items/${encodeURIComponent(result.index)}/${encodeURIComponent(hit.id)}/thumbnail`;
    const meta = document.createElement("div");
    meta.className = "meta";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = hit.label ?? "—";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(label, score);
    button.append(img, meta);
    button.addEventListener("click", () => searchById(hit.id));
    li.append(button);
    list.append(li);
  }
  status(`${hits.length} results from ${result.index} (generation ${result.generation})`);
}

async function searchImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(`${file.name || "that"} is not an image`); return; }
  showError("");
  const query = $("query");
  query.src = URL.createObjectURL(file);
  query.alt = `query: ${file.name || "pasted image"}`;
  query.hidden = false;
  const form = new FormData();
  form.append("file", file);
  form.append("index", $("index").value);
  form.append("k", String(k()));
  const where = filters();
  if (where) form.append("where", JSON.stringify(where));
  status("searching…");
  try {
    render(await api("/search", { method: "POST", body: form }));
  } catch (e) { showError(e.message); status(""); }
}

async function searchById(id) {
  showError("");
  const query = $("query");
  query.src = `/items/${encodeURIComponent($("index").value)}/${encodeURIComponent(id)}/thumbnail`;
  query.alt = `query: item ${id}`;
  query.hidden = false;
  status("searching…");
  try {
    render(await api("/search", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ index: $("index").value, id, k: k(), where: filters() }),
    }));
  } catch (e) { showError(e.message); status(""); }
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
  $("file").addEventListener("change", (e) => searchImage(e.target.files[0]));
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) searchImage(item.getAsFile());
  });
}

async function init() {
  wireDrop();
  try {
    state.indexes = await api("/indexes");
  } catch (e) { showError(e.message); return; }
  const select = $("index");
  for (const i of state.indexes) select.append(new Option(`${i.name} (${i.count})`, i.name));
  select.addEventListener("change", showInfo);
  showInfo();
  status(state.indexes.length ? "drop an image to search" : "no index is served");
}

init();
