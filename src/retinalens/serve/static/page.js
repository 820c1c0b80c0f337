"use strict";
// The analysis page. A file, not an inline script, so that it runs under `script-src 'self'`.
// Everything the page shows is set with textContent: names and labels are never parsed as HTML.
const card = JSON.parse(document.getElementById("card").textContent);
const $ = (id) => document.getElementById(id);
let chosen = [];  // the images picked or dropped, sent on "Analyse"
let cards = 0;  // ids for the result cards' headings and controls

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function setStatus(text) { $("status").textContent = text; }

function mb(bytes) { return (bytes / 1024 / 1024).toFixed(1) + " MB"; }

function percent(p) { return (100 * p).toFixed(1) + "%"; }

function plural(n) { return `${n} image${n === 1 ? "" : "s"}`; }

function choose(fileList) {
  chosen = Array.from(fileList);
  $("chosen").textContent = chosen.length ? `${plural(chosen.length)} chosen: ${chosen.map((f) => f.name).join(", ")}`
                                          : "No images chosen.";
  setStatus("");
}

async function analyse() {
  const files = chosen;
  if (!files.length) { setStatus("Choose or drop one or more images first."); return; }
  const total = files.reduce((sum, f) => sum + f.size, 0);
  if (total > card.limits.max_upload_bytes) {
    setStatus(`These files are ${mb(total)} together; the limit is ${mb(card.limits.max_upload_bytes)} per upload.`);
    return;
  }
  if (files.length > card.limits.max_files) { setStatus(`At most ${card.limits.max_files} images per upload.`); return; }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  setStatus(`Analysing ${plural(files.length)}…`);
  const asVolume = $("as-volume").checked;
  let response;
  try {
    response = await fetch(asVolume ? "/api/volume" : "/api/predict", {method: "POST", body: form});
  } catch (err) {
    setStatus("The server could not be reached.");  // the choice is kept: "Analyse" again retries
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    setStatus(typeof body.detail === "string" ? body.detail : `The server answered ${response.status}.`);
    return;
  }
  choose([]);
  if (asVolume) {
    setStatus(`${plural(body.results.length)} analysed as one volume.`);
    $("results").prepend(volumeCard(body.volume, body.results));
    return;
  }
  // A multi-frame DICOM file is an OCT volume by itself: the server answers it in `volumes`, box ticked or not.
  const volumes = body.volumes || [];
  setStatus(`${plural(body.results.length)} analysed` +
            (volumes.length ? `, and ${volumes.length} OCT volume${volumes.length === 1 ? "" : "s"}` : "") + ".");
  for (const result of body.results.slice().reverse()) $("results").prepend(resultCard(result));
  for (const v of volumes.slice().reverse()) $("results").prepend(volumeCard(v.volume, v.results, v.name));
}

// One OCT volume: the eye-level answer, then a viewer to go through its B-scans (a range input: arrow keys,
// Home and End work on it natively), the one that decided and the most suspicious ones a button away.
// `file`: the multi-frame file the volume is, named in the heading.
function volumeCard(v, slices, file) {
  const id = `result-${++cards}`;
  const title = `OCT volume of ${plural(slices.length).replace("image", "B-scan")}` + (file ? ` (${file})` : "");
  const node = el("article", {class: "card volume", "aria-labelledby": id}, el("h2", {id, text: title}));
  const left = el("div", {class: "result"});
  const counts = `${v.n_gradable} of ${v.n_slices} B-scans gradable` +
    (v.n_unreadable ? `, ${v.n_unreadable} unreadable` : "");
  if (!v.gate.ok) {
    left.append(el("p", {class: "label ungradable", text: "Ungradable volume: " + counts}),
                el("p", {class: "gate fail", text: "No class or referral is given for this eye."}));
  } else {
    left.append(el("p", {class: "verdict"}, el("span", {class: "label", text: v.label}),
                   v.referral ? el("span", {class: "referral " + v.referral, text: "referral: " + v.referral}) : null),
                el("p", {class: "gate ok", text: "Quality check: " + counts}),
                el("p", {class: "decided", text: `Decided by B-scan ${v.index_slice + 1} (${slices[v.index_slice].name})`}),
                probabilityTable(v.probabilities, id));
  }
  left.append(el("p", {class: "rule", text: "Rule: " + v.rule}));
  node.append(left, sliceViewer(v, slices, id));
  return node;
}

function sliceViewer(v, slices, id) {
  const range = el("input", {type: "range", id: id + "-slice", min: "1", max: String(slices.length), step: "1"});
  const caption = el("p", {class: "slice-caption", id: id + "-caption", "aria-live": "polite"});
  const image = el("img", {class: "slice", alt: ""});
  const heat = el("input", {type: "checkbox", id: id + "-heat"});
  const show = (k) => {
    const r = slices[k];
    range.value = String(k + 1);
    const worst = v.suspicious.includes(k) ? (k === v.index_slice ? " (decided the volume)" : " (suspicious)") : "";
    const what = r.error ? "unreadable: " + r.error : ungradable(r) ? "ungradable" :
      `${r.label}, P(referral) ${r.p_referral === null ? "n/a" : r.p_referral.toFixed(2)}`;
    caption.textContent = `B-scan ${k + 1} of ${slices.length}${worst}: ${r.name}, ${what}`;
    range.setAttribute("aria-valuetext", caption.textContent);
    if (r.error) { image.removeAttribute("src"); image.alt = "unreadable B-scan"; return; }
    image.src = heat.checked ? r.heatmap : `/api/analyses/${r.id}/image`;
    image.alt = `B-scan ${k + 1}${heat.checked ? ", Grad-CAM heat map" : ""}`;
  };
  range.addEventListener("input", () => show(Number(range.value) - 1));
  heat.addEventListener("change", () => show(Number(range.value) - 1));
  const jumps = el("p", {class: "jumps"}, el("span", {text: "Most suspicious: "}));
  for (const k of v.suspicious) {
    const button = el("button", {type: "button", class: "button small", text: `B-scan ${k + 1}`});
    button.addEventListener("click", () => { show(k); range.focus(); });
    jumps.append(button);
  }
  show(v.index_slice === null ? 0 : v.index_slice);
  return el("figure", {class: "viewer"}, image,
            el("figcaption", {}, el("label", {for: range.id, text: "B-scan "}), range, caption,
               el("label", {}, heat, " show the heat map"), v.suspicious.length ? jumps : null));
}

