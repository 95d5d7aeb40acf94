// The script of `undo report --html` (undo_cli/loop/report_html.py builds the page around it).
// It only displays what report_data.py computed: the transitions and their counts come from the page's
// index, never recomputed here. Model text is put on the page with text nodes (el(), below), never parsed
// as HTML. The heavy text sits in zlib-compressed chunks that are inflated when a page of the list needs them.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("undo-index").textContent);
  const $ = (id) => document.getElementById(id);
  const NAMES = { F: "fixed", R: "regressed", W: "still_wrong", S: "still_right" };
  const STATUS = { c: "right", w: "wrong_answer", n: "no_answer", t: "truncated", "-": "not evaluated" };
  const mark = (name) => { document.documentElement.dataset[name] = performance.now().toFixed(1); };
  let busy = Promise.resolve();  // the render in progress; tests and the benchmark wait on window.undoReport.idle()

  // An element with text children only: strings become text nodes, whatever they contain.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // --- chunks: base64 of zlib-compressed JSON, in script elements of type application/octet-stream (id cN) after this one ---
  const ready = new Promise((resolve) => {
    if (document.readyState !== "loading") resolve();
    else document.addEventListener("DOMContentLoaded", resolve, { once: true });
  });
  const cache = new Map();
  function chunk(n) {
    if (!cache.has(n)) {
      cache.set(n, ready.then(async () => {
        const bin = atob($("c" + n).textContent);
        const bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
        const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
        return JSON.parse(await new Response(stream).text());
      }));
    }
    return cache.get(n);
  }
  const item = (group, i) => chunk(group.chunks[Math.floor(i / group.chunk_size)]).then((c) => c[i % group.chunk_size]);
  // A problem's [question, gold], and its [output, predicted] at one iteration (by position): one chunk each.
  const block = (g, i) => Math.floor(i / g.chunk_size);
  const question = (g, i) => chunk(g.questions[block(g, i)]).then((c) => c[i % g.chunk_size]);
  const output = (g, i, pos) => chunk(g.outputs[pos][block(g, i)]).then((c) => c[i % g.chunk_size] || [null, null]);

  // --- pagination shared by both lists ---
  function pager(ids, state, total, onchange) {
    const pages = Math.max(1, Math.ceil(total / state.size));
    state.page = Math.min(state.page, pages - 1);
    const first = state.page * state.size || 0;  // page 0 of "all" is 0 * Infinity: NaN
    const last = Math.min(total, first + state.size);
    for (const id of ids) {
      const go = (d) => () => { state.page += d; onchange(true); };
      $(id).replaceChildren(
        el("button", { onclick: go(-1), ...(state.page === 0 ? { disabled: "" } : {}) }, "◀ previous"),
        total ? `${first + 1}–${last} of ${total} (page ${state.page + 1} of ${pages})` : "none",
        el("button", { onclick: go(1), ...(state.page >= pages - 1 ? { disabled: "" } : {}) }, "next ▶"));
    }
    return [first, last];
  }
  const sizeOf = (v) => (v === "all" ? Infinity : Number(v));
  function render(list, work) {
    busy = busy.then(work).catch((e) => {
      list.replaceChildren(el("p", { class: "wrong" }, "could not show this part of the report: " + e));
    });
    return busy;
  }

  // --- transitions -------------------------------------------------------------------------------------
  const pairs = [];
  for (const split of D.splits) for (const p of split.pairs) pairs.push({ ...p, group: split });
  const T = { pair: 0, code: "", type: "", page: 0, size: 20 };

  function pairLabel(p) {
    const side = (k) => (k === D.run.best_iteration ? `${k} (chosen)` : `${k}`);
    return p.split === "test" ? `test: one-shot (0) → ${side(p.b)}` : `validation: iteration ${p.a} → ${side(p.b)}`;
  }

  function setupTransitions() {
    if (!pairs.length) {
      $("t-list").replaceChildren(el("p", { class: "muted" }, "nothing to compare yet: transitions need two finished " +
        "evaluations (iterations 0 and 1 on validation)"));
      return false;
    }
    const select = $("t-pair");
    pairs.forEach((p, i) => select.append(el("option", { value: String(i) }, pairLabel(p) + (p.counts ? "" : " (not finished)"))));
    const finished = pairs.map((p, i) => [p, i]).filter(([p]) => p.counts && p.split === "val");
    T.pair = finished.length ? finished[finished.length - 1][1] : 0;
    const start = pairs[T.pair].counts;  // open on what changed, when something did
    T.code = start && start.fixed + start.regressed ? "FR" : "";
    select.value = String(T.pair);
    select.onchange = () => { T.pair = Number(select.value); T.page = 0; showTransitions(); };
    $("t-type").onchange = (e) => { T.type = e.target.value; T.page = 0; showTransitions(); };
    $("t-size").onchange = (e) => { T.size = sizeOf(e.target.value); T.page = 0; showTransitions(); };
    return true;
  }

  function countButtons(p) {
    const all = Object.values(p.counts).reduce((a, b) => a + b, 0);
    const button = (code, label, n, name) => el("button", {
      class: T.code === code ? "on" : "", "data-transition": name,
      onclick: () => { T.code = code; T.page = 0; showTransitions(); },
    }, label, el("b", { class: "count" }, String(n)));
    $("t-counts").replaceChildren(button("", "all", all, "all"),
      button("FR", "changed", p.counts.fixed + p.counts.regressed, "changed"),
      ...Object.entries(NAMES).map(([code, name]) => button(code, name.replace("_", " "), p.counts[name], name)));
  }

  function selected(p) {
    const g = p.group, a = g.iterations.indexOf(p.a), b = g.iterations.indexOf(p.b), out = [];
    for (let i = 0; i < p.codes.length; i++) {
      const c = p.codes[i];
      if (c === "-" || (T.code && !T.code.includes(c))) continue;
      if (T.type && g.status[i][a] !== T.type && g.status[i][b] !== T.type) continue;
      out.push(i);
    }
    return out;
  }

  function showTransitions(scroll) {
    const p = pairs[T.pair];
    $("t-note").textContent = p.note || "";
    if (!p.counts) {
      $("t-counts").replaceChildren();
      $("t-list").replaceChildren();
      return busy;
    }
    countButtons(p);
    const chosen = selected(p);
    const [first, last] = pager(["t-pager", "t-pager2"], T, chosen.length, showTransitions);
    const list = $("t-list");
    return render(list, async () => {
      const cards = await Promise.all(chosen.slice(first, last).map((i) => problemCard(p, i)));
      list.replaceChildren(...(cards.length ? cards : [el("p", { class: "muted" }, "no problem matches these filters")]));
      if (scroll) $("transitions").scrollIntoView();
    });
  }

  function outcome(g, i, pos, predicted) {
    const s = g.status[i][pos];
    if (s === "-") return el("span", { class: "muted" }, "not evaluated");
    const right = s === "c";
    return el("span", { class: right ? "right" : "wrong" }, right ? "right" : `wrong (${STATUS[s]})`,
      `, answered ${predicted === null || predicted === undefined ? "nothing" : predicted}`);
  }

  async function problemCard(p, i) {
    const g = p.group, code = p.codes[i];
    const [a, b] = [g.iterations.indexOf(p.a), g.iterations.indexOf(p.b)];
    const [[text, gold], outA, outB] = await Promise.all([question(g, i), output(g, i, a), output(g, i, b)]);
    const side = (k, pos, [out, predicted]) => el("div", { class: "side" },
      el("h4", null, `iteration ${k}: `, outcome(g, i, pos, predicted)), el("pre", null, out ?? ""));
    const all = el("details", { ontoggle: (e) => { if (e.target.open && !e.target.dataset.done) everyIteration(e.target, g, i); } },
      el("summary", null, `every iteration (${g.iterations.length})`));
    return el("article", { class: "problem", "data-id": g.ids[i], "data-transition": NAMES[code] },
      el("header", null, el("span", { class: `badge ${NAMES[code]}` }, NAMES[code].replace("_", " ")),
        el("code", null, g.ids[i]), el("span", null, "gold: ", el("b", null, gold ?? ""))),
      el("p", { class: "question" }, text ?? ""),
      el("div", { class: "ab" }, side(p.a, a, outA), side(p.b, b, outB)), g.iterations.length > 2 ? all : null);
  }

  async function everyIteration(details, g, i) {
    details.dataset.done = "1";
    const outs = await Promise.all(g.iterations.map((k, pos) => output(g, i, pos)));
    details.append(el("table", { class: "all" }, g.iterations.map((k, pos) =>
      el("tr", null, el("td", null, String(k)), el("td", null, outcome(g, i, pos, outs[pos][1])),
        el("td", null, el("pre", null, outs[pos][0] ?? ""))))));
  }

  // --- refinements ---------------------------------------------------------------------------------------
  const R = { iter: 0, filter: "", type: "", reason: "", page: 0, size: 20 };
  const val = D.splits.find((s) => s.split === "val");

  function setupRefinements() {
    if (!D.refinements.length) {
      $("r-list").replaceChildren(el("p", { class: "muted" }, "no refinement yet: the teacher refines from iteration 1 on"));
      return false;
    }
    const select = $("r-iter");
    D.refinements.forEach((r, i) => select.append(el("option", { value: String(i) }, `iteration ${r.iteration} (${r.count})`)));
    select.onchange = () => { R.iter = Number(select.value); R.page = 0; showRefinements(); };
    $("r-filter").onchange = (e) => { R.filter = e.target.value; R.page = 0; showRefinements(); };
    $("r-type").onchange = (e) => { R.type = e.target.value; R.page = 0; showRefinements(); };
    $("r-reason").onchange = (e) => { R.reason = e.target.value; R.page = 0; showRefinements(); };
    $("r-size").onchange = (e) => { R.size = sizeOf(e.target.value); R.page = 0; showRefinements(); };
    return true;
  }

  function keep(flags) {
    const f = R.filter;
    if (f === "v" || f === "k") { if (flags[0] !== f) return false; }
    else if (f === "c") { if (flags[1] !== "1") return false; }
    else if (f === "p") { if (flags[1] !== "0") return false; }
    if (R.reason && flags[3] !== R.reason) return false;
    return !R.type || flags[2] === R.type;
  }

  function showRefinements(scroll) {
    const group = D.refinements[R.iter];
    const chosen = [];
    group.flags.forEach((f, i) => { if (keep(f)) chosen.push(i); });
    const verified = group.flags.filter((f) => f[0] === "v").length;
    const cached = group.flags.filter((f) => f[1] === "1").length;
    $("r-summary").textContent = `iteration ${group.iteration}: ${group.count} refinements, ${verified} verified, ` +
      `${group.count - verified} not (previous rationale kept), ${cached} answered from the teacher cache`;
    const [first, last] = pager(["r-pager", "r-pager2"], R, chosen.length, showRefinements);
    const list = $("r-list");
    return render(list, async () => {
      const cards = await Promise.all(chosen.slice(first, last).map(async (i) => refinementCard(group, i, await item(group, i))));
      list.replaceChildren(...(cards.length ? cards : [el("p", { class: "muted" }, "no refinement matches these filters")]));
      if (scroll) $("refinements").scrollIntoView();
    });
  }

  function diffView(ops) {
    return el("pre", { class: "diff" }, ops.map(([op, text]) => (op === 0 ? text : el(op < 0 ? "del" : "ins", null, text))));
  }

  async function failure(group, f) {
    const [id, index, pos, own] = f;
    let text, gold, out, predicted, kind;
    if (index !== null && val) {
      [[text, gold], [out, predicted]] = await Promise.all([question(val, index), output(val, index, pos)]);
      kind = STATUS[val.status[index][pos]];
    } else {
      ({ question: text, answer: gold, output: out, predicted, error_type: kind } = own || {});
    }
    return el("li", { "data-id": id }, el("code", null, id), ` ${kind ?? "?"}: answered `,
      el("b", null, predicted ?? "nothing"), `, gold `, el("b", null, gold ?? "?"),
      el("p", { class: "question" }, text ?? "(question not in this run folder)"),
      el("pre", null, out ?? "(output not in this run folder)"));
  }

  // A row id as one shell word (the lineage command is copied into a shell): quoted unless plainly safe.
  const shellWord = (w) => (/^[\w@%+=:,.\/#-]+$/.test(w) && !w.startsWith("#") ? w : `'${w.replace(/'/g, "'\\''")}'`);

  async function refinementCard(group, index, rec) {
    const [id, problemId, question, gold, against, ops, informed, info, moreRejected, extra] = rec;
    const verified = against === "refined";
    const tokens = info.prompt_tokens === null || info.prompt_tokens === undefined ? "tokens unknown" :
      `${info.prompt_tokens} prompt + ${info.completion_tokens} completion tokens`;
    const flags = group.flags[index];
    const badges = [
      el("span", { class: `badge ${verified ? "verified" : "kept"}` }, verified ? "verified" : "kept previous"),
      el("span", { class: "badge light" }, flags[1] === "1" ? "cached" : flags[1] === "0" ? "teacher called" : "cache unknown"),
      el("span", { class: "muted" }, `${tokens} · attempts ${info.attempts ?? "?"} · similarity ${info.similarity ?? "?"}`)];
    const refused = info.reject_reason ? `refused: ${info.reject_reason}` +
      (info.step_error ? ` (${info.step_error})` : "") + "; " : "";
    const heading = verified ? "previous rationale → refined (word diff)" : against === "rejected"
      ? `previous rationale kept; the rejected attempt against it (${refused}answered ` +
        `${info.rejected_predicted ?? "nothing"}, finish ${info.rejected_finish_reason ?? "?"})` : "rationale";
    const failures = await Promise.all(informed.map((f) => failure(group, f)));
    const more = moreRejected.length ? el("details", null, el("summary", null, `${moreRejected.length} more rejected attempt(s)`),
      moreRejected.map((t) => el("pre", null, t))) : null;
    const fields = Object.entries(extra);
    return el("article", { class: "refinement", "data-id": id, "data-outcome": verified ? "verified" : "kept_previous" },
      el("header", null, el("code", null, id), el("span", { class: "muted" }, `problem ${problemId}`), ...badges),
      el("p", { class: "muted" }, "history: ", el("a", { class: "lineage", href: lineageHref(id),  // the same address again fires no hashchange
          onclick: () => { if (location.hash === lineageHref(id)) showLineage(id, true); } }, "lineage of this row"),
        " · ", el("code", { class: "lineage" }, `${D.run.lineage} ${shellWord(id)}`)),
      el("p", { class: "question" }, question ?? ""), el("p", null, "gold: ", el("b", null, gold ?? "")),
      el("h4", null, heading), diffView(ops), more,
      el("h4", null, `student failures shown to the teacher (informed_by: ${informed.length})`),
      el("ul", { class: "failures" }, failures),
      fields.length ? el("dl", { class: "extra" }, fields.map(([k, v]) =>
        [el("dt", null, k), el("dd", null, typeof v === "string" ? v : JSON.stringify(v))])) : null);
  }

  // --- lineage: one refined row's history (report_data.lineages: what `undo lineage RUN ROW --format json` prints) ---
  // The address page.html#lineage=ROW shows it: each refinement card links there, and such a link works offline.
  const lineageAt = new Map(((D.lineage || {}).ids || []).map((id, i) => [id, i]));
  const lineageHref = (id) => "#" + new URLSearchParams({ lineage: id }).toString();

  function attempts(lin) {
    return ((lin && lin.cascade) || []).map((a) => `${a.teacher}: ${a.verdict} (${a.tokens} tokens` +
      (a.cost !== null && a.cost !== undefined ? `, cost ${a.cost}` : "") + (a.cached ? ", cached" : "") + ")").join("; ") || "-";
  }

  function source(s) {
    const lin = s.lineage || {}, informed = (s.informed_by || lin.informed_by || []).join(", "), parent = lin.parent;
    return [informed && `failures ${informed}`, parent && `parent ${parent.id} @ iter ${parent.iteration}`,
      lin.failure_cluster !== null && lin.failure_cluster !== undefined && `cluster ${lin.failure_cluster}`]
      .filter(Boolean).join("; ") || "-";
  }

  function showLineage(id, scroll) {
    const view = $("l-view");
    const at = lineageAt.get(id);
    if (at === undefined) {
      view.replaceChildren(el("p", { class: "wrong" }, `no refined row '${id}' in this page`));
      return busy;
    }
    const L = D.lineage;
    return render(view, async () => {
      const row = (await chunk(L.chunks[Math.floor(at / L.chunk_size)]))[at % L.chunk_size];
      const head = ["iter", "event", "teacher (model hash)", "text", "cascade attempts", "informed by / parent"];
      const rows = row.history.map((s) => {
        const teacher = (s.lineage && s.lineage.teacher) || {};
        const event = s.event + (s.reject_reason && !s.event.includes("verified") ? ` (${s.reject_reason})` : "");
        return el("tr", null, el("td", null, String(s.iteration)), el("td", null, event),
          el("td", null, (s.teacher ?? "-") + (teacher.hash ? ` (${teacher.hash})` : "")),
          el("td", null, el("code", null, s.rationale_hash ?? "-")), el("td", null, attempts(s.lineage)),
          el("td", null, source(s)));
      });
      view.replaceChildren(el("article", { class: "lineage", id: "lineage-" + id, "data-id": id },
        el("header", null, el("code", null, id), el("code", { class: "lineage" }, `${D.run.lineage} ${shellWord(id)} --format json`)),
        el("table", { class: "lineage" }, el("tr", null, head.map((h) => el("th", null, h))), rows),
        el("details", { open: "" }, el("summary", null, "as JSON (every field, each version's text)"),
          el("pre", { class: "lineage-json" }, JSON.stringify(row, null, 1)))));
      if (scroll) $("lineage").scrollIntoView();
    });
  }

  function lineageFromAddress() {
    const id = new URLSearchParams(location.hash.slice(1)).get("lineage");
    if (id !== null) showLineage(id, true).then(() => mark("undoLineage"));
  }
  window.addEventListener("hashchange", lineageFromAddress);

  // --- start: counts at once, then the first page of each list -------------------------------------------
  // page.html#size=all&filter=all: every problem and refinement at once (a naive page; the benchmark's baseline)
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("size")) {
    T.size = R.size = sizeOf(hash.get("size"));
    $("t-size").value = $("r-size").value = hash.get("size");
  }
  const haveT = setupTransitions(), haveR = setupRefinements();
  if (hash.get("filter") === "all") T.code = "";
  if (haveT) showTransitions().then(() => mark("undoList"));
  mark("undoReady");
  if (haveR) showRefinements().then(() => mark("undoRefinements"));
  lineageFromAddress();
  window.undoReport = { idle: () => busy.then(() => busy), data: D, showLineage };
})();
