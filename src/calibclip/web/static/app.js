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
    hasSuggestions: app.dataset.suggestions === "true",
    lastQuery: null,
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
    if (mode === "composed" && !state.reference && $("picker").hidden) loadSample();
  }
  for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => setMode(b.dataset.mode));
  $("index-select").addEventListener("change", (e) => {
    window.location.href = `/search?index=${encodeURIComponent(e.target.value)}&mode=${state.mode}`;
  });

  // ---- results ----------------------------------------------------------------------------
  function renderResults(data, explanation) {
    const grid = $("results");
    grid.replaceChildren();
    const heat = {};
    for (const im of (explanation && explanation.images) || []) heat[im.id] = im;
    for (const r of data.results) {
      const img = el("img", {src: r.thumb_url, alt: r.path, loading: "lazy"});
      const fig = el("figure", {class: "card" + (r.is_target ? " target" : ""), "data-id": r.id, tabindex: "0",
                                 title: "Use as reference and refine"}, [img]);
      if (heat[r.id]) {
        fig.appendChild(el("img", {class: "heatmap", src: heat[r.id].heatmap_url,
                                   alt: "calibration heatmap of " + r.path, loading: "lazy"}));
      }
      const cap = el("figcaption", {}, [
        el("span", {class: "rank", text: "#" + r.rank}),
        el("span", {class: "score", text: r.score.toFixed(3)}),
        el("span", {class: "path", text: r.path}),
      ]);
      if (r.is_target) cap.appendChild(el("span", {class: "badge", text: "ground truth"}));
      fig.appendChild(cap);
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
    app.dataset.searches = String(parseInt(app.dataset.searches || "0", 10) + 1);
  }

  function renderTokens(explanation) {
    const box = $("explanation");
    const tokens = $("tokens");
    tokens.replaceChildren();
    if (!explanation || !explanation.tokens.length) { box.hidden = true; return; }
    const max = Math.max(...explanation.tokens.map((t) => t.weight), 1e-9);
    for (const t of explanation.tokens) {
      const piece = t.token.startsWith("##");  // WordPiece continuation: glue to the previous token
      const span = el("span", {class: "token" + (t.dominant ? " dominant" : "") + (t.masked ? " masked" : "") +
                                      (piece ? " piece" : ""),
                               text: piece ? t.token.slice(2) : t.token,
                               title: `weight ${t.weight.toFixed(3)}` + (t.dominant ? " (dominant)" : "") +
                                      (t.masked ? " (masked and re-encoded)" : "")});
      span.style.setProperty("--w", (t.weight / max).toFixed(3));
      tokens.appendChild(span);
    }
    box.hidden = false;
  }

  async function runSearch(query) {
    const calibrate = $("calibrate").checked && state.canCalibrate;
    const body = {index: state.index, k: parseInt($("k").value, 10), calibrate: calibrate};
    if (query.text) body.text = query.text;
    if (query.reference) body.reference = query.reference;
    state.lastQuery = query;
    setStatus("Searching…");
    app.classList.add("busy");
    try {
      const data = await postJSON("/api/search", body);
      let explanation = null;
      if (calibrate) {
        try {
          explanation = await postJSON("/api/explain", {
            index: state.index, text: query.text || null, ids: data.results.slice(0, 20).map((r) => r.id),
          });
        } catch (e) { setStatus("Explanation failed: " + e.message, true); }
      }
      renderTokens(explanation);
      renderResults(data, explanation);
    } catch (e) {
      setStatus(e.message, true);
    } finally {
      app.classList.remove("busy");
    }
  }

  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text-query").value.trim();
    if (text) runSearch({text: text});
  });
  $("calibrate").addEventListener("change", () => { if (state.lastQuery) runSearch(state.lastQuery); });

  // ---- composed search ----------------------------------------------------------------------
  function setReference(ref) {
    state.reference = ref;
    const img = $("reference-img");
    img.src = ref.url;
    img.hidden = false;
    $("reference").classList.remove("empty");
    $("reference-caption").textContent = "Reference: " + (ref.path || "uploaded image");
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
