// ab-flasher's upload page. Plain JavaScript, no external assets. The upload speaks tus 1.0 (docs/web-api.md):
// POST /api/uploads creates it, PATCH sends bytes from an offset, HEAD asks how far the device got after a
// dropped connection, DELETE cancels.
"use strict";

const TUS = { "Tus-Resumable": "1.0.0" };
const RETRY_DELAYS_MS = [1000, 2000, 3000, 5000, 5000, 10000, 10000, 15000, 15000, 20000];
const $ = (id) => document.getElementById(id);
const SLOT_COLUMNS = ["Slot", "Role", "Version", "Booted", "Primary", "State"];

const page = {
  csrf: null, csrfHeader: "X-CSRF-Token", status: null, file: null, upload: null, uploadId: null, job: null,
  events: null, finished: false, cancelled: false, xhr: null,
};

function show(id, visible) { $(id).hidden = !visible; }
function text(id, value) { $(id).textContent = value; }
function headers(extra) { const h = { ...extra }; if (page.csrf) h[page.csrfHeader] = page.csrf; return h; }
function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"]; let i = 0; let v = n;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}
function b64(s) { return btoa(String.fromCharCode(...new TextEncoder().encode(s))); }

function message(textValue) {
  text("message", textValue || "");
  show("message", Boolean(textValue));
}

async function api(method, path, body, extraHeaders) {
  const init = { method, headers: headers(extraHeaders || {}), credentials: "same-origin" };
  if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  const response = await fetch(path, init);
  let data = {};
  try { data = await response.json(); } catch (e) { data = {}; }
  if (response.status === 401 && data.login) { showLogin(data.error); throw new Error(data.error); }
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

// --- login -----------------------------------------------------------------------------------------------------

function showLogin(error) {
  show("app", false);
  show("login", true);
  text("login-error", error || "");
  $("login-password").focus();
}

async function start() {
  const session = await (await fetch("/api/session", { credentials: "same-origin" })).json();
  page.csrfHeader = session.csrf_header || page.csrfHeader;
  if (!session.authenticated) {
    showLogin(session.password_set === false ? "No password is set on the device (web.conf)." : "");
    return;
  }
  page.csrf = session.csrf_token;
  show("logout-button", session.login_required);
  enterApp();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  text("login-error", "");
  $("login-button").disabled = true;
  try {
    const response = await fetch("/api/login", {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ password: $("login-password").value }),
    });
    const data = await response.json();
    if (!response.ok) { text("login-error", data.error || "login failed"); return; }
    page.csrf = data.csrf_token;
    $("login-password").value = "";
    show("logout-button", true);
    enterApp();
  } catch (e) {
    text("login-error", `cannot reach the device: ${e.message}`);
  } finally {
    $("login-button").disabled = false;
  }
});

$("logout-button").addEventListener("click", async () => {
  try { await api("POST", "/api/logout"); } catch (e) { /* logged out anyway */ }
  page.csrf = null;
  if (page.events) page.events.close();
  showLogin("");
});

function enterApp() {
  show("login", false);
  show("app", true);
  refresh();
  connectEvents();
}

// --- status ----------------------------------------------------------------------------------------------------

async function refresh() {
  try { render(await api("GET", "/api/status")); } catch (e) { message(`cannot read the device's status: ${e.message}`); }
}

function render(status) {
  page.status = status;
  message("");
  text("device-version", `running ${status.booted_version || "unknown version"} (slot ${status.booted_slot || "?"})`);
  show("recovery-banner", status.recovery);
  const body = $("slots").querySelector("tbody");
  body.replaceChildren(...status.slots.map((slot) => {
    const row = document.createElement("tr");
    row.dataset.slot = slot.name;
    if (slot.booted) row.className = "booted";
    const values = [slot.name, slot.role, slot.version || "—", slot.booted ? "yes" : "", slot.primary ? "yes" : "",
      slot.state];
    values.forEach((value, index) => {
      const cell = document.createElement("td");
      cell.textContent = value;
      cell.dataset.label = SLOT_COLUMNS[index];  // the column's name where the table is shown as cards (phones)
      row.appendChild(cell);
    });
    return row;
  }));
  let state = `Service: ${status.state}`;
  if (status.last_error) state += ` — last error: ${status.last_error}`;
  text("service-state", state);
  text("target-info", status.target
    ? `The image goes into slot ${status.target.slot} (up to ${bytes(status.target.size)}).`
    : `There is no slot to install into: ${status.target_refusal || "no system slot is free"}`);
  // Update mode is the recovery slot: offered when the device has one and is not running it already.
  show("enter-update-mode", !status.recovery && status.slots.some((slot) => slot.role === "recovery"));
  if (status.state === "ready-to-reboot" && page.finished) show("reboot-new", true);
  updateButtons();
}

