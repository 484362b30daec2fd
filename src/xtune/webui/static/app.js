// The page of `xtune webui`: plain DOM over the JSON API in app.py. Nothing here computes what xtune computes;
// it shows it.
"use strict";

const token = window.XTUNE_TOKEN;
const $ = (selector) => document.querySelector(selector);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
};

async function api(path, body, method) {
  const options = { method: method || (body === undefined ? "GET" : "POST"), headers: { "X-Xtune-Token": token } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw Object.assign(new Error(data.error || response.statusText), { data });
  return data;
}
const withToken = (path) => `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
const fmt = (value, digits = 4) => (value === null || value === undefined ? "" : Number(value).toPrecision(digits));
const duration = (seconds) => {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m${s % 60}s` : `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
};

// tabs ---------------------------------------------------------------------------------------------
function showTab(name) {
  for (const button of document.querySelectorAll(".tab")) {
    button.toggleAttribute("aria-current", button.dataset.tab === name);
  }
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== `tab-${name}`;
  if (name === "chat" || name === "export") refreshCheckpoints();
}
for (const button of document.querySelectorAll(".tab")) button.addEventListener("click", () => showTab(button.dataset.tab));

// file picker: only what the server lists, inside its roots -----------------------------------------
function pick({ folders = false } = {}) {
  const dialog = $("#picker");
  return new Promise((resolve) => {
    let current = "";
    async function open(path) {
      const listing = await api(`/api/files?path=${encodeURIComponent(path)}`);
      current = listing.path;
      $("#picker-path").textContent = listing.path;
      const entries = $("#picker-entries");
      entries.replaceChildren();
      if (listing.parent !== null) entries.append(el("li", {}, el("a", { href: "#", text: "..", onclick: (e) => { e.preventDefault(); open(listing.parent); } })));
      for (const entry of listing.entries) {
        const link = el("a", { href: "#", text: entry.name + (entry.folder ? "/" : ""), "data-path": entry.path });
        link.addEventListener("click", (event) => {
          event.preventDefault();
          if (entry.folder) open(entry.path);
          else { dialog.close("picked"); resolve(entry.path); }
        });
        entries.append(el("li", {}, link));
      }
    }
    $("#picker-choose-folder").hidden = !folders;
    dialog.onclose = () => {
      if (dialog.returnValue === "folder") resolve(current);
      else if (dialog.returnValue !== "picked") resolve(null);
    };
    dialog.returnValue = "";
    open("").then(() => dialog.showModal());
  });
}

// train: the form from the schema ---------------------------------------------------------------------
let fields = [];
let loadedValues = {};

async function initTrain() {
  const [{ builtin }, schema] = await Promise.all([api("/api/configs"), api("/api/schema")]);
  $("#config-list").replaceChildren(...builtin.map((name) => el("option", { value: name })));
  fields = schema.fields;
}

function inputFor(field, value) {
  const id = `field-${field.name}`;
  let input;
  if (field.kind === "bool") {
    input = el("input", { type: "checkbox", id, name: field.name });
    input.checked = Boolean(value);
  } else if (field.kind === "choice") {
    const choices = field.optional ? ["None", ...field.choices] : field.choices;
    input = el("select", { id, name: field.name }, ...choices.map((choice) => el("option", { value: String(choice), text: String(choice) })));
    input.value = value === null ? "None" : String(value);
  } else if (field.kind === "json") {
    input = el("textarea", { id, name: field.name, rows: 2, cols: 60 });
    input.value = value === null ? "" : JSON.stringify(value);
  } else {
    input = el("input", { id, name: field.name, type: "text", size: field.kind === "str" ? 50 : 12 });
    input.value = value === null || value === undefined ? "" : String(value);
  }
  input.addEventListener("change", scheduleValidation);
  return input;
}

function renderForm(values, changed) {
  const form = $("#config-form");
  form.replaceChildren();
  const groups = new Map([["Set by this config", fields.filter((f) => changed.includes(f.name))]]);
  for (const field of fields) {
    if (changed.includes(field.name)) continue;
    if (!groups.has(field.group)) groups.set(field.group, []);
    groups.get(field.group).push(field);
  }
  let first = true;
  for (const [group, members] of groups) {
    if (!members.length) continue;
    const details = el("details", first ? { open: "" } : {}, el("summary", { text: `${group} (${members.length})` }));
    first = false;
    for (const field of members) {
      const control = el("span", { class: "control" }, inputFor(field, values[field.name]));
      const row = el("div", { class: "field" },
        el("label", { for: `field-${field.name}`, text: field.name + (field.required ? " *" : "") }), control);
      if (["data_path", "val_data_path", "image_folder", "pretrained_pth"].includes(field.name)) {
        control.append(" ", el("button", { type: "button", text: "Browse…", onclick: async () => {
          const path = await pick({ folders: true });
          if (path !== null) { $(`#field-${field.name}`).value = path; scheduleValidation(); }
        } }));
      }
      row.append(el("small", { class: "help", text: field.help }), el("div", { class: "field-error", id: `error-${field.name}` }));
      details.append(row);
    }
    form.append(details);
  }
}

