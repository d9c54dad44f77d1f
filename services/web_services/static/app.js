// callvault recordings page: plain JS, no build step.
// The API key stays in sessionStorage (this tab only) and goes out as "Authorization: Bearer".
// Playback: the page asks POST /recordings/{id}/audio-url for a short-lived signed URL and gives it
// to <audio src>, so the browser streams and seeks with ordinary Range requests; the key itself is
// never put in a URL.
"use strict";
const API = "/api/v1";
const $ = (sel) => document.querySelector(sel);
let nextCursor = null;
let lastQuery = null;

function apiKey() { return sessionStorage.getItem("callvault-api-key") || ""; }

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + apiKey() }, options.headers || {});
  const resp = await fetch(API + path, Object.assign({}, options, { headers }));
  if (resp.status === 204) return null;
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const msg = body.error ? body.error.message : resp.statusText;
    throw new Error(`${resp.status}: ${msg}`);
  }
  return body;
}

function queryFromForm() {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData($("#search"))) {
    if (!value) continue;
    if (name === "start_after" || name === "start_before") {
      params.set(name, new Date(value).toISOString()); // local time -> UTC
    } else {
      params.set(name, value);
    }
  }
  return params;
}

function fmtDuration(s) {
  const m = Math.floor(s / 60);
  return `${m}:${String(Math.round(s % 60)).padStart(2, "0")}`;
}

function cell(row, text) {
  const td = row.insertCell();
  td.textContent = text;
  return td;
}

function addRows(items) {
  const tbody = $("#results tbody");
  for (const rec of items) {
    const row = tbody.insertRow();
    row.dataset.id = rec.id;
    cell(row, new Date(rec.start).toLocaleString());
    cell(row, fmtDuration(rec.duration));
    cell(row, rec.from_display ? `${rec.from_display} <${rec.caller}>` : rec.caller || rec.from_uri);
    cell(row, rec.to_display ? `${rec.to_display} <${rec.callee}>` : rec.callee || rec.to_uri);
    cell(row, rec.direction);
    cell(row, rec.call_id);
    const actions = row.insertCell();
    const play = document.createElement("button");
    play.textContent = "Play";
    play.addEventListener("click", () => playRecording(rec, row));
    const del = document.createElement("button");
    del.textContent = "Delete";
    del.addEventListener("click", () => deleteRecording(rec, row));
    actions.append(play, " ", del);
  }
  $("#results").hidden = tbody.rows.length === 0;
}

async function search(more = false) {
  if (!apiKey()) { setStatus("Enter the tenant's API key first.", true); return; }
  if (!more) {
    lastQuery = queryFromForm();
    nextCursor = null;
    $("#results tbody").replaceChildren();
  }
  const params = new URLSearchParams(lastQuery);
  if (more && nextCursor) params.set("cursor", nextCursor);
  setStatus("Searching...");
  try {
    const page = await api("/recordings?" + params.toString());
    addRows(page.items);
    nextCursor = page.next;
    $("#more").hidden = !nextCursor;
    const n = $("#results tbody").rows.length;
    setStatus(n ? `${n} recording(s)${nextCursor ? ", more available" : ""}.` : "No recordings found.");
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function playRecording(rec, row) {
  try {
    const signed = await api(`/recordings/${encodeURIComponent(rec.id)}/audio-url`, { method: "POST" });
    document.querySelectorAll("tr.playing").forEach((r) => r.classList.remove("playing"));
    row.classList.add("playing");
    $("#player").hidden = false;
    $("#player-title").textContent = `${rec.caller || rec.from_uri} \u2192 ${rec.callee || rec.to_uri}, ${new Date(rec.start).toLocaleString()}`;
    $("#details").textContent = JSON.stringify(rec, null, 2);
    const audio = $("#audio");
    audio.src = signed.url;
    await audio.play().catch(() => {});
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function deleteRecording(rec, row) {
  if (!confirm(`Delete recording ${rec.id} (audio and metadata)? This cannot be undone.`)) return;
  try {
    await api(`/recordings/${encodeURIComponent(rec.id)}`, { method: "DELETE" });
    row.remove();
    setStatus(`Deleted ${rec.id}.`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("callvault-api-key", $("#api-key").value.trim());
  $("#api-key").value = "";
  search();
});
$("#forget").addEventListener("click", () => {
  sessionStorage.removeItem("callvault-api-key");
  $("#results tbody").replaceChildren();
  $("#results").hidden = true;
  setStatus("API key forgotten.");
});
$("#search").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
$("#more").addEventListener("click", () => search(true));
if (apiKey()) search(); else setStatus("Enter the tenant's API key to search recordings.");
