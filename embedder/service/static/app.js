// The search page: plain ES module, no build step. Errors are shown in the page (#error), in plain
// words. With an API key on the server, the page asks for it in its own form (#key-form; kept for
// this tab) and sends it with every request; thumbnails and full-size images are then fetched with it.
// Two views: Search, and Label (label.js), chosen by the address's #hash (#label/NAME opens selection
// NAME). The search itself lives in the address's query string (?index=…&text=…|id=…|upload=…&k=…
// &label=…&exclude=1), so Back/Forward, reload, bookmarks and shared links bring it back.
import { setupLabelling } from "./label.js";

const $ = (id) => document.getElementById(id);
const DEFAULT_K = 12;
const state = {
  indexes: [],
  key: sessionStorage.getItem("embedder-key") || "",
  maxK: 1000,        // the server's default max_k; a server that says less is believed (fetchPage)
  query: null,       // {kind: "text", text} | {kind: "id", id} | {kind: "image", file, token}
  hits: [],          // every hit shown, in order
  index: "",         // the index the hits are from
  end: false,        // no more to fetch
  busy: false,
  pending: null,  // the page fetch in flight (a promise), while busy
  seq: 0,            // each search's number: an answer to an older one is dropped
  applied: null,     // the address's query string last applied or written
};
const uploads = new Map();  // upload token → File, for Back/Forward within this page's life
const MAX_UPLOADS = 20;     // the latest ones only: a pasted image is held in memory

// ---- errors in the user's words ---------------------------------------------------------------
function sentence(text) {
  const s = String(text || "").trim();
  return s ? s[0].toUpperCase() + s.slice(1) : s;
}

function millions(n) { return `${(Number(n) / 1e6).toLocaleString(undefined, { maximumFractionDigits: 1 })} million`; }

// The service's {error, kind} as one sentence a user can act on, the server's reason kept.
export function plainError(status, body, what = "") {
  const kind = body.kind || "";
  let reason = String(body.error || "").replace(/^(text )?query \d+:?\s*/i, "");
  if (/^text query \d+/i.test(body.error || "")) reason = String(body.error).replace(/^text query \d+/i, "the text");
  if (kind === "not_an_image") {
    reason = reason.replace(/^.*? is not a usable image:\s*/, "");
    const bomb = /(\d+)x(\d+) exceeds (\d+) pixels/.exec(reason);
    if (bomb) {
      return `${what || "That image"} is too large to search by: ${bomb[1]}×${bomb[2]} pixels, and this server ` +
        `takes at most ${millions(bomb[3])} pixels.`;
    }
    const pil = /Image size \((\d+) pixels\)/.exec(reason);
    if (pil) return `${what || "That image"} is too large to search by: ${millions(pil[1])} pixels is more than this server decodes.`;
    const format = /^not an image \((.*)\)$/.exec(reason);
    if (format) return `${what || "That file"} is not an image the server can read (${format[1]}).`;
    if (/^empty file/.test(reason)) return `${what || "That file"} is empty.`;
    return `${what || "That image"} cannot be read by the server (${reason}).`;
  }
  if (kind === "too_large" || status === 413) return `${what || "That"} is more than the server accepts (${reason}).`;
  if (kind === "not_ready" || status === 503) return "The server is still loading its indexes: try again in a moment.";
  if (kind === "unauthorised" || status === 401) return "The server did not accept the API key.";
  if (kind === "internal" || status >= 500) return `The server failed on this request (${reason || status}); its log says more.`;
  if (kind === "not_found" && /is not in index/.test(reason)) {
    return `${sentence(reason)} (the index may have been rebuilt since): search again.`;
  }
  if (kind === "provenance") return `The index no longer matches its model: ${reason}.`;
  if (!reason) return `The server refused the request (${status}).`;
  return sentence(reason).replace(/([^.!?:])$/, "$1.");
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function status(message) { $("status").textContent = message; }

// ---- requests, and the API key form -----------------------------------------------------------
function headers(extra = {}) {
  return state.key ? { ...extra, "X-API-Key": state.key } : extra;
}

async function request(path, options = {}) {
  try {
    return await fetch(path, { ...options, headers: headers(options.headers) });
  } catch (e) {
    throw new Error(`Cannot reach the server (${e.message}).`);
  }
}

let keyWanted = null;  // one form for every request that met a 401 meanwhile

function askKey(why) {
  if (!keyWanted) {
    const form = $("key-form");
    $("key-why").textContent = why;
    $("key-why").hidden = !why;
    form.hidden = false;
    $("key").value = "";
    $("key").focus();
    keyWanted = new Promise((resolve) => {
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        state.key = $("key").value.trim();
        sessionStorage.setItem("embedder-key", state.key);
        form.hidden = true;
        keyWanted = null;
        resolve();
      }, { once: true });
    });
  }
  return keyWanted;
}