function formValues() {
  const values = {};
  for (const field of fields) {
    const input = document.getElementById(`field-${field.name}`);
    if (!input) continue;
    values[field.name] = field.kind === "bool" ? input.checked : input.value;
  }
  return values;
}

function showErrors(errors) {
  for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
  for (const node of document.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
  const general = [];
  for (const [name, message] of Object.entries(errors || {})) {
    const node = document.getElementById(`error-${name}`);
    if (node) {
      node.textContent = message;
      node.parentElement.classList.add("invalid");
      node.closest("details").open = true;
    } else general.push(message);
  }
  $("#form-errors").textContent = general.join("\n");
  return Object.keys(errors || {}).length === 0;
}

let validationTimer = null;
function scheduleValidation() {
  clearTimeout(validationTimer);
  validationTimer = setTimeout(validateForm, 300);
}
async function validateForm() {
  const { errors } = await api("/api/config/validate", { values: formValues(), allow_code: $("#allow-code").checked });
  return showErrors(errors);
}

async function loadConfig(name) {
  $("#train-status").textContent = "loading…";
  try {
    const form = await api("/api/config/load", { config: name, allow_code: $("#allow-code").checked });
    loadedValues = form.values;
    renderForm(form.values, form.changed);
    $("#config-source").textContent = `from ${form.path}`;
    $("#save-name").value = name.split("/").pop().replace(/\.(py|ya?ml|json)$/, "");
    $("#cli-command").textContent = `xtune train configs/${$("#save-name").value}.yaml`;
    $("#train-status").textContent = "";
    showErrors({});
  } catch (error) {
    $("#train-status").textContent = error.message;
  }
}
$("#load-config").addEventListener("click", () => loadConfig($("#config-name").value.trim()));
$("#browse-config").addEventListener("click", async () => {
  const path = await pick();
  if (path !== null) { $("#config-name").value = path; loadConfig(path); }
});

function body(extra = {}) {
  return { values: formValues(), name: $("#save-name").value, allow_code: $("#allow-code").checked, ...extra };
}
async function guarded(label, action) {
  $("#train-status").textContent = `${label}…`;
  try {
    await action();
  } catch (error) {
    if (error.data && error.data.errors) showErrors(error.data.errors);
    $("#train-status").textContent = `${label}: ${error.message}`;
  }
}

$("#check-dataset").addEventListener("click", () => guarded("checking the dataset", async () => {
  const check = await api("/api/dataset/check", body());
  const rows = [
    ["samples", `${check.samples} kept of ${check.encoded} encoded`],
    [`over max_length=${check.max_length}`, `${check.truncated} ${check.truncation === "drop" ? "dropped" : "truncated"}`],
    ["no trained token", `${check.dropped_untrained} dropped`],
    ["tokens", `${check.tokens}, ${check.trained_tokens} trained (${(100 * check.trained_ratio).toFixed(1)}%)`],
    ["length", check.lengths ? `min ${check.lengths.min}, median ${check.lengths.median}, p95 ${check.lengths.p95}, max ${check.lengths.max}` : ""],
    [check.packed ? "packing" : "padding", `${check.batches} ${check.packed ? "rows" : "batches"}: ${(100 * check.efficiency).toFixed(1)}% sample tokens`],
    ["malformed records", check.bad_records.length ? check.bad_records.join("\n") : "none"],
  ];
  const sources = el("table", {}, el("tr", {}, ...["source", "format", "records", "malformed", "repeats", "samples"].map((h) => el("th", { text: h }))),
    ...check.sources.map((s) => el("tr", {}, ...[s.path, s.format, s.records, s.bad, s.repeats, s.samples].map((v) => el("td", { text: String(v) })))));
  $("#dataset-report").replaceChildren(el("h3", { text: "check-dataset" }), sources,
    el("table", { class: "summary" }, ...rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v })))));
  $("#train-status").textContent = check.ok ? "dataset ok" : "the dataset has malformed records";
}));