function ungradable(r) { return Boolean(r.gate && !r.gate.ok); }

function resultCard(r) {
  const id = `result-${++cards}`;
  const node = el("article", {class: "card", "aria-labelledby": id}, el("h2", {id, text: r.name}));
  if (r.error) {
    node.append(el("p", {class: "error", text: "Could not analyse this file: " + r.error}));
    return node;
  }
  const left = el("div", {class: "result"});
  if (ungradable(r)) {
    // No class, level or probabilities: the model's output on an image the gate refused is not a result.
    const reason = r.gate.reason ? String(r.gate.reason).replace(/_/g, " ") : "the quality check failed";
    left.append(el("p", {class: "label ungradable", text: "Ungradable: " + reason}),
                el("p", {class: "gate fail", text: "No class or referral is given for this image. Retake it, or label it below."}));
    node.append(left);
    left.append(feedbackForm(r, id));
    return node;
  }
  left.append(el("p", {class: "verdict"}, el("span", {class: "label", text: r.label}),
                 r.referral ? el("span", {class: "referral " + r.referral, text: "referral: " + r.referral}) : null));
  if (r.gate) left.append(el("p", {class: "gate ok", text: "Quality check: passed"}));
  left.append(probabilityTable(r.probabilities, id), feedbackForm(r, id));
  const figure = el("figure", {},
    el("img", {class: "heatmap", src: r.heatmap, alt: `Grad-CAM heat map of ${r.name} for ${r.label}`, loading: "eager"}),
    el("figcaption", {text: "Where the model looked (Grad-CAM) for " + r.label}));
  node.append(left, figure);
  return node;
}

function probabilityTable(probabilities, id) {
  const table = el("table", {class: "probs"}, el("caption", {class: "visually-hidden", text: "Class probabilities"}));
  for (const [cls, p] of Object.entries(probabilities).sort((a, b) => b[1] - a[1])) {
    const bar = el("div", {class: "bar", role: "meter", "aria-label": `${cls} probability`, "aria-valuemin": "0",
                           "aria-valuemax": "100", "aria-valuenow": (100 * p).toFixed(1), "aria-valuetext": percent(p)});
    bar.style.width = percent(p);  // CSSOM, not a style attribute: allowed by `style-src 'self'`
    table.append(el("tr", {}, el("th", {scope: "row", text: cls}), el("td", {class: "track"}, bar),
                    el("td", {"aria-hidden": "true", text: percent(p)})));
  }
  return table;
}

function feedbackForm(r, id) {
  const select = el("select", {id: id + "-label", name: "label"});
  if (!r.label) select.append(el("option", {value: "", text: "Choose a label"}));
  for (const cls of card.classes) select.append(el("option", {value: cls, text: cls}));
  select.value = r.label || "";
  const button = el("button", {class: "button", type: "submit"});
  const saved = el("span", {class: "saved", role: "status"});
  const sync = () => {
    button.textContent = !r.label ? "Save label" : select.value === r.label ? "Confirm" : "Save correction";
  };
  select.addEventListener("change", sync);
  sync();
  const form = el("form", {class: "feedback", "aria-label": "Clinician's feedback on " + r.name},
                  el("label", {for: select.id, text: "Clinician's label:"}), select, button, saved);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!select.value) { saved.textContent = "Choose a label first."; return; }
    button.disabled = true;
    saved.textContent = "";
    try {
      const response = await fetch("/api/feedback", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({analysis_id: r.id, label: select.value})});
      const body = await response.json().catch(() => ({}));
      saved.textContent = response.ok ? (body.confirmed ? "Saved: confirmed " : "Saved: corrected to ") + body.label
                                      : "Not saved: " + (typeof body.detail === "string" ? body.detail : response.status);
    } catch (err) {
      saved.textContent = "Not saved: the server could not be reached.";
    }
    button.disabled = false;
    button.focus();  // a disabled button loses focus: give it back, so the keyboard user stays in place
  });
  return form;
}

function start() {
  $("limits").textContent = `Up to ${card.limits.max_files} images, ${mb(card.limits.max_upload_bytes)} per upload. ` +
    "Images are kept on this server (by content hash) so that a clinician's label can be recorded.";
  const input = $("file-input");
  const drop = $("drop");
  input.addEventListener("change", () => { choose(input.files); input.value = ""; });
  $("upload").addEventListener("submit", (event) => { event.preventDefault(); analyse(); });
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {  // a role="button" must answer Enter and Space like a button
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); choose(e.dataTransfer.files); });
  // A file dropped beside the zone would make the browser leave the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

start();