async function api(path, options = {}, what = "") {
  let response = await request(path, options);
  while (response.status === 401) {  // the form until a key is accepted; no reload needed
    const sent = state.key;
    await askKey(sent ? "That key was not accepted: check it and try again." : "");
    response = await request(path, options);
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(plainError(response.status, body, what));
    error.status = response.status;
    error.reason = body.error || "";
    throw error;
  }
  return body;
}

function itemUrl(index, id, part) {
  return `/items/${encodeURIComponent(index)}/${encodeURIComponent(id)}/${part}`;
}

function keyedImage(img, url, onFail) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  if (onFail) img.onerror = onFail;
  if (!state.key) { img.src = url; return; }
  request(url).then((r) => (r.ok ? r.blob() : null))
    .then((b) => { if (b && img.isConnected) img.src = URL.createObjectURL(b); else if (!b && onFail) onFail(); })
    .catch(() => { if (onFail) onFail(); });
}

function thumbnail(img, index, id) { keyedImage(img, itemUrl(index, id, "thumbnail")); }

// ---- the indexes --------------------------------------------------------------------------------
function current() { return state.indexes.find((i) => i.name === $("index").value); }

function noTextReason(info) {
  if (!info) return "no index is served";
  if (info.text_queries) return "";
  if (!info.image_queries) {
    return `the server lacks index ${info.name}'s model (its weights file was not given to it): search by a result only`;
  }
  const p = info.provenance || {};
  return `index ${info.name} was made with ${p.backbone || "a model"}, which has no text tower: text search ` +
    "needs an index made with a CLIP-family backbone (open_clip:…)";
}

