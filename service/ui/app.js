"use strict";
// The /ui page: pick, drop, paste or photograph images. One image goes to POST /classify, several to
// POST /classify_batch, exactly as any other client sends them; GET /info describes the model. No framework,
// no build step, nothing from another host. Text from the server is only ever set as textContent.

const state = { info: null, previews: [] };

function $(selector, root = document) {
  return root.querySelector(selector);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function percent(x) {
  return (100 * x).toFixed(1) + "%";
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

// The body of any answer: the service's JSON, or whatever else came back (a proxy's page, say) as an error.
async function readBody(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { error: `http_${response.status}`, detail: text.slice(0, 300) || response.statusText };
  }
}

// ---- The model, from /info ----

function chip(name, value, title, secondary = false) {
  const node = el("span", secondary ? "chip secondary" : "chip");
  node.append(el("span", "chip-name", name), el("span", "chip-value", value));
  if (title) node.title = title;
  return node;
}

function showInfo(info) {
  const box = $("#model");
  const accuracy = info.accuracy == null ? "unknown" : percent(info.accuracy);
  const tested = info.test_images ? `on ${info.test_images} test images` : "";
  // The label list opens on a tap: a tooltip shows nothing on a phone.
  const labels = el("details", "chip labels");
  const summary = el("summary");
  summary.append(el("span", "chip-name", "labels"), el("span", "chip-value", String(info.labels.length)));
  labels.append(summary, el("span", "label-list", info.labels.join(", ")));
  box.replaceChildren(
    chip("model", info.model),
    chip("variant", info.variant, "", true),
    chip("provider", info.provider, "", true),
    chip("test accuracy", accuracy, tested, true),
    chip("input", `${info.input_size}×${info.input_size} px`, "", true),
    labels,
  );
  const topK = $("#topk");
  topK.max = String(info.labels.length);
  if (Number(topK.value) > info.labels.length) topK.value = String(info.labels.length);
}

async function loadInfo() {
  const box = $("#model");
  try {
    const response = await fetch("../info", { headers: { Accept: "application/json" } });
    const body = await readBody(response);
    if (!response.ok) {
      box.replaceChildren(el("span", "model-error", `Model description unavailable: ${body.error}: ${body.detail}`));
      return;
    }
    state.info = body;
    showInfo(body);
  } catch (err) {
    box.replaceChildren(el("span", "model-error", `Cannot reach the service (${err.message}).`));
  }
}

// ---- One card per image ----

function makeCard(file) {
  const node = $("#card").content.firstElementChild.cloneNode(true);
  const img = $(".thumb", node);
  const url = URL.createObjectURL(file);
  state.previews.push(url);
  $(".name", node).textContent = file.name || "pasted image";
  const meta = $(".meta", node);
  meta.textContent = bytes(file.size);
  img.addEventListener("load", () => {
    meta.textContent = `${bytes(file.size)} · ${img.naturalWidth}×${img.naturalHeight}`;
  });
  // Not an image the browser shows (HEIC, or not an image at all): the service will say what it is.
  img.addEventListener("error", () => node.classList.add("no-preview"));
  img.src = url;
  img.alt = `Preview of ${file.name || "the pasted image"}`;
  return node;
}

function showResult(card, result, requestId) {
  $(".state", card).hidden = true;
  card.classList.add("done");
  if (result.unfamiliar) {
    const notice = $(".notice", card);
    const threshold = state.info ? ` (above ${state.info.unfamiliar_threshold.toFixed(1)} is unfamiliar)` : "";
    notice.textContent =
      "This image is unlike anything the model was trained on: the labels below are a guess, however high " +
      `their scores. Unfamiliarity ${result.ood_score.toFixed(2)}${threshold}.`;
    notice.hidden = false;
    card.classList.add("unfamiliar");
  }
  const bars = $(".bars", card);
  result.top_k.forEach((prediction, i) => {
    const item = el("li", i === 0 ? "bar top" : "bar");
    const track = el("span", "track");
    const fill = el("span", "fill");
    fill.style.width = `${Math.max(0.5, 100 * prediction.score)}%`; // a style property, allowed by the CSP
    track.append(fill);
    item.append(el("span", "label", prediction.label), el("span", "score", percent(prediction.score)), track);
    bars.append(item);
  });
  if (requestId && state.info) showVerdict(card, result.label, requestId);
}

// ---- Telling the service the true label (POST /feedback): the accuracy job joins it to the prediction ----

function showVerdict(card, predicted, requestId) {
  const box = $(".verdict", card);
  const right = el("button", "button small", `Yes, ${predicted}`);
  right.type = "button";
  const choice = el("select", "correct");
  choice.append(el("option", "", "No, it is…"));
  for (const label of state.info.labels) if (label !== predicted) choice.append(el("option", "", label));
  choice.firstElementChild.value = "";
  box.replaceChildren(el("span", "verdict-question", "Right?"), right, choice);
  right.addEventListener("click", () => sendLabel(box, requestId, predicted));
  choice.addEventListener("change", () => choice.value && sendLabel(box, requestId, choice.value));
  box.hidden = false;
}

async function sendLabel(box, requestId, label) {
  let text;
  try {
    const response = await fetch("../feedback", {
      method: "POST",
      body: JSON.stringify({ request_id: requestId, label }),
      headers: { "Content-Type": "application/json", Accept: "application/json" },
    });
    const body = await readBody(response);
    text = response.ok ? `Recorded: ${label}. Thank you.` : `Not recorded: ${body.error}: ${body.detail}`;
  } catch (err) {
    text = `Not recorded (${err.message}).`;
  }
  box.replaceChildren(el("span", "verdict-done", text));
}

function showError(card, status, body) {
  $(".state", card).hidden = true;
  card.classList.add("failed");
  const box = $(".error-box", card);
  $(".error-code", box).textContent = status ? `${status} ${body.error}` : body.error;
  $(".error-detail", box).textContent = body.detail;
  box.hidden = false;
}

// ---- Sending ----

async function send(files, topK) {
  const single = files.length === 1;
  const endpoint = single ? "classify" : "classify_batch";
  const round = el("section", "round");
  const summary = el("p", "round-summary", `Sending ${files.length} image${single ? "" : "s"} to /${endpoint}…`);
  const cards = files.map(makeCard);
  const grid = el("div", "cards");
  grid.append(...cards);
  round.append(summary, grid);
  $("#results").prepend(round);

  const form = new FormData();
  for (const file of files) form.append(single ? "image" : "images", file);
  form.append("top_k", String(topK));
  const started = performance.now();
  let response = null;
  let body;
  try {
    response = await fetch(`../${endpoint}`, { method: "POST", body: form, headers: { Accept: "application/json" } });
    body = await readBody(response);
  } catch (err) {
    body = { error: "network_error", detail: `The request did not complete (${err.message}); is the service running?` };
  }
  const ms = Math.round(performance.now() - started);

  const parts = [`${files.length} image${single ? "" : "s"}`, `POST /${endpoint}`];
  summary.replaceChildren(el("span", "latency", `${ms} ms`));
  if (!response || !response.ok) {
    cards.forEach((card) => showError(card, response && response.status, body));
    parts.push(response ? `refused (${response.status})` : "failed");
  } else {
    const results = single ? [body] : body.results;
    results.forEach((result, i) =>
      result.error
        ? showError(cards[i], null, result)
        : showResult(cards[i], result, single ? body.request_id : `${body.request_id}/${i}`),
    );
    parts.push(`model ${body.model}`);
  }
  summary.append(` round trip · ${parts.join(" · ")}`);
}

async function classify(fileList) {
  const files = Array.from(fileList || []);
  if (!files.length) return;
  const topInput = $("#topk");
  const topK = Math.max(1, Math.min(Number(topInput.max) || 50, Math.round(Number(topInput.value)) || 5));
  // The service takes at most max_files per batch request (IMGCLS_MAX_FILES): more go in several requests.
  const perRequest = (state.info && state.info.max_files) || 64;
  for (let i = 0; i < files.length; i += perRequest) {
    await send(files.slice(i, i + perRequest), topK);
  }
}

// ---- Wiring ----

function setUp() {
  const drop = $("#drop");
  for (const id of ["files", "camera"]) {
    const input = $(`#${id}`);
    input.addEventListener("change", () => {
      classify(input.files);
      input.value = ""; // choosing the same file again classifies it again
    });
  }
  drop.addEventListener("keydown", (event) => {
    if (event.target === drop && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      $("#files").click();
    }
  });
  // A file dropped anywhere on the page is classified (the browser would otherwise open it and leave).
  window.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  window.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("dragging");
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    classify(event.dataTransfer && event.dataTransfer.files);
  });
  window.addEventListener("paste", (event) => {
    const files = event.clipboardData && event.clipboardData.files;
    if (files && files.length) classify(files);
  });
  $("#clear").addEventListener("click", () => {
    $("#results").replaceChildren();
    state.previews.forEach((url) => URL.revokeObjectURL(url));
    state.previews = [];
  });
  loadInfo();
}

setUp();
