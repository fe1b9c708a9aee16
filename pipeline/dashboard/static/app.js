// SAE feature dashboard: works from file:// with no server and no network.
// Every token text goes into the page as text (textContent), never as markup.
"use strict";

window.SAE_DASHBOARD = (function () {
  const state = { vocab: [], index: null, chunks: {}, waiting: {} };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child) node.appendChild(child);
    return node;
  }

  function tokenText(id) {
    const text = id >= 0 && id < state.vocab.length ? state.vocab[id] : "<" + id + ">";
    return text.replace(/\n/g, "\u23CE");
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "";
    if (x !== 0 && Math.abs(x) < 1e-3) return x.toExponential(2);
    return Number(x).toFixed(digits === undefined ? 3 : digits);
  }

  // 0.0039 -> "0.39%", 3.9e-6 -> "0.00039%": two significant digits below 1%, never exponents
  // down to 1e-4 %
  function percent(x) {
    if (!x) return "0%";
    const p = 100 * x;
    if (p >= 1) return p.toFixed(2) + "%";
    return (p >= 1e-4 ? String(Number(p.toPrecision(2))) : p.toExponential(1)) + "%";
  }

  function setMeta(meta) {
    document.getElementById("meta").textContent =
      `${meta.sae} at ${meta.hook}${meta.hook_out ? " → " + meta.hook_out : ""} of ${meta.model_id} — ${meta.d_sae} features (${meta.silent_features} silent), ` +
      `${meta.tokens.toLocaleString()} tokens of ${meta.corpus_id}`;
  }

  // ------------------------------------------------------------ index page

  function explanationOf(id) {
    const e = state.explanations && state.explanations[String(id)];
    return e ? e.explanation : "";
  }

  function explanationCell(id) {
    const e = state.explanations && state.explanations[String(id)];
    return el("td", { class: "snippet", text: e ? `${e.explanation} (${fmt(e.detection, 2)})` : "" });
  }

  function renderReports() {
    // pages later stages made of these features (relevance, track, compare): link_report in Python
    const nav = document.getElementById("reports");
    if (!state.reports || !state.reports.length) return;
    nav.appendChild(document.createTextNode("Reports: "));
    state.reports.forEach((r, i) => {
      if (i) nav.appendChild(document.createTextNode(" · "));
      nav.appendChild(el("a", { href: r.href, text: r.title }));
    });
    nav.hidden = false;
  }

  function renderIndex() {
    const meta = state.index.meta;
    setMeta(meta);
    renderReports();
    document.getElementById("explanation-head").hidden = !state.explanations;
    document.getElementById("title").textContent = `Features of ${meta.sae}`;
    const rows = state.index.features;
    const body = document.querySelector("#features tbody");
    const filter = document.getElementById("filter");
    const hideSilent = document.getElementById("hide-silent");
    const onlyDetail = document.getElementById("only-detail");
    const more = document.getElementById("more");
    let sortKey = "frequency", descending = true, shown = 500;

    function matching() {
      const needle = filter.value.toLowerCase();
      return rows.filter((r) => (!hideSilent.checked || !r.silent) && (!onlyDetail.checked || r.detail) &&
        (!needle || r.top_tokens.concat(r.fires_on || []).some((t) => t.toLowerCase().includes(needle)) ||
         [].concat(r.example).join("").toLowerCase().includes(needle) ||
         explanationOf(r.id).toLowerCase().includes(needle)));
    }

    function draw() {
      const list = matching().sort((a, b) => (descending ? -1 : 1) * (a[sortKey] - b[sortKey]));
      body.textContent = "";
      for (const r of list.slice(0, shown)) {
        const link = el("a", { href: `feature.html#${r.id}`, text: String(r.id) });
        const quoted = (tokens) => el("td", { class: "snippet", text: tokens.map((t) => JSON.stringify(t)).join(" ") });
        const [before, at, after] = typeof r.example === "string" ? [r.example, "", ""] : r.example;
        const shown = (text) => text.replace(/\n/g, "\u23CE");
        const example = el("td", { class: "snippet" }, el("span", { text: shown(before) }),
          el("span", { class: "tok max", text: shown(at) }), el("span", { text: shown(after) }));
        body.appendChild(el("tr", { class: r.silent ? "silent" : "" },
          el("td", {}, link, r.detail ? el("span", { class: "detail", title: "has attributions", text: " ◆" }) : ""),
          el("td", { text: percent(r.frequency) }),
          el("td", { text: fmt(r.mean_activation, 2) }), el("td", { text: fmt(r.max_activation, 2) }),
          quoted(r.fires_on || []), quoted(r.top_tokens), example, state.explanations ? explanationCell(r.id) : null));
      }
      document.getElementById("count").textContent = `${list.length} features`;
      more.hidden = list.length <= shown;
    }

    for (const th of document.querySelectorAll("th[data-key]")) {
      th.addEventListener("click", () => {
        const key = th.getAttribute("data-key");
        descending = key === sortKey ? !descending : key !== "id";
        sortKey = key;
        draw();
      });
    }
    filter.addEventListener("input", draw);
    hideSilent.addEventListener("change", draw);
    onlyDetail.addEventListener("change", draw);
    more.addEventListener("click", () => { shown += 1000; draw(); });
    document.getElementById("goto").addEventListener("change", (e) => {
      window.location.href = `feature.html#${e.target.value}`;
    });
    draw();
  }

  // ------------------------------------------------------------ charts

  // counts[i] over bins [edges[i], edges[i + 1]); `ends`: the axis' two end labels (the true
  // extremes of the data); `scale`: how bins are spaced, said under the axis
  function barChart(counts, edges, ends, scale, options) {
    const width = 320, height = 110, pad = 30;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height + pad);
    const peak = Math.max(1, ...counts);
    const step = width / Math.max(1, counts.length);
    const text = (x, y, anchor, content) => {
      const node = document.createElementNS("http://www.w3.org/2000/svg", "text");
      node.setAttribute("x", x);
      node.setAttribute("y", y);
      node.setAttribute("text-anchor", anchor);
      node.setAttribute("font-size", "10");
      node.textContent = content;
      svg.appendChild(node);
    };
    counts.forEach((count, i) => {
      const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const h = (height * count) / peak;
      bar.setAttribute("x", i * step);
      bar.setAttribute("y", height - h);
      bar.setAttribute("width", Math.max(1, step - 1));
      bar.setAttribute("height", h);
      bar.setAttribute("class", options && options.negativeBelow !== undefined && i < options.negativeBelow ? "bar neg" : "bar");
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = `${fmt(edges[i], 3)} to ${fmt(edges[i + 1], 3)}: ${count}`;
      bar.appendChild(title);
      svg.appendChild(bar);
    });
    text(2, 10, "start", `${peak.toLocaleString()} ↑`);
    text(0, height + 12, "start", ends[0]);
    text(width, height + 12, "end", ends[1]);
    text(width / 2, height + 25, "middle", scale);
    return svg;
  }

  // ------------------------------------------------------------ feature page

  const tooltip = () => document.getElementById("tooltip");

  function showTip(event, lines) {
    const tip = tooltip();
    tip.textContent = lines.join("\n");
    tip.hidden = false;
    // kept inside the window: left of the pointer near the right edge, above it near the bottom
    const x = event.clientX + 12 + tip.offsetWidth > window.innerWidth ? event.clientX - 12 - tip.offsetWidth : event.clientX + 12;
    const y = event.clientY + 12 + tip.offsetHeight > window.innerHeight ? event.clientY - 12 - tip.offsetHeight : event.clientY + 12;
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  }

  const COLOURS = {
    activation: "Orange: the feature's activation on each token, darkest at its maximum over all examples; the boxed token is the example's maximum.",
    attribution: "Input attribution (gradient × input): blue tokens raised the pre-activation at the boxed token, red ones lowered it; scaled to each row's largest.",
    loss: "Loss contribution: blue where the feature helped predict that token (removing it raises the loss), red where it hurt; scaled to each row's largest.",
  };

  function exampleLine(example, peak, mode) {
    const line = el("div", { class: "example" });
    line.appendChild(el("span", { class: "act", text: fmt(example.activation, 2) }));
    if (example.outlier) {
      line.appendChild(el("span", { class: "outlier", text: "⚠ outlier",
        title: `this position's activation norm is ${fmt(example.norm_ratio, 1)}× the median (massive activation): ` +
          "a feature peaking here may track the outlier rather than a meaning" }));
    }
    const at = example.position - example.start;
    const signed = mode === "activation" ? null : example[mode];  // attribution or loss, per context token
    if (mode !== "activation" && !signed) line.classList.add("nodata");
    const signedPeak = signed ? Math.max(1e-9, ...signed.map((v) => Math.abs(v || 0))) : 1;
    example.ids.forEach((id, i) => {
      const act = example.acts[i];
      const span = el("span", { class: i === at ? "tok max" : "tok", text: tokenText(id) });
      if (signed) {
        const a = (signed[i] || 0) / signedPeak;
        span.style.background = a >= 0 ? `rgba(0,102,204,${Math.min(1, a)})` : `rgba(204,51,0,${Math.min(1, -a)})`;
      } else if (mode === "activation" && act > 0) {
        span.style.background = `rgba(255,120,0,${Math.min(1, act / peak).toFixed(3)})`;
      }
      span.addEventListener("mousemove", (event) => {
        const lines = [`token ${JSON.stringify(state.vocab[id] === undefined ? "" : state.vocab[id])}  id ${id}`,
          `activation ${fmt(act, 3)}`];
        if (example.loss) lines.push(`loss contribution ${fmt(example.loss[i], 4)} (change in the loss of predicting this token ` +
          "when the feature is removed; > 0: the feature helped)");
        if (example.attribution) lines.push(`input attribution ${fmt(example.attribution[i], 4)} (gradient x input)`);
        showTip(event, lines);
      });
      span.addEventListener("mouseleave", () => { tooltip().hidden = true; });
      line.appendChild(span);
    });
    return line;
  }

  function section(title, ...children) {
    return el("section", {}, el("h2", { text: title }), ...children);
  }

  function featureCell(id) {
    return el("td", {}, el("a", { href: `feature.html#${id}`, text: `#${id}` }));
  }

  // rows [id, value, ...]: the id's cell, then one cell per [heading, explanation, digits] column,
  // then (withSnippet) the tokens the feature fires on, from the index
  function valueTable(rows, idCell, columns, withSnippet) {
    const table = el("table", { class: "logits" });
    table.appendChild(el("tr", {}, el("th", { text: "" }),
      ...columns.map(([heading, title]) => el("th", { text: heading, title })),
      ...(withSnippet ? [el("th", { text: "fires on", title: "the tokens at its top examples' maxima" })] : [])));
    for (const [id, ...values] of rows) {
      const cells = values.map((v, i) => el("td", { title: columns[i][1], text: fmt(v, columns[i][2]) }));
      if (withSnippet) {
        const summary = state.index.features[id];
        const tokens = summary ? summary.fires_on || [] : [];
        cells.push(el("td", { class: "snippet", text: tokens.map((t) => JSON.stringify(t)).join(" ") }));
      }
      table.appendChild(el("tr", {}, idCell(id), ...cells));
    }
    if (!rows.length) table.appendChild(el("tr", {}, el("td", { text: "none" })));
    return table;
  }

  function logitTable(rows, cls) {
    const table = el("table", { class: "logits" });
    for (const [id, value] of rows) {
      table.appendChild(el("tr", {}, el("td", { class: cls, text: JSON.stringify(state.vocab[id] || "") }),
        el("td", { text: fmt(value, 3) })));
    }
    return table;
  }

  function drawFeature(record) {
    const meta = state.index.meta;
    const main = document.getElementById("feature");
    main.textContent = "";
    document.getElementById("title").textContent = `Feature ${record.id}` + (record.silent ? " (silent)" : "");
    document.title = `Feature ${record.id} — ${meta.sae}`;
    main.appendChild(el("p", { class: "small", text:
      `frequency ${percent(record.frequency)} (${record.count} of ${meta.tokens} tokens), ` +
      (record.top.length && record.top[0].outlier ? "peaks at an outlier position (⚠), " : "") +
      `mean activation ${fmt(record.mean_activation, 3)}, max ${fmt(record.max_activation, 3)}` }));
    const explained = state.explanations && state.explanations[String(record.id)];
    if (explained) {
      main.appendChild(el("p", {}, el("b", { text: "Explanation: " }), document.createTextNode(explained.explanation),
        el("span", { class: "small", text: ` (written by the explain stage's model; AUROC of a judge telling ` +
          `activating texts from others: detection ${fmt(explained.detection, 2)}, marked firing tokens from ` +
          `others: fuzzing ${fmt(explained.fuzzing, 2)}; 0.5 is chance)` })));
    }
    if (record.silent) {
      main.appendChild(el("p", { text: "This feature never fired on the analyzed tokens." }));
    }
    const peak = Math.max(record.max_activation, 1e-9);
    const grid = el("div", { class: "grid" });
    if (record.histogram.length) {
      const edges = meta.histogram_edges;
      let lo = record.histogram.findIndex((c) => c > 0), hi = record.histogram.length - 1;
      while (hi > lo && record.histogram[hi] === 0) hi--;
      const counts = record.histogram.slice(lo, hi + 1);
      const ends = [fmt(edges[lo], 2), `max ${fmt(record.max_activation, 2)}`];
      grid.appendChild(section("Activation density (firings by activation)",
        barChart(counts, edges.slice(lo, hi + 2), ends, "activation, log scale: bin edges ×√2 apart")));
    }
    const logits = record.logits;
    const bins = logits.histogram.length;
    const zeroBin = Math.floor(((0 - logits.low) / Math.max(1e-12, logits.high - logits.low)) * bins);
    const logitEdges = Array.from({ length: bins + 1 }, (_, i) => logits.low + ((logits.high - logits.low) * i) / bins);
    grid.appendChild(section("Logit effects (decoder direction → unembedding)",
      barChart(logits.histogram, logitEdges, [fmt(logits.low, 2), fmt(logits.high, 2)],
        "logit effect on each vocabulary token, linear scale", { negativeBelow: zeroBin })));
    grid.appendChild(section("Top promoted tokens", logitTable(logits.positive, "pos")));
    grid.appendChild(section("Top suppressed tokens", logitTable(logits.negative, "neg")));
    const dimCell = (dim) => el("td", { text: `dim ${dim}` });
    grid.appendChild(section("Model dimensions of the decoder direction (weight)",
      valueTable(record.dimensions, dimCell, [["weight", "decoder weight on this dimension", 3]])));
    grid.appendChild(section("Model dimensions correlated with the activation (Pearson r)",
      valueTable(record.correlated_dimensions || [], dimCell, [["r", "Pearson correlation over the analyzed tokens", 3]])));
    grid.appendChild(section("Co-activating features (by lift over independence)", valueTable(record.coactivation,
      featureCell, [["lift", "P(both fire) / (P(this) P(that)); 1 = independent", 2],
        ["together", "tokens on which both fired", 0], ["P(that | this)", "P(that fires | this fires)", 3]], true)));
    grid.appendChild(section("Nearest features by decoder direction (cosine)",
      valueTable(record.neighbours || [], featureCell, [["cosine", "cosine of the decoder directions", 3]], true)));
    main.appendChild(grid);

    let mode = "activation";
    const tops = el("div", { id: "top-examples" });
    const legend = el("p", { class: "small legend" });
    const groups = record.quantile_groups.map((group) => [group, el("div", {})]);
    const shown = record.top.concat(...record.quantile_groups.map((g) => g.examples));
    const computed = shown.filter((e) => e.attribution || e.loss).length;
    const draw = () => {  // every shown example, in the colour mode chosen
      legend.textContent = COLOURS[mode] + (mode !== "activation" && computed < shown.length ?
        ` Computed for the first ${computed} shown examples (analyze.detail_examples); the others are left grey.` : "");
      tops.textContent = "";
      for (const example of record.top) tops.appendChild(exampleLine(example, peak, mode));
      for (const [group, box] of groups) {
        box.textContent = "";
        for (const example of group.examples) box.appendChild(exampleLine(example, peak, mode));
        if (!group.examples.length) box.appendChild(el("p", { class: "small", text: "These firings are among the top activations above." }));
      }
    };
    const topTitle = el("h2", { text: "Top activations" });
    if (computed) {
      for (const [key, label] of [["activation", "activation"], ["attribution", "input attribution"], ["loss", "loss contribution"]]) {
        const button = el("button", { class: "toggle", "data-mode": key, text: `colour by ${label}` });
        button.addEventListener("click", () => { mode = key; draw(); });
        topTitle.appendChild(button);
      }
    }
    draw();
    main.appendChild(el("section", {}, topTitle, legend, tops));
    for (const [group, box] of groups) {
      const share = group.share === undefined ? "" : `: ≈ ${Math.round(100 * group.share)}% of its firings (a sample of ${group.sampled})`;
      main.appendChild(section(`Activations ${fmt(group.low, 2)} – ${fmt(group.high, 2)}${share}, random firings`, box));
    }
    if (record.steering) drawSteering(main, record.steering);
    if (record.synthesized) drawSynthesized(main, record);
    if (record.components) drawComponents(main, record);
  }

  // token sequences searched to make the feature fire, against the strongest corpus example
  function drawSynthesized(main, record) {
    const table = el("table", { class: "logits steering" });
    table.appendChild(el("tr", {}, el("th", { text: "search from" }), el("th", { text: "tokens found" }),
      el("th", { text: "activation" }), el("th", { text: "of the corpus max" }), el("th", { text: "log p per token" })));
    for (const found of record.synthesized) {
      table.appendChild(el("tr", {}, el("td", { text: found.start }),
        el("td", { text: found.ids.map((id) => tokenText(id)).join("") }), el("td", { text: fmt(found.activation, 3) }),
        el("td", { text: `${Math.round((100 * found.activation) / Math.max(1e-9, record.max_activation))}%` }),
        el("td", { text: fmt(found.logprob, 2) })));
    }
    main.appendChild(section(`Synthesized inputs (corpus max ${fmt(record.max_activation, 3)})`, table,
      el("p", { class: "small", text: "Short token sequences found by gradient-guided token swaps to make the feature fire at " +
        "the last token while staying likely under the model (analyze.synthesize). Above 100%: the corpus examples do not reach " +
        "what the feature can do." })));
  }

  // what the model writes when the feature is added at its hook at multiples of its max activation
  function drawSteering(main, steering) {
    const table = el("table", { class: "logits steering" });
    const scaleHead = (s) => `+${fmt(s.scale, 2)}× max (${fmt(s.scale * steering.unit, 3)})`;
    table.appendChild(el("tr", {}, el("th", { text: "prompt" }), el("th", { text: "plain model" }),
      ...steering.scales.map((s) => el("th", { text: scaleHead(s) }))));
    steering.prompts.forEach((prompt, i) => {
      table.appendChild(el("tr", {}, el("td", { class: "prompt", text: prompt }), el("td", { text: steering.plain[i] }),
        ...steering.scales.map((s) => el("td", { text: s.texts[i], title: `KL(steered || plain) of the next token: ${fmt(s.kl[i], 3)} nats` }))));
    });
    const rises = steering.scales.map((s) => `${s.promoted_rise >= 0 ? "+" : ""}${fmt(s.promoted_rise, 3)} at +${fmt(s.scale, 2)}×`).join(", ");
    const promoted = steering.promoted_tokens.map((id) => JSON.stringify(state.vocab[id] || "")).join(" ");
    main.appendChild(section("Steering: the feature added at its hook, greedy continuations", table,
      el("p", { class: "small", text: `Change in the log-probability of the next token being one of the 10 tokens it promotes ` +
        `(logit lens: ${promoted}), averaged over the prompts: ${rises}.` })));
  }

  function drawComponents(main, record) {
    const parts = record.components;
    const example = record.top[parts.example];
    const sorted = parts.components.slice().sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]));
    const table = el("table", { class: "logits" });
    const peak = Math.max(1e-9, ...sorted.map((c) => Math.abs(c[1])));
    for (const [name, value] of sorted.slice(0, 15)) {
      const bar = el("span", {});
      bar.style.display = "inline-block";
      bar.style.height = "8px";
      bar.style.width = `${(120 * Math.abs(value)) / peak}px`;
      bar.style.background = value >= 0 ? "#3b6ea8" : "#c0392b";
      table.appendChild(el("tr", {}, el("td", { text: name }), el("td", { text: fmt(value, 3) }), el("td", {}, bar)));
    }
    const rest = parts.unattributed || 0;
    if (rest) {
      table.appendChild(el("tr", { class: "small" }, el("td", { text: "not attributed" }), el("td", { text: fmt(rest, 3) }),
        el("td", { text: "the model adds its parts in its own dtype (bf16 rounds)" })));
    }
    main.appendChild(section(
      `Component attribution at the top example (pre-activation ${fmt(parts.pre_activation, 3)} = ` +
      `sum of the ${parts.components.length} parts + constant ${fmt(parts.constant, 3)}` +
      (rest ? ` + ${fmt(rest, 3)} not attributed)` : ")"), table));
    if (parts.head_sources.length) {
      main.appendChild(el("p", { class: "small", text:
        "Largest heads: the part each source token sent, pattern[dst, src] × (OV message from src · encoder " +
        "direction) (blue adds, red subtracts; sources before the shown context are not drawn)" }));
    }
    for (const head of parts.head_sources) {
      const line = el("div", { class: "example" });
      line.appendChild(el("span", { class: "act", text: head.component }));
      const headPeak = Math.max(1e-9, ...head.sources.map(Math.abs));
      head.sources.forEach((value, src) => {
        const inContext = src - example.start;
        if (inContext < 0) return;
        const span = el("span", { class: "tok", text: tokenText(example.ids[inContext]) });
        span.style.background = value >= 0 ? `rgba(0,102,204,${Math.min(1, value / headPeak)})` : `rgba(204,51,0,${Math.min(1, -value / headPeak)})`;
        span.addEventListener("mousemove", (event) => showTip(event,
          [`source position ${src}`, `pattern x (message . encoder direction) = ${fmt(value, 4)}`]));
        span.addEventListener("mouseleave", () => { tooltip().hidden = true; });
        line.appendChild(span);
      });
      main.appendChild(line);
    }
  }

  function loadChunk(n, then) {
    if (state.chunks[n]) return then(state.chunks[n]);
    (state.waiting[n] = state.waiting[n] || []).push(then);
    if (state.waiting[n].length > 1) return;
    const script = document.createElement("script");
    script.src = `data/chunk-${String(n).padStart(3, "0")}.js`;
    script.onerror = () => { document.getElementById("status").textContent = `cannot load ${script.src}`; };
    document.head.appendChild(script);
  }

  function renderFeature() {
    const meta = state.index.meta;
    setMeta(meta);
    const show = () => {
      const asked = window.location.hash.slice(1) || "0";
      const id = /^[0-9]+$/.test(asked) ? parseInt(asked, 10) : NaN;
      if (!(id < meta.d_sae)) {  // NaN too
        document.getElementById("title").textContent = `No feature ${JSON.stringify(decodeURIComponent(asked))}`;
        document.getElementById("feature").textContent = `This dictionary has features 0 to ${meta.d_sae - 1}.`;
        return;
      }
      document.getElementById("prev").href = `#${Math.max(0, id - 1)}`;
      document.getElementById("next").href = `#${Math.min(meta.d_sae - 1, id + 1)}`;
      loadChunk(Math.floor(id / meta.chunk_size), (records) => drawFeature(records[id % meta.chunk_size]));
    };
    document.getElementById("goto").addEventListener("change", (e) => { window.location.hash = e.target.value; });
    window.addEventListener("hashchange", show);
    show();
  }

  return {
    vocab(v) { state.vocab = v; },
    index(data) { state.index = data; },
    reports(list) { state.reports = list; },
    explanations(byId) { state.explanations = byId; },
    chunk(n, records) {
      state.chunks[n] = records;
      for (const then of state.waiting[n] || []) then(records);
      delete state.waiting[n];
    },
    renderIndex,
    renderFeature,
  };
})();