function showInfo() {
  const info = current();
  const box = $("info");
  const labels = $("label");
  const chosen = labels.value;
  labels.replaceChildren(new Option("any", ""));
  const text = $("text");
  const canText = Boolean(info && info.text_queries);
  text.disabled = $("textgo").disabled = !canText;
  text.placeholder = canText ? "describe what to find, e.g. a red shoe" : noTextReason(info);
  if (!info) { box.textContent = "No index is served."; return; }
  if (info.max_k) state.maxK = info.max_k;  // a server that says its max_k
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

function pageSize() {
  const asked = parseInt($("k").value, 10);
  return Math.max(1, Math.min(state.maxK, Number.isFinite(asked) ? asked : DEFAULT_K));
}

// ---- the address ------------------------------------------------------------------------------
function addressOf() {
  const p = new URLSearchParams();
  const index = $("index").value;
  if (index) p.set("index", index);
  const q = state.query;
  if (q?.kind === "text") p.set("text", q.text);
  else if (q?.kind === "id") p.set("id", q.id);
  else if (q?.kind === "image") p.set("upload", q.token);
  const k = parseInt($("k").value, 10);
  if (k && k !== DEFAULT_K) p.set("k", String(k));
  if ($("label").value) p.set("label", $("label").value);
  if ($("exclude").checked) p.set("exclude", "1");
  const s = p.toString();
  return s ? `?${s}` : "";
}

function remember(push) {  // the search into the address: a new history entry, or this one's
  const search = addressOf();
  state.applied = search;
  if (search === location.search) return;
  const url = `${location.pathname}${search}${location.hash}`;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}

function applyAddress() {  // the address into the page: its settings, then its search
  const p = new URLSearchParams(location.search);
  state.applied = location.search;
  const index = p.get("index");
  if (index && state.indexes.some((i) => i.name === index)) $("index").value = index;
  else if (!index && state.indexes.length) $("index").value = state.indexes[0].name;
  showInfo();
  $("k").value = p.get("k") || String(DEFAULT_K);
  const label = p.get("label") || "";
  const labels = [...$("label").options].map((o) => o.value);
  $("label").value = labels.includes(label) ? label : "";
  $("exclude").checked = p.get("exclude") === "1";
  showError("");
  if (index && !state.indexes.some((i) => i.name === index)) {
    reset();
    showError(`This address names index ${index}, which this server does not serve` +
      (state.indexes.length ? ` (it serves ${state.indexes.map((i) => i.name).join(", ")}).` : "."));
    return;
  }
  if (label && !labels.includes(label)) showError(`Index ${$("index").value} has no label ${label}: showing every label.`);
  if (p.has("text")) search({ kind: "text", text: p.get("text") }, null);
  else if (p.has("id")) search({ kind: "id", id: p.get("id") }, null);
  else if (p.has("upload")) {
    const file = uploads.get(p.get("upload"));
    if (file) search({ kind: "image", file, token: p.get("upload") }, null);
    else {
      reset();
      status("This search was by an uploaded image, which an address cannot hold: drop or choose it " +
        "again (the index, k and filters are kept).");
    }
  } else { reset(); status(searchHint()); }
}

// ---- searching and paging -----------------------------------------------------------------------
function reset() {
  state.seq += 1;
  state.query = null;
  state.hits = [];
  state.end = false;
  state.busy = false;
  for (const img of $("results").querySelectorAll("img[src^='blob:']")) URL.revokeObjectURL(img.src);
  $("results").replaceChildren();
  $("more").hidden = true;
  $("end").hidden = true;
  const query = $("query");
  query.hidden = true;
  if (query.src.startsWith("blob:")) URL.revokeObjectURL(query.src);
  query.removeAttribute("src");
  status("");
}

function ask(q, k, index) {
  const where = filters();
  if (q.kind === "image") {
    const form = new FormData();
    form.append("file", q.file);
    form.append("index", index);
    form.append("k", String(k));
    if (where) form.append("where", JSON.stringify(where));
    return api("/search", { method: "POST", body: form }, q.file.name ? `Image ${q.file.name}` : "The pasted image");
  }
  const body = { index, k, where };
  if (q.kind === "text") body.text = q.text;
  else { body.id = q.id; body.exclude_self = $("exclude").checked; }
  return api("/search", { method: "POST", headers: { "content-type": "application/json" },
                          body: JSON.stringify(body) });
}

// A new search: PUSH true adds a history entry, false replaces this one, null leaves the address.
async function search(q, push = true) {
  const index = $("index").value;
  showError("");
  reset();
  state.query = q;
  state.index = index;
  if (push !== null) remember(push);
  const query = $("query");
  if (q.kind === "text") $("text").value = q.text;
  if (q.kind === "image") {
    query.src = URL.createObjectURL(q.file);
    query.alt = `query: ${q.file.name || "pasted image"}`;
    query.hidden = false;
  } else if (q.kind === "id") {
    thumbnail(query, index, q.id);
    query.alt = `query: item ${q.id}`;
    query.hidden = false;
  }
  if (q.kind === "text") {
    const why = current() ? noTextReason(current()) : "no index is served";
    if (why) {  // never sent: it can only fail
      status(`Not searched for “${q.text}”: ${why}. Drop an image, or pick another index.`);
      return;
    }
  }
  await fetchPage();
}

function fetchPage() {
  // a page already in flight (the scroll's) is waited for, not skipped: an arrow key past the last card
  // must land on the next page's first card, not be lost
  if (state.busy && state.pending) return state.pending;
  state.pending = fetchPageOnce().finally(() => { state.pending = null; });
  return state.pending;
}

async function fetchPageOnce() {
  if (!state.query || state.end || state.busy) return;
  const seq = state.seq;
  const have = state.hits.length;
  const want = Math.min(state.maxK, have + pageSize());
  state.busy = true;
  status(have ? "fetching more…" : "searching…");
  let result;
  try {
    result = await ask(state.query, want, state.index);
  } catch (e) {
    if (seq !== state.seq) return;
    state.busy = false;
    const most = /k must be between 1 and (\d+)/.exec(e.reason || "");
    if (most && Number(most[1]) < want) {  // a server with a lower max_k: believe it, ask again
      state.maxK = Number(most[1]);
      return fetchPage();
    }
    if (!have) { $("results").replaceChildren(); }  // never an old answer under a new error
    showError(e.message);
    status("");
    $("more").hidden = true;
    return;
  }
  if (seq !== state.seq) return;  // a newer search has begun
  state.busy = false;
  const hits = result.results[0] || [];
  const seen = new Set(state.hits.map((h) => h.id));
  const fresh = hits.slice(have).filter((h) => !seen.has(h.id));
  render(fresh, result.index);
  state.hits.push(...fresh);
  state.end = hits.length < want || want >= state.maxK || (have > 0 && !fresh.length);
  const n = state.hits.length;
  status(`${n} result${n === 1 ? "" : "s"} from ${result.index} (generation ${result.generation})`);
  $("more").hidden = state.end;
  const end = $("end");
  end.hidden = !state.end || !n;
  end.textContent = want >= state.maxK && hits.length >= want
    ? `The server returns at most ${state.maxK} results per search: narrow it with a label filter.`
    : `That is all: ${n} result${n === 1 ? "" : "s"}.`;
  if (!n) status(`No results in ${result.index}${filters() ? " with that label" : ""}.`);
}

function render(hits, index) {
  const list = $("results");
  const start = list.children.length;
  hits.forEach((hit, i) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "hit";
    button.dataset.id = hit.id;
    button.dataset.n = String(start + i);
    button.title = "Search by this image (Enter); V: full size";
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = hit.label ? `${hit.label}: ${hit.path}` : hit.path;
    thumbnail(img, index, hit.id);
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
    if (hit.caption) {
      const caption = document.createElement("div");
      caption.className = "caption";
      caption.textContent = hit.caption;
      caption.title = hit.caption;
      button.append(caption);
    }
    const path = document.createElement("div");
    path.className = "path";
    // shown from its end (the file name) when too long; the marks keep its slashes in place
    path.textContent = `\u200e${hit.path}\u200e`;
    path.title = hit.path;
    button.append(path);
    button.addEventListener("click", () => searchById(hit.id, true));
    const view = document.createElement("a");
    view.className = "view";
    view.href = itemUrl(index, hit.id, "image");
    view.textContent = "⤢";
    view.title = "Full size (V)";
    view.setAttribute("aria-label", `full size: ${hit.path}`);
    view.addEventListener("click", (e) => { e.preventDefault(); openViewer(start + i); });
    li.append(button, view);
    list.append(li);
  });
}