$("#log-dataset").addEventListener("click", () => guarded("rendering samples", async () => {
  const { samples } = await api("/api/dataset/samples", body({ n: 3 }));
  $("#dataset-samples").replaceChildren(el("h3", { text: "log-dataset (trained tokens highlighted)" }),
    ...samples.map((sample, index) => el("div", { class: "sample" },
      el("p", { class: "muted", text: `sample ${index}: ${sample.location} (${sample.tokens} tokens, ${sample.trained} trained${sample.truncated ? ", truncated" : ""})` }),
      el("pre", {}, ...sample.runs.map(([text, trained]) => (trained ? el("mark", { class: "trained", text }) : document.createTextNode(text)))))));
  $("#train-status").textContent = "";
}));

$("#save-config").addEventListener("click", () => guarded("saving", async () => {
  const saved = await api("/api/config/save", body());
  showErrors({});
  $("#cli-command").textContent = saved.command;
  $("#train-status").textContent = `saved ${saved.path}`;
}));

$("#start-train").addEventListener("click", () => guarded("starting", async () => {
  const started = await api("/api/train", body());
  showErrors({});
  $("#cli-command").textContent = started.command;
  $("#train-status").textContent = `started (process ${started.pid}); watch it in the Watch tab`;
  newestBefore = lastRuns.length ? lastRuns[0].id : null;
  following = true;
  showTab("watch");
  refreshRuns();
}));

$("#save-name").addEventListener("input", () => { $("#cli-command").textContent = `xtune train configs/${$("#save-name").value}.yaml`; });
$("#copy-command").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("#cli-command").textContent));

// watch -----------------------------------------------------------------------------------------------
let selectedRun = null;
let following = false;
let newestBefore = null;
const compared = new Set();
let lastRuns = [];

async function refreshRuns() {
  const { runs, jobs } = await api("/api/runs");
  lastRuns = runs;
  if (following && runs.length && runs[0].id !== newestBefore) {
    selectedRun = runs[0].id;  // the run just started: the newest folder
    following = false;
  }
  if (!selectedRun && runs.length) selectedRun = runs[0].id;
  const tbody = $("#runs-table tbody");
  tbody.replaceChildren(...runs.map((run) => {
    const box = el("input", { type: "checkbox" });
    box.checked = compared.has(run.id);
    box.addEventListener("change", () => { box.checked ? compared.add(run.id) : compared.delete(run.id); refreshCompare(); });
    const actions = el("td", {});
    actions.append(el("button", { type: "button", text: "show", onclick: () => { selectedRun = run.id; refreshDetail(); } }));
    if (run.status === "running") actions.append(el("button", { type: "button", class: "stop", text: "stop", onclick: () => api("/api/run/stop", { run: run.id }).then(refreshRuns) }));
    if (run.resumable) actions.append(el("button", { type: "button", text: "resume", onclick: () => api("/api/run/resume", { run: run.id }).then(refreshRuns) }));
    if (run.checkpoints.length) actions.append(el("button", { type: "button", text: "chat", onclick: () => { chatCheckpoint = run.checkpoints[run.checkpoints.length - 1]; showTab("chat"); } }));
    return el("tr", { "data-run": run.id, "data-status": run.status, class: run.id === selectedRun ? "selected" : "" },
      el("td", {}, box), el("td", { text: run.name }), el("td", { class: `status ${run.status}`, text: run.status }),
      el("td", { text: `${run.step}${run.total_steps ? " / " + run.total_steps : ""}` }), el("td", { text: fmt(run.loss) }),
      el("td", { text: fmt(run.eval_loss) }), el("td", { text: fmt(run.tokens_per_s, 3) }), el("td", { text: duration(run.eta_s) }),
      el("td", { text: run.memory_gib ? `${run.memory_gib.toFixed(2)} GiB` : "" }), actions);
  }));
  $("#jobs").replaceChildren(...jobs.map((job) => el("div", { class: `job ${job.status}` },
    el("p", { text: `${job.status}: ${job.command}` }), el("pre", { text: job.log_tail }))));
  if (selectedRun) refreshDetail();
}