function updateButtons() {
  const busy = page.upload !== null && !page.finished;
  $("upload-button").disabled = !page.file || busy || !(page.status && page.status.target);
  show("cancel-button", busy);
}

// --- events (server-sent) --------------------------------------------------------------------------------------

function connectEvents() {
  if (page.events) page.events.close();
  const source = new EventSource("/api/events");
  page.events = source;
  source.addEventListener("status", (e) => render(JSON.parse(e.data)));
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    if (!page.job || p.job !== page.job) return;
    const names = { preparing: "Preparing", downloading: "Receiving", writing: "Writing", verifying: "Verifying",
      configuring: "Configuring the boot" };
    text("write-stage", names[p.stage] || p.stage);
    $("write-progress").value = p.percent;
    text("write-percent", `${p.percent} %`);
  });
  // The job starts with the upload's first bytes; the upload's events name it, and say how the upload ended.
  source.addEventListener("upload", (e) => {
    const u = JSON.parse(e.data);
    if (page.uploadId === null || u.id !== page.uploadId) return;
    if (u.job) page.job = u.job;
    if (u.state === "ended" && u.result) finish(u.result);
  });
  source.addEventListener("completed", (e) => {
    const c = JSON.parse(e.data);
    if (page.job && c.job === page.job) finish(c);
  });
  source.addEventListener("service-stopped", () => refresh());
}

// --- choosing the file and the checksum ------------------------------------------------------------------------

function chooseFile(file) {
  page.file = file || null;
  text("file-name", file ? `${file.name} (${bytes(file.size)})` : "");
  updateButtons();
}

$("file-input").addEventListener("change", () => chooseFile($("file-input").files[0]));
const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  if (e.dataTransfer.files.length) chooseFile(e.dataTransfer.files[0]);
});

$("sha256-file").addEventListener("change", async () => {
  const file = $("sha256-file").files[0];
  if (!file) return;
  const lines = (await file.text()).split(/\r?\n/);
  const wanted = page.file ? page.file.name : null;
  let digest = null;
  for (const line of lines) {
    const m = line.match(/^\\?([0-9a-fA-F]{64})\s+\*?(.*)$/) || line.match(/^SHA256 \((.*)\) = ([0-9a-fA-F]{64})$/);
    if (!m) continue;
    const [hex, name] = m[1].length === 64 ? [m[1], m[2]] : [m[2], m[1]];
    if (digest === null || (wanted && name.trim() === wanted)) digest = hex;
  }
  if (digest === null && /^[0-9a-fA-F]{64}$/.test(lines[0].trim())) digest = lines[0].trim();
  if (digest === null) { message(`${file.name} holds no SHA-256 checksum`); return; }
  $("sha256-input").value = digest.toLowerCase();
});

// --- the upload (tus) ------------------------------------------------------------------------------------------

$("upload-button").addEventListener("click", () => upload().catch((e) => fail(e.message)));
$("cancel-button").addEventListener("click", async () => {
  page.cancelled = true;
  if (page.xhr) page.xhr.abort();
  if (page.upload) {
    try { await api("DELETE", page.upload, undefined, TUS); } catch (e) { message(e.message); }
  }
});

function resetProgress() {
  for (const id of ["upload-progress", "write-progress"]) $(id).value = 0;
  text("upload-percent", "0 %"); text("write-percent", "0 %"); text("write-stage", "Writing"); text("upload-note", "");
  show("result", false); show("reboot-new", false); show("progress-section", true);
}

async function upload() {
  const file = page.file;
  const sha256 = $("sha256-input").value.trim();
  if (sha256 && !/^[0-9a-fA-F]{64}$/.test(sha256)) { message("the SHA-256 must be 64 hex digits"); return; }
  message("");
  page.finished = false; page.cancelled = false; page.job = null; page.uploadId = null; page.result = null;
  resetProgress();
  let meta = `filename ${b64(file.name)}`;
  if (sha256) meta += `,sha256 ${b64(sha256)}`;
  const created = await api("POST", "/api/uploads", undefined,
    { ...TUS, "Upload-Length": String(file.size), "Upload-Metadata": meta });
  page.upload = created.location;
  page.uploadId = created.upload.id;
  updateButtons();
  let offset = 0;
  let failures = 0;
  while (offset < file.size && !page.finished && !page.cancelled) {
    try {
      offset = await patch(file, offset);
      failures = 0;
      text("upload-note", "");
    } catch (e) {
      if (page.finished || page.cancelled) break;
      if (e.fatal) throw e;
      if (failures >= RETRY_DELAYS_MS.length) throw new Error(`the connection keeps failing (${e.message})`);
      text("upload-note", `Connection lost (${e.message}); resuming…`);
      await new Promise((r) => setTimeout(r, RETRY_DELAYS_MS[failures]));
      failures += 1;
      offset = await resumeOffset();
    }
  }
  if (!page.finished && !page.cancelled) text("upload-note", "Upload complete; the device is finishing the install…");
}