async function searchById(id, fromGrid = false) {
  if (fromGrid) $("drop").scrollIntoView({ block: "start" });  // back up to the query
  await search({ kind: "id", id });
  if (fromGrid) $("results").querySelector("button")?.focus({ preventScroll: true });
}

function searchImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    reset();  // never an old answer under a new error
    remember(true);
    showError(`${file.name || "That file"} is not an image.`);
    return;
  }
  const token = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
  uploads.set(token, file);
  if (uploads.size > MAX_UPLOADS) uploads.delete(uploads.keys().next().value);
  search({ kind: "image", file, token });
}

function again() {  // the settings changed: the same query again (a new history entry)
  const q = state.query;
  if (!q) { remember(false); return; }
  if (addressOf() === state.applied && !$("error").textContent) return;  // nothing changed (k's change on blur)
  if (q.kind === "id" && state.index !== $("index").value) {  // ids are per index
    reset();
    remember(true);
    status("Index changed: the item searched by is in another index; search again.");
    return;
  }
  search(q, true);
}

// ---- the full-size view and the keys ------------------------------------------------------------
const viewer = { at: -1 };
const SHOWN = new Set(["id", "path", "label", "score", "caption", "query"]);

function openViewer(n) {
  const hit = state.hits[n];
  if (!hit) return;
  viewer.at = n;
  const dialog = $("viewer");
  const img = $("viewer-img");
  img.alt = hit.label ? `${hit.label}: ${hit.path}` : hit.path;
  const url = itemUrl(state.index, hit.id, "image");
  img.dataset.id = hit.id;
  keyedImage(img, url, () => { if (viewer.at === n) $("viewer-meta").textContent = `${hit.path} — the server cannot read this image now.`; });
  const open = $("viewer-open");
  open.href = url;
  open.hidden = Boolean(state.key);  // a new tab would not send the key
  $("viewer-caption").textContent = hit.caption || "";
  $("viewer-caption").hidden = !hit.caption;
  const more = Object.entries(hit).filter(([k, v]) => !SHOWN.has(k) && v != null && typeof v !== "object")
    .map(([k, v]) => `${k}: ${v}`);  // the user's own columns, where the server sends them
  $("viewer-meta").textContent = [hit.label ?? "no label", `score ${hit.score.toFixed(3)}`, hit.path, ...more]
    .join(" · ");
  $("viewer-pos").textContent = `${n + 1} of ${state.hits.length}${state.end ? "" : "+"}`;
  $("viewer-prev").disabled = n === 0;
  $("viewer-next").disabled = n >= state.hits.length - 1 && state.end;
  if (!dialog.open) dialog.showModal();
}