async function refreshDetail() {
  const run = await api(`/api/run?run=${encodeURIComponent(selectedRun)}`);
  $("#run-detail").hidden = false;
  $("#run-title").textContent = run.name;
  $("#run-status").textContent = run.status;
  $("#run-detail").dataset.status = run.status;
  $("#points-count").textContent = String(run.curves.loss.length);
  $("#run-command").textContent = run.command || "";
  const stamp = `${run.curves.loss.length}-${run.curves.eval_loss.length}`;
  for (const metric of ["loss", "lr", "grad_norm", "tokens_per_s"]) {
    const img = $(`#plot-${metric}`);
    const shown = metric === "loss" && run.curves.eval_loss.length ? "loss" : metric;
    if (img.dataset.stamp !== `${selectedRun}-${stamp}`) {
      img.src = withToken(`/api/plot.svg?run=${encodeURIComponent(selectedRun)}&metric=${shown}&v=${stamp}`);
      img.dataset.stamp = `${selectedRun}-${stamp}`;
    }
  }
  $("#evaluations").replaceChildren(...run.evaluations.map((item) => el("div", { class: "evaluation" },
    el("strong", { text: `step ${item.step}` }),
    el("ul", {}, ...item.evaluation.map((qa) => el("li", {}, el("em", { text: qa.input }), document.createTextNode(" → " + qa.output)))))));
  const log = $("#run-log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = run.log_tail || "(started outside the web UI: no log here)";
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function refreshCompare() {
  const metric = $("#compare-metric").value;
  if (!compared.size) { $("#compare-plot").replaceChildren(); return; }
  const query = [...compared].map((id) => `run=${encodeURIComponent(id)}`).join("&");
  $("#compare-plot").replaceChildren(el("img", { src: withToken(`/api/plot.svg?${query}&metric=${metric}&v=${Date.now()}`), alt: "compared runs" }));
}
$("#compare-metric").addEventListener("change", refreshCompare);

setInterval(() => { if (!$("#tab-watch").hidden) refreshRuns().catch(() => {}); }, 2000);

// chat ------------------------------------------------------------------------------------------------
let chatCheckpoint = null;
let history = { model: [], base: [] };

async function refreshCheckpoints() {
  const { runs } = await api("/api/runs");
  lastRuns = runs;
  const checkpoints = runs.flatMap((run) => run.checkpoints);
  for (const select of [$("#chat-checkpoint"), $("#export-source")]) {
    const keep = select.value;
    select.replaceChildren(...checkpoints.map((path) => el("option", { value: path, text: path })));
    if (chatCheckpoint && select.id === "chat-checkpoint") {
      if (!checkpoints.includes(chatCheckpoint)) select.append(el("option", { value: chatCheckpoint, text: chatCheckpoint }));
      select.value = chatCheckpoint;
    } else if (keep) select.value = keep;
  }
  if ($("#chat-checkpoint").value) chatInfo();
}

async function chatInfo() {
  const checkpoint = $("#chat-checkpoint").value;
  try {
    const info = await api(`/api/chat/info?checkpoint=${encodeURIComponent(checkpoint)}`);
    $("#chat-info").textContent = `model ${info.model}${info.base ? `, base ${info.base}` : ""}; template ${info.template || "the tokenizer's"}`;
    $("#chat-template").value = info.template || "";
    $("#chat-image-label").hidden = !info.llava;
    $("#chat-compare").disabled = !info.base;
  } catch (error) {
    $("#chat-info").textContent = error.message;
  }
}
$("#chat-checkpoint").addEventListener("change", () => { chatCheckpoint = $("#chat-checkpoint").value; resetChat(); chatInfo(); });
$("#browse-checkpoint").addEventListener("click", async () => {
  const path = await pick({ folders: true });
  if (path !== null) { chatCheckpoint = path; refreshCheckpoints(); }
});
$("#chat-compare").addEventListener("change", () => { $("#chat-base").hidden = !$("#chat-compare").checked; });

async function initChat() {
  const { templates } = await api("/api/templates");
  $("#chat-template").replaceChildren(el("option", { value: "", text: "(the run's)" }), ...templates.map((t) => el("option", { value: t, text: t })));
}

function resetChat() {
  history = { model: [], base: [] };
  for (const box of document.querySelectorAll(".chat .messages")) box.replaceChildren();
}
$("#chat-reset").addEventListener("click", resetChat);

async function uploadImage() {
  const file = $("#chat-image").files[0];
  if (!file || $("#chat-image-label").hidden) return null;
  const response = await fetch(`/api/upload?name=${encodeURIComponent(file.name)}`, { method: "POST", headers: { "X-Xtune-Token": token }, body: file });
  return (await response.json()).path;
}

async function streamReply(side, text, image) {
  const box = document.querySelector(`#chat-${side} .messages`);
  history[side].push({ role: "user", content: text });
  box.append(el("div", { class: "msg user", text }));
  const answer = el("div", { class: "msg assistant pending" });
  box.append(answer);
  const response = await fetch("/api/chat", {
    method: "POST", headers: { "X-Xtune-Token": token, "Content-Type": "application/json" },
    body: JSON.stringify({ checkpoint: $("#chat-checkpoint").value, side, messages: history[side], system: $("#chat-system").value,
      template: $("#chat-template").value || null, image, max_new_tokens: $("#chat-max-tokens").value, temperature: $("#chat-temperature").value }),
  });
  if (!response.ok) {
    answer.textContent = (await response.json()).error;
    answer.className = "msg error";
    history[side].pop();
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines.filter(Boolean)) {
      const message = JSON.parse(line);
      if (message.delta !== undefined) answer.textContent += message.delta;
      if (message.reply !== undefined) {
        answer.textContent = message.reply;
        answer.classList.remove("pending");
        answer.classList.add("done");
        history[side].push({ role: "assistant", content: message.reply });
      }
      if (message.error !== undefined) { answer.textContent = message.error; answer.className = "msg error"; history[side].pop(); }
    }
  }
}

$("#chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text || !$("#chat-checkpoint").value) return;
  $("#chat-input").value = "";
  $("#chat-send").disabled = true;
  try {
    const image = await uploadImage();
    await streamReply("model", text, image);
    if ($("#chat-compare").checked) await streamReply("base", text, image);
  } finally {
    $("#chat-send").disabled = false;
  }
});