function uploaded(offset, size) {
  const percent = size ? Math.floor((offset * 100) / size) : 100;
  $("upload-progress").value = percent;
  text("upload-percent", `${percent} % (${bytes(offset)} of ${bytes(size)})`);
}

function patch(file, offset) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    page.xhr = xhr;
    xhr.open("PATCH", page.upload);
    const h = headers({ ...TUS, "Upload-Offset": String(offset), "Content-Type": "application/offset+octet-stream" });
    for (const [k, v] of Object.entries(h)) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => uploaded(offset + e.loaded, file.size);
    xhr.onload = () => {
      if (xhr.status === 204) { const o = Number(xhr.getResponseHeader("Upload-Offset")); uploaded(o, file.size); resolve(o); return; }
      let error = `${xhr.status} ${xhr.statusText}`;
      try { error = JSON.parse(xhr.responseText).error || error; } catch (e) { /* not JSON */ }
      const err = new Error(error);
      err.fatal = xhr.status !== 409 && xhr.status < 500;
      reject(err);
    };
    xhr.onerror = () => reject(new Error("network error"));
    xhr.onabort = () => reject(new Error("aborted"));
    xhr.send(file.slice(offset));
  });
}

async function resumeOffset() {
  const response = await fetch(page.upload, { method: "HEAD", headers: headers(TUS), credentials: "same-origin" });
  if (response.status === 404 || response.status === 410) {
    const err = new Error("the device gave up waiting for the upload (it was idle too long); start again");
    err.fatal = true;
    throw err;
  }
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  return Number(response.headers.get("Upload-Offset"));
}

function finish(result) {
  if (page.finished && page.result) return;
  page.finished = true;
  page.result = result;
  if (page.xhr) page.xhr.abort();
  show("result", true);
  $("result").className = result.success ? "success" : "failure";
  if (result.success) {
    $("write-progress").value = 100; text("write-percent", "100 %");
    text("result-title", "Installed");
    text("result-message", result.message);
    text("result-next", "Next: reboot into the new system. If it does not come up healthy, the device boots the "
      + "current system again.");
    show("reboot-new", true);
  } else {
    text("result-title", result.error === "Cancelled" ? "Cancelled" : "Not installed");
    text("result-message", result.message);
    text("result-next", result.error === "Signature"
      ? "Nothing was changed. This device installs only bundles signed by a key it trusts: upload the signed "
        + "bundle (.tar, made with ab-flasher bundle), not the bare image."
      : "Nothing was changed on the running system. Check the file (and its checksum) and try again.");
  }
  text("upload-note", "");
  updateButtons();
  const target = page.status && page.status.target ? page.status.target.slot : null;
  refresh().then(() => { if (!result.success && target) explainOverwritten(target); });
}

// Damage found at the end of the stream (a CRC or checksum mismatch) shows after the image was written into the
// target slot: the service marks that slot incomplete (never booted). Say so, and what to do.
function explainOverwritten(slot) {
  const row = page.status && page.status.slots.find((s) => s.name === slot);
  if (!row || row.state !== "incomplete") return;
  text("result-next", `The image was written into slot ${slot} before the damage showed at its end, so slot ${slot} `
    + "is now marked incomplete and will never be booted. The running system, the boot files and the other slots "
    + "are unchanged; nothing was armed. Get an intact copy of the file (compare its SHA-256) and upload it again: "
    + `it goes into slot ${slot}.`);
}

function fail(reason) {
  if (page.finished) return;
  page.finished = true;
  show("result", true);
  $("result").className = "failure";
  text("result-title", "Not installed");
  text("result-message", reason);
  text("result-next", "Nothing was changed on the running system. Try again.");
  updateButtons();
  refresh();
}

// --- reboots ---------------------------------------------------------------------------------------------------

async function reboot(mode, what) {
  if (!window.confirm(`${what}?`)) return;
  try {
    await api("POST", "/api/reboot", { mode });
    message("");
    text("service-state", "The device is rebooting. Reload this page in a minute.");
  } catch (e) { message(`cannot reboot: ${e.message}`); }
}
$("reboot-new").addEventListener("click", () => reboot("trial", "Reboot into the new system"));
$("enter-update-mode").addEventListener("click", () => reboot("recovery", "Reboot into update mode"));

start().catch((e) => message(`cannot reach the device: ${e.message}`));
