// The labelling view: a selection (HOME/labelling/NAME.parquet, from `embedder select`) as a grid
// in rank order, the current image highlighted; a class per key (1–9) or button, new classes typed;
// undo (Ctrl/Cmd+Z); skip; progress. A label is shown at once and sent to the server (PUT/DELETE),
// one change at a time in the order given; one the server refuses is put back, with its error. Text
// from the server (ids, labels, why, paths) only ever goes into textContent, title or dataset: never
// into HTML.
const $ = (id) => document.getElementById(id);
const PAGE = 1000;

export function setupLabelling({ api, thumbnail, showError, status, indexes }) {
  const L = {
    name: null, index: null, items: [], byId: new Map(), total: 0, labelled: 0,
    classes: [], counts: new Map(), current: -1, undo: [], queue: Promise.resolve(), loading: 0,
  };

  const at = (i) => L.items[i];
  const tileOf = (id) => $("lab-grid").querySelector(`[data-pos="${L.byId.get(id)}"]`);

  function showProgress(progress) {
    L.labelled = progress.labelled;
    L.total = progress.total;
    $("lab-progress").max = Math.max(1, progress.total);
    $("lab-progress").value = progress.labelled;
    $("lab-count").textContent = `${progress.labelled} / ${progress.total} labelled`;
    const option = [...$("lab-selection").options].find((o) => o.value === L.name);
    if (option) option.textContent = `${L.name} (${progress.labelled} / ${progress.total})`;
  }

  function mergeClasses(classes) {
    L.counts = new Map(classes.map((c) => [c.name, c.count]));
    for (const c of classes) if (!L.classes.includes(c.name)) L.classes.push(c.name);
    renderClasses();
  }

  function renderClasses() {
    const bar = $("lab-classes");
    bar.replaceChildren();
    L.classes.forEach((name, n) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "class";
      b.dataset.class = name;
      const key = document.createElement("kbd");
      key.textContent = n < 9 ? String(n + 1) : "";
      const text = document.createElement("span");
      text.textContent = name;
      const count = document.createElement("span");
      count.className = "count";
      count.textContent = String(L.counts.get(name) || 0);
      b.append(key, text, count);
      b.title = n < 9 ? `label the current image "${name}" (key ${n + 1})` : `label the current image "${name}"`;
      b.addEventListener("click", () => give(name));
      bar.append(b);
    });
  }

  function tile(item, pos) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "tile";
    b.dataset.pos = String(pos);
    b.dataset.id = item.id;
    b.title = item.why ? `#${item.rank}: ${item.why}` : `#${item.rank}`;
    if (item.in_index === false || !L.index) {
      const missing = document.createElement("div");
      missing.className = "missing";
      missing.textContent = L.index ? `not in index ${L.index}` : "no index to show it from";
      b.append(missing);
    } else {
      const img = document.createElement("img");
      img.loading = "lazy";
      img.alt = item.path || item.id;
      if (L.index) thumbnail(img, L.index, item.id);
      b.append(img);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${item.rank}`;
    const label = document.createElement("span");
    label.className = "label";
    meta.append(rank, label);
    const why = document.createElement("div");
    why.className = "why";
    why.textContent = item.why || "";
    b.append(meta, why);
    b.addEventListener("click", () => setCurrent(pos));
    li.append(b);
    paint(b, item);
    return li;
  }

  function paint(b, item) {
    b.querySelector(".label").textContent = item.label ?? "—";
    b.classList.toggle("done", item.label != null);
  }

  function setCurrent(pos) {
    const old = $("lab-grid").querySelector(".tile.current");
    if (old) { old.classList.remove("current"); old.removeAttribute("aria-current"); }
    L.current = pos;
    const item = at(pos);
    const line = $("lab-current");
    if (!item) {
      line.textContent = L.total && L.labelled >= L.total ? `All ${L.total} labelled.`
        : "No image chosen: click one, or → for the next.";
      return;
    }
    const b = tileOf(item.id);
    if (b) {
      b.classList.add("current");
      b.setAttribute("aria-current", "true");
      b.scrollIntoView({ block: "nearest" });
    }
    line.textContent = `#${item.rank}${item.label ? ` (now ${item.label})` : ""}${item.why ? ` · ${item.why}` : ""}`;
  }

  function nextUnlabelled(from) {
    for (let i = from + 1; i < L.items.length; i++) if (at(i).label == null) return i;
    for (let i = 0; i <= Math.min(from, L.items.length - 1); i++) if (at(i).label == null) return i;
    return -1;
  }

  function applied(change) {  // the server's answer to a PUT or DELETE
    const item = at(L.byId.get(change.id));
    if (item) {
      item.label = change.label;
      const b = tileOf(change.id);
      if (b) paint(b, item);
    }
    showProgress(change.progress);
    mergeClasses(change.classes);
  }

  function send(name, id, label) {
    const path = `/labelling/${encodeURIComponent(name)}/labels/${encodeURIComponent(id)}`;
    return label == null ? api(path, { method: "DELETE" })
      : api(path, { method: "PUT", headers: { "content-type": "application/json" },
                    body: JSON.stringify({ label }) });
  }

  function enqueue(work) {  // one change at a time, in the order asked
    L.queue = L.queue.then(work).catch((e) => showError(e.message));
    return L.queue;
  }

  function give(label) {  // label the current image, then on to the next unlabelled one
    const pos = L.current;
    const item = at(pos);
    if (!item || !L.name) return Promise.resolve();
    const name = L.name;
    const before = item.label;
    const added = label != null && !L.classes.includes(label);
    if (added) { L.classes.push(label); renderClasses(); }
    // shown at once (and so skipped by the next key press); put back if the server refuses it
    item.label = label;
    const b = tileOf(item.id);
    if (b) paint(b, item);
    if (label != null) { const next = nextUnlabelled(pos); setCurrent(next === pos ? -1 : next); }
    return enqueue(async () => {  // sent even if another selection was opened meanwhile
      let change;
      try {
        change = await send(name, item.id, label);
      } catch (e) {
        if (name === L.name) {
          item.label = before;
          if (b) paint(b, item);
          if (added && !L.counts.get(label)) { L.classes = L.classes.filter((c) => c !== label); renderClasses(); }
          setCurrent(pos);
        }
        throw e;
      }
      if (name !== L.name) return;
      showError("");
      if (change.previous !== change.label) L.undo.push({ id: change.id, before: change.previous });
      applied(change);
      if (L.current === pos || L.current === -1) setCurrent(L.current);  // refresh its line
    });
  }

  function undo() {
    return enqueue(async () => {
      const last = L.undo.pop();
      if (!last || !L.name) { status("nothing to undo"); return; }
      showError("");
      let change;
      try {
        change = await send(L.name, last.id, last.before);
      } catch (e) {
        L.undo.push(last);  // still there to undo
        throw e;
      }
      applied(change);
      setCurrent(L.byId.get(last.id));
      status("undone");
    });
  }

  function move(step) {
    if (!L.items.length) return;
    const pos = L.current < 0 ? 0 : Math.max(0, Math.min(L.items.length - 1, L.current + step));
    setCurrent(pos);
  }

  function skip() {
    if (!L.items.length) return;
    const next = nextUnlabelled(L.current);
    setCurrent(next === L.current || next < 0 ? Math.min(L.items.length - 1, L.current + 1) : next);
  }

  async function load(name, index, offset = 0) {
    const ticket = ++L.loading;
    const q = new URLSearchParams({ offset: String(offset), limit: String(PAGE) });
    if (index) q.set("index", index);
    const page = await api(`/labelling/${encodeURIComponent(name)}?${q}`);
    if (ticket !== L.loading) return;  // another selection was chosen meanwhile
    if (offset === 0) {
      Object.assign(L, { name, index, items: [], byId: new Map(), classes: [], undo: [], current: -1 });
      $("lab-grid").replaceChildren();
    }
    const grid = $("lab-grid");
    for (const item of page.items) {
      const pos = L.items.length;
      L.items.push(item);
      L.byId.set(item.id, pos);
      grid.append(tile(item, pos));
    }
    showProgress(page.progress);
    mergeClasses(page.classes);
    $("lab-more").hidden = L.items.length >= page.progress.total;
    const missing = L.items.filter((i) => i.in_index === false).length;
    const note = $("lab-note");
    note.hidden = !missing;
    note.textContent = missing ? `${missing} of these images are not in index ${index}: choose the index made `
      + `from the store the selection was made from to see them.` : "";
    if (offset === 0) setCurrent(nextUnlabelled(-1));
    const m = page.meta || {};
    status(`${name}: ${page.progress.total} images${m.strategy ? ` picked by ${m.strategy}` : ""}`
      + `${m.store ? ` from ${m.store}` : ""} · labels in ${page.labels_file}`);
  }

  function fromHash() {  // #label/NAME; a link cut short or typed by hand (%E0%A4) names none
    try { return decodeURIComponent(location.hash.split("/")[1] || ""); } catch { return ""; }
  }

  async function open() {  // the view is shown: list the selections and indexes
    showError("");
    const choose = $("lab-index");
    if (!choose.options.length) for (const i of indexes()) choose.append(new Option(i.name, i.name));
    let list;
    try { list = await api("/labelling"); } catch (e) { showError(e.message); return; }
    const select = $("lab-selection");
    const wanted = fromHash() || select.value;
    select.replaceChildren();
    for (const s of list) {
      const text = s.size == null ? `${s.name} (not a selection)`
        : s.labelled == null ? `${s.name} (its labels file cannot be read)` : `${s.name} (${s.labelled} / ${s.size})`;
      const option = new Option(text, s.name);
      option.disabled = s.size == null;
      if (s.error) option.title = s.error;
      select.append(option);
    }
    const usable = list.filter((s) => s.size != null).map((s) => s.name);
    if (!usable.length) {
      $("lab-grid").replaceChildren();
      status("");
      showError(list.length ? "no file in HOME/labelling is a selection (see each one's reason)"
        : "no selection to label: write one with `embedder select STORE --budget 100 --out "
          + "HOME/labelling/round1.parquet` (HOME: the server's --home)");
      return;
    }
    select.value = usable.includes(wanted) ? wanted : usable[0];
    await choose_();
  }

  async function choose_() {
    const name = $("lab-selection").value;
    history.replaceState(null, "", `#label/${encodeURIComponent(name)}`);
    showError("");
    try { await load(name, $("lab-index").value || null); } catch (e) { showError(e.message); }
  }

  function typing(target) {
    return target instanceof HTMLInputElement || target instanceof HTMLSelectElement
      || target instanceof HTMLTextAreaElement;
  }

  function onKey(e) {
    if ($("label-view").hidden || typing(e.target)) return;
    if ((e.ctrlKey || e.metaKey) && !e.shiftKey && e.key.toLowerCase() === "z") {
      e.preventDefault();
      undo();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (/^[1-9]$/.test(e.key)) {
      const name = L.classes[Number(e.key) - 1];
      if (name != null) { e.preventDefault(); give(name); }
    } else if (e.key === "0" || e.key === "Delete" || e.key === "Backspace") {
      e.preventDefault();
      give(null);
    } else if (e.key === "ArrowRight" || e.key === "s" || e.key === "S") {
      e.preventDefault();
      skip();
    } else if (e.key === "ArrowLeft") {
      e.preventDefault();
      move(-1);
    }
  }

  $("lab-selection").addEventListener("change", choose_);
  $("lab-index").addEventListener("change", choose_);
  $("lab-undo").addEventListener("click", undo);
  $("lab-skip").addEventListener("click", skip);
  $("lab-clear").addEventListener("click", () => give(null));
  $("lab-more").addEventListener("click", () => load(L.name, L.index, L.items.length)
    .catch((e) => showError(e.message)));
  $("lab-new").addEventListener("submit", (e) => {
    e.preventDefault();
    const box = $("lab-new-class");
    const name = box.value.trim();
    if (!name) return;
    box.value = "";
    box.blur();  // the keys label again
    if (L.current >= 0) give(name);
    else if (!L.classes.includes(name)) { L.classes.push(name); renderClasses(); }
  });
  document.addEventListener("keydown", onKey);
  return { open };
}
