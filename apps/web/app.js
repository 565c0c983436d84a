// sinkstream browser client: one websocket, one chat session, streamed replies.
// Protocol: README.md, "Websocket chat server". Text is always inserted with textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "sinkstream.session";
const CLOSE_AFTER_S = 10;  // a leaving page's session closes unless resumed within this (a reload does)

const state = {
  ws: null,
  session: null,     // session id, kept in sessionStorage so a reload resumes it
  limits: null,
  generating: false,
  bubble: null,      // the assistant message being streamed
  t0: 0,             // when the current reply started (ms)
  chunks: 0,         // deltas received in the current reply
  retry: 500,        // reconnect backoff (ms)
  pending: null,     // a message typed while the session was being (re)created
};

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  return `${proto}//${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : "");
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = kind;
}

function send(obj) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(obj));
    return true;
  }
  return false;
}

function sampling() {
  const s = {};
  const t = parseFloat($("temperature").value);
  const n = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(t)) s.temperature = t;
  if (Number.isFinite(n) && n > 0) {
    s.max_new_tokens = state.limits ? Math.min(n, state.limits.max_new_tokens_cap) : n;
  }
  return s;
}

function createSession() {
  const msg = { type: "session.create" };
  const system = $("system").value.trim();
  if (system) msg.system = system;
  send(msg);
}

function connect() {
  setStatus("connecting…", "connecting");
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  ws.onopen = () => {
    state.retry = 500;
    const saved = sessionStorage.getItem(KEY);
    if (saved) send({ type: "session.create", resume: saved });
    else createSession();
  };
  ws.onmessage = (e) => {
    let ev;
    try { ev = JSON.parse(e.data); } catch { return; }
    handle(ev);
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    state.session = null;
    if (state.generating) finishReply("disconnected", null);
    setStatus("disconnected, reconnecting…", "offline");
    setTimeout(connect, state.retry);
    state.retry = Math.min(state.retry * 2, 8000);
  };
}

function handle(ev) {
  switch (ev.type) {
    case "session.created":
      state.session = ev.session;
      state.fullNoticeShown = false;
      state.limits = ev.limits;
      sessionStorage.setItem(KEY, ev.session);
      setStatus(`connected · ${ev.model} · ${ev.resumed ? "resumed" : "new"} session`, "online");
      $("max-tokens").max = ev.limits.max_new_tokens_cap;
      if (state.pending) {
        const text = state.pending;
        state.pending = null;
        startReply(text);
      }
      break;
    case "delta":
      if (ev.session !== state.session || !state.bubble) break;
      state.bubble.querySelector(".text").textContent += ev.text;
      state.chunks += 1;
      showRate(state.chunks / Math.max((performance.now() - state.t0) / 1000, 1e-3), true);
      scrollDown();
      break;
    case "done":
      if (ev.session !== state.session) break;
      finishReply(ev.finish_reason, ev.usage);
      break;
    case "error":
      onError(ev);
      break;
    case "session.closed":
      if (ev.session === state.session && ev.reason !== "closed by client") {
        notice(`Session closed: ${ev.reason}.`);
        state.session = null;
      }
      break;
  }
}

function onError(ev) {
  if (ev.code === "no_reply") return;  // Stop raced the reply's end: nothing to say
  if (ev.code === "too_many_sessions" && !state.session) {
    // Every session slot is in use: say so plainly and try again (resuming ours if we had one).
    setStatus("server full · retrying…", "full");
    if (!state.fullNoticeShown) {
      notice("The server is full: all of its sessions are in use. This page keeps trying and connects as soon as one is free.");
      state.fullNoticeShown = true;
    }
    const ws = state.ws;
    setTimeout(() => {
      if (state.ws !== ws || state.session) return;
      const saved = sessionStorage.getItem(KEY);
      if (saved) send({ type: "session.create", resume: saved });
      else createSession();
    }, 3000);
    return;
  }
  if (ev.code === "unknown_session" || ev.code === "idle_timeout") {
    // The server no longer has our session (restart or expiry): start a new one.
    sessionStorage.removeItem(KEY);
    state.session = null;
    if (state.generating) finishReply("error", null);
    if (ev.code === "idle_timeout") notice("The session expired; a new one starts with your next message.");
    else createSession();
    return;
  }
  notice(`Error (${ev.code}): ${ev.message}`);
  if (state.generating && ev.session === state.session && ev.code !== "busy") finishReply("error", null);
}

function addMessage(role, text) {
  const hint = document.querySelector(".hint");
  if (hint) hint.remove();
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("transcript").append(div);
  scrollDown();
  return div;
}

function notice(text) {
  const p = document.createElement("p");
  p.className = "notice";
  p.setAttribute("role", "alert");
  p.textContent = text;
  $("transcript").append(p);
  scrollDown();
}

function scrollDown() {
  const t = $("transcript");
  t.scrollTop = t.scrollHeight;
}

function showRate(tps, live) {
  $("rate").textContent = `${tps.toFixed(1)} tokens/s${live ? " (streaming)" : ""}`;
}

function showCache(u) {
  const cap = u.cache_capacity;
  const held = u.tokens_in_cache;
  const seen = u.tokens_seen;
  const meter = $("cache-meter");
  meter.max = cap;
  meter.value = held;
  const share = seen ? Math.round((100 * held) / seen) : 100;
  $("cache-label").textContent =
    `cache: holds ${held.toLocaleString()} of ${seen.toLocaleString()} tokens streamed ` +
    `(${share}%), ${held.toLocaleString()}/${cap.toLocaleString()} slots`;
}

function setGenerating(on) {
  state.generating = on;
  $("stop").disabled = !on;
  $("send").disabled = on;
  document.body.classList.toggle("generating", on);
}

function startReply(text) {
  state.bubble = addMessage("assistant", "");
  state.bubble.dataset.state = "streaming";
  state.t0 = performance.now();
  state.chunks = 0;
  setGenerating(true);
  send({ type: "message", session: state.session, text, sampling: sampling() });
}

function finishReply(reason, usage) {
  if (state.bubble) {
    state.bubble.dataset.state = "done";
    state.bubble.dataset.finish = reason;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = usage
      ? `${usage.completion_tokens} tokens · ${usage.tokens_per_second.toFixed(1)} tokens/s · ${reason}`
      : reason;
    state.bubble.append(meta);
  }
  if (usage) {
    showRate(usage.tokens_per_second, false);
    showCache(usage);
  }
  state.bubble = null;
  setGenerating(false);
}

function submit() {
  const input = $("input");
  const text = input.value.trim();
  if (!text || state.generating) return;
  input.value = "";
  addMessage("user", text);
  if (state.session) startReply(text);
  else {
    state.pending = text;
    createSession();
  }
}

function stop() {
  if (state.generating && state.session) send({ type: "cancel", session: state.session });
}

function newChat() {
  if (state.session) send({ type: "session.close", session: state.session });
  sessionStorage.removeItem(KEY);
  state.session = null;
  if (state.generating) finishReply("cancelled", null);
  $("transcript").replaceChildren();
  $("rate").textContent = "– tokens/s";
  $("cache-label").textContent = "cache: –";
  $("cache-meter").value = 0;
  createSession();
  $("input").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.generating) {
      e.preventDefault();
      stop();
    }
  });
  $("stop").addEventListener("click", () => { stop(); $("input").focus(); });
  $("new-chat").addEventListener("click", newChat);
  // Closed tab or reload (indistinguishable here): the server closes the session unless this page,
  // reloaded, resumes it (from sessionStorage) within the delay.
  window.addEventListener("pagehide", () => {
    if (state.session) send({ type: "session.close", session: state.session, after_s: CLOSE_AFTER_S });
  });
  // Back from the back/forward cache with the socket still open: call the delayed close off.
  window.addEventListener("pageshow", (e) => {
    if (e.persisted && state.session) send({ type: "session.create", resume: state.session });
  });
  connect();
});
