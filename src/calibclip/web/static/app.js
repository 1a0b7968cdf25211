// calibclip web demo: text search, calibrated search with explanations, composed search with
// click-to-refine. Plain DOM + fetch against the JSON API (see /docs); no build step.
"use strict";

(function () {
  const app = document.getElementById("app");
  if (!app) return;
  const $ = (id) => document.getElementById(id);
  const state = {
    index: app.dataset.index,
    mode: app.dataset.mode,
    reference: null,        // {id, thumb_url, url, path}
    canCalibrate: app.dataset.calibration === "true",
    canRerank: app.dataset.rerank === "true",
    hasSuggestions: app.dataset.suggestions === "true",
    lastQuery: {text: null, composed: null},  // last query of each tab (re-run when Calibrate changes)
    shown: {text: null, composed: null},  // last results of each tab: {data, calibrated, text}
    seq: 0,                               // number of the latest search (late answers are dropped)
  };

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children || []) node.appendChild(c);
    return node;
  }

  // File names and paths: allow line breaks after separators (never inside a word of letters).
  function breakable(text) {
    const frag = document.createDocumentFragment();
    for (const part of String(text).split(/(?<=[_\-./])/)) {
      frag.appendChild(document.createTextNode(part));
      frag.appendChild(document.createElement("wbr"));
    }
    return frag;
  }

  async function api(path, options) {
    const resp = await fetch(path, options);
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) throw new Error((body && body.detail) || `HTTP ${resp.status}`);
    return body;
  }
  const postJSON = (path, data) => api(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(data),
  });

  function setStatus(msg, isError) {
    const s = $("status");
    s.textContent = msg || "";
    s.classList.toggle("error", !!isError);
  }

  // ---- tabs -------------------------------------------------------------------------------
  function setMode(mode) {
    state.mode = mode;
    for (const m of ["text", "composed"]) {
      $("panel-" + m).hidden = m !== mode;
      $("tab-" + m).setAttribute("aria-selected", String(m === mode));
    }
    const url = new URL(window.location.href);
    url.searchParams.set("mode", mode);
    window.history.replaceState(null, "", url);
    showTab(mode);
    if (mode === "composed" && !state.reference && $("picker").hidden) loadSample();
  }

  // Each tab shows only its own last results (text results do not linger under Composed).
  function showTab(mode) {
    const shown = state.shown[mode];
    if (shown) {
      renderResults(shown.data, shown.calibrated, false);
      if (shown.calibrated && shown.text) loadTokens(shown.text); else renderTokens(null);
    } else {
      $("results").replaceChildren();
      renderTokens(null);
      setStatus("");
    }
  }
  for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => setMode(b.dataset.mode));
  $("index-select").addEventListener("change", (e) => {
    window.location.href = `/search?index=${encodeURIComponent(e.target.value)}&mode=${state.mode}`;
  });

  // ---- results ----------------------------------------------------------------------------
  function renderResults(data, calibrated, count) {
    const grid = $("results");
    grid.replaceChildren();
    for (const r of data.results) {
      const img = el("img", {src: r.thumb_url, alt: r.path, loading: "lazy"});
      const fig = el("figure", {class: "card" + (r.is_target ? " target" : ""), "data-id": r.id, tabindex: "0",
                                 title: "Use as reference and refine"}, [img]);
      if (calibrated) {
        // fetched lazily, per card, when it scrolls into view; cached by the browser and the server
        fig.appendChild(el("img", {class: "heatmap", src: `/api/heatmap/${encodeURIComponent(r.id)}` +
                                   `?index=${encodeURIComponent(state.index)}`,
                                   alt: "calibration heatmap of " + r.path, loading: "lazy"}));
      }
      const path = el("span", {class: "path", title: r.path});
      path.appendChild(breakable(r.path));
      const cap = el("figcaption", {}, [
        el("span", {class: "rank", text: "#" + r.rank}),
        el("span", {class: "score", text: r.score.toFixed(3)}),
        path,
      ]);
      if (r.is_target) cap.appendChild(el("span", {class: "badge", text: "ground truth"}));
      if (r.reranked) cap.appendChild(el("span", {class: "badge reranked", text: "re-ranked"}));
      fig.appendChild(cap);
      if (r.match_url) {
        // the re-ranker's word -> region attention, fetched only when asked for
        const why = el("button", {type: "button", class: "chip why", text: "words → regions"});
        why.addEventListener("click", (e) => {
          e.stopPropagation();
          let img = fig.querySelector("img.match");
          if (img) { img.hidden = !img.hidden; return; }
          img = el("img", {class: "match", src: r.match_url, alt: "re-ranker cross-attention of the query words over " + r.path});
          fig.appendChild(img);
        });
        fig.appendChild(why);
      }
      const choose = () => useAsReference(r);
      fig.addEventListener("click", choose);
      fig.addEventListener("keydown", (e) => { if (e.key === "Enter") choose(); });
      grid.appendChild(fig);
    }
    let msg = `${data.results.length} results`;
    if (data.target) {
      const found = data.results.find((r) => r.is_target);
      msg += found ? ` · ground-truth target at rank ${found.rank}` : " · ground-truth target not in these results";
    }
    setStatus(msg + " · click a result to use it as the reference and refine");
    if (count !== false) app.dataset.searches = String(parseInt(app.dataset.searches || "0", 10) + 1);
  }

  function renderTokens(explanation) {
    const box = $("explanation");
    const tokens = $("tokens");
    tokens.replaceChildren();
    if (!explanation || !explanation.tokens.length) { box.hidden = true; return; }
    const max = Math.max(...explanation.tokens.map((t) => t.weight), 1e-9);
    let word = null;
    for (const t of explanation.tokens) {
      const piece = t.token.startsWith("##");  // WordPiece continuation: part of the previous word
      const span = el("span", {class: "token" + (t.dominant ? " dominant" : "") + (t.masked ? " masked" : ""),
                               text: piece ? t.token.slice(2) : t.token,
                               title: `weight ${t.weight.toFixed(3)}` + (t.dominant ? " (dominant)" : "") +
                                      (t.masked ? " (masked and re-encoded)" : "")});
      span.style.setProperty("--w", (t.weight / max).toFixed(3));
      if (!piece || !word) {
        word = el("span", {class: "word"});
        tokens.appendChild(word);
        tokens.appendChild(document.createTextNode(" "));
      }
      word.appendChild(span);
    }
    box.hidden = false;
  }

  const tokenCache = new Map();  // query text -> explanation of its words
  async function loadTokens(text) {
    const key = state.index + "\u0000" + text;
    try {
      if (!tokenCache.has(key)) tokenCache.set(key, await postJSON("/api/explain", {index: state.index, text: text}));
      const current = state.shown[state.mode];
      if (current && current.text === text && current.calibrated) renderTokens(tokenCache.get(key));
    } catch (e) { tokenCache.delete(key); setStatus("Explanation failed: " + e.message, true); }
  }

  async function runSearch(query) {
    const calibrate = $("calibrate").checked && state.canCalibrate;
    const body = {index: state.index, k: parseInt($("k").value, 10), calibrate: calibrate};
    // the re-ranker re-scores text queries (the Text search tab) only
    const rerank = $("rerank").checked && state.canRerank && !!query.text && !query.reference;
    if (rerank) body.rerank = true;
    $("rerank-legend").hidden = !rerank;
    if (query.text) body.text = query.text;
    if (query.reference) body.reference = query.reference;
    const mode = state.mode;
    const seq = ++state.seq;
    state.lastQuery[mode] = query;
    setStatus("Searching…");
    app.classList.add("busy");
    try {
      const data = await postJSON("/api/search", body);
      if (seq !== state.seq) return;  // a newer search was started meanwhile
      state.shown[mode] = {data: data, calibrated: calibrate, text: query.text || null};
      if (state.mode !== mode) return;
      renderTokens(null);
      renderResults(data, calibrate);  // at once; explanations follow lazily
      if (calibrate && query.text) loadTokens(query.text);
    } catch (e) {
      if (seq === state.seq) setStatus(e.message, true);
    } finally {
      if (seq === state.seq) app.classList.remove("busy");
    }
  }

  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text-query").value.trim();
    if (text) runSearch({text: text});
  });
  $("calibrate").addEventListener("change", () => {
    const query = state.lastQuery[state.mode];
    if (query) runSearch(query);
  });
  $("rerank").addEventListener("change", () => {
    const query = state.lastQuery[state.mode];
    if (query && query.text && !query.reference) runSearch(query);
  });

  // ---- composed search ----------------------------------------------------------------------
  function setReference(ref) {
    state.reference = ref;
    const img = $("reference-img");
    img.src = ref.url;
    img.hidden = false;
    $("reference").classList.remove("empty");
    const caption = $("reference-caption");
    caption.replaceChildren(document.createTextNode("Reference: "), breakable(ref.path || "uploaded image"));
    $("picker").hidden = true;
    loadSuggestions();
  }

  function useAsReference(r) {
    $("upload-status").textContent = "";
    setReference(r);
    if (state.mode !== "composed") setMode("composed");
    $("modification").value = "";
    $("modification").focus();
    window.scrollTo({top: 0, behavior: "smooth"});
  }

  function renderPicker(items, label) {
    const picker = $("picker");
    picker.replaceChildren(el("p", {class: "picker-label", text: label}));
    for (const it of items) {
      const fig = el("figure", {class: "card pick", "data-id": it.id, tabindex: "0", title: it.path}, [
        el("img", {src: it.thumb_url, alt: it.path, loading: "lazy"}),
      ]);
      fig.addEventListener("click", () => setReference(it));
      fig.addEventListener("keydown", (e) => { if (e.key === "Enter") setReference(it); });
      picker.appendChild(fig);
    }
    picker.hidden = false;
  }

  async function loadSample() {
    try {
      const seed = Math.floor(Math.random() * 2147483647);
      const data = await api(`/api/sample?index=${encodeURIComponent(state.index)}&n=12&seed=${seed}` +
                             (state.hasSuggestions ? "&annotated=true" : ""));
      renderPicker(data.items, "Pick a reference:");
    } catch (e) { setStatus(e.message, true); }
  }
  $("sample-button").addEventListener("click", loadSample);

  $("find-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("find-query").value.trim();
    if (!text) return;
    try {
      const data = await postJSON("/api/search", {index: state.index, text: text, k: 12});
      renderPicker(data.results, `References matching “${text}”:`);
    } catch (err) { setStatus(err.message, true); }
  });

  $("upload-input").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file);
    $("upload-status").textContent = "Uploading…";
    $("upload-status").classList.remove("error");
    try {
      const data = await api("/api/upload", {method: "POST", body: form});
      $("upload-status").textContent = `Uploaded (${data.width}×${data.height}).`;
      setReference({id: data.id, url: data.url, thumb_url: data.thumb_url, path: file.name});
    } catch (err) {
      $("upload-status").textContent = err.message;
      $("upload-status").classList.add("error");
    } finally {
      e.target.value = "";
    }
  });

  async function loadSuggestions() {
    const box = $("suggestions");
    box.replaceChildren();
    box.hidden = true;
    if (!state.hasSuggestions || !state.reference || state.reference.id.startsWith("u-")) return;
    try {
      const data = await api(`/api/suggestions?index=${encodeURIComponent(state.index)}` +
                             `&reference=${encodeURIComponent(state.reference.id)}`);
      if (!data.suggestions.length) return;
      box.appendChild(el("span", {class: "label", text: "Suggested modifications:"}));
      for (const s of data.suggestions) {
        box.appendChild(el("button", {type: "button", class: "chip", text: s.text, onclick: () => {
          $("modification").value = s.text;
          runSearch({text: s.text, reference: state.reference.id});
        }}));
      }
      box.hidden = false;
    } catch (e) { setStatus(e.message, true); }
  }

  $("composed-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("modification").value.trim();
    if (!state.reference) { setStatus("Choose or upload a reference image first.", true); return; }
    runSearch({text: text || null, reference: state.reference.id});
  });

  setMode(state.mode);
})();