async function step(by) {
  const n = viewer.at + by;
  if (n < 0) return;
  if (n >= state.hits.length && !state.end) await fetchPage();
  if (n < state.hits.length) {
    openViewer(n);
    cardAt(n)?.scrollIntoView({ block: "nearest" });
  }
}

function closeViewer() {
  const dialog = $("viewer");
  if (dialog.open) dialog.close();
}

function cardAt(n) { return $("results").querySelector(`button[data-n="${n}"]`); }

function columns() {
  const cards = [...$("results").children];
  if (!cards.length) return 1;
  const top = cards[0].offsetTop;
  const n = cards.findIndex((c) => c.offsetTop !== top);
  return n < 0 ? cards.length : n;
}

async function gridKey(e) {
  const card = e.target.closest?.("#results button");
  if (!card || e.ctrlKey || e.metaKey || e.altKey) return;
  const n = Number(card.dataset.n);
  const by = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns(), ArrowDown: columns() }[e.key];
  if (e.key === "v" || e.key === "V") { e.preventDefault(); openViewer(n); return; }
  if (by === undefined) return;
  e.preventDefault();
  let to = Math.max(0, n + by);
  if (to >= state.hits.length) {
    if (!state.end) await fetchPage();
    to = Math.min(to, state.hits.length - 1);
  }
  cardAt(to)?.focus();
}

function wireViewer() {
  const dialog = $("viewer");
  $("viewer-prev").addEventListener("click", () => step(-1));
  $("viewer-next").addEventListener("click", () => step(1));
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer-search").addEventListener("click", () => {
    const hit = state.hits[viewer.at];
    closeViewer();
    if (hit) searchById(hit.id, true);
  });
  dialog.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") { e.preventDefault(); step(-1); }
    else if (e.key === "ArrowRight") { e.preventDefault(); step(1); }
  });
  dialog.addEventListener("click", (e) => { if (e.target === dialog) closeViewer(); });  // the backdrop
  dialog.addEventListener("close", () => cardAt(viewer.at)?.focus({ preventScroll: false }));
  $("results").addEventListener("keydown", gridKey);
}

// ---- wiring -----------------------------------------------------------------------------------
function wireControls() {
  $("controls").addEventListener("submit", (e) => { e.preventDefault(); again(); });  // Enter in k
  $("label").addEventListener("change", again);
  $("k").addEventListener("change", again);
  $("exclude").addEventListener("change", () => { if (state.query?.kind === "id") again(); else remember(false); });
  $("index").addEventListener("change", () => { showInfo(); again(); });
  $("textform").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text").value;
    if (!text.trim()) { reset(); remember(true); showError("Type some words to search by."); return; }
    search({ kind: "text", text });
  });
  $("more").addEventListener("click", fetchPage);
  // infinite scroll: reaching the end of the list by scrolling fetches the next page
  new IntersectionObserver((entries) => {
    if (entries.some((x) => x.isIntersecting) && window.scrollY > 0 && !$("more").hidden) fetchPage();
  }).observe($("more"));
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
let pending = false;  // the address's search, to run when the Search view first shows

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
  else if (pending) { pending = false; applyAddress(); }
  else if (!$("results").children.length && !state.query) status(searchHint());
}

async function init() {
  wireDrop();
  wireControls();
  wireViewer();
  labelling = setupLabelling({ api, thumbnail, showError, status, indexes: () => state.indexes });
  window.addEventListener("hashchange", route);
  window.addEventListener("popstate", () => {  // Back/Forward across searches
    if (!state.indexes.length || location.search === state.applied) return;
    closeViewer();
    if (location.hash.startsWith("#label")) pending = true; else applyAddress();
  });
  try {
    state.indexes = await loadIndexes();
  } catch (e) { showError(e.message); status(""); return; }
  const select = $("index");
  for (const i of state.indexes) select.append(new Option(`${i.name} (${i.count})`, i.name));
  pending = true;
  showInfo();
  route();
}

init();