// export ----------------------------------------------------------------------------------------------
async function refreshExports() {
  const { available, jobs, eval: results } = await api("/api/exports");
  const kind = $("#export-kind");
  if (!kind.options.length) {
    kind.replaceChildren(...Object.entries(available).map(([name, ok]) => el("option", ok ? { value: name, text: name } : { value: name, text: `${name} (needs gguf)`, disabled: "" })));
  }
  $("#export-jobs").replaceChildren(...jobs.map((job) => el("div", { class: `job ${job.status}`, "data-kind": job.kind },
    el("p", { text: `${job.status}: ${job.command}${job.error ? " — " + job.error : ""}` }), el("pre", { text: job.progress }))));
  $("#eval-results").replaceChildren(...(results.length ? results.map((item) => el("details", {}, el("summary", { text: item.path }),
    el("pre", { text: JSON.stringify(item.results, null, 2) }))) : [document.createTextNode("none yet")]));
}
$("#start-export").addEventListener("click", async () => {
  const kind = $("#export-kind").value;
  const source = kind === "ollama" ? $("#export-output").value : $("#export-source").value;
  try {
    await api("/api/export", { kind, source, output: $("#export-output").value });
  } catch (error) {
    $("#export-jobs").prepend(el("p", { class: "error", text: error.message }));
  }
  refreshExports();
});
setInterval(() => { if (!$("#tab-export").hidden) refreshExports().catch(() => {}); }, 2000);

initTrain().then(() => { $("#config-name").value = ""; });
initChat();
refreshExports().catch(() => {});
