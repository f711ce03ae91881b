// The page: wires the session, decoder, player, microphone + VAD and the UI.
//
// Query parameters: token, avatar, codec (auto|h264|jpeg), rate (a protocol
// audio rate, default 16000), jitter (ms, default 100), autoconnect (0 to
// wait for the Connect button), url (the session URL; default: this server).
// window.avatarStats holds live counters (tests and curious people read it).

import { Microphone, decodeAudioFile, toFrames } from "./capture.js";
import { Player } from "./player.js";
import { SUPPORTED_AUDIO_RATES, frameSamples, pcm16ToFloat } from "./protocol.js";
import { Session } from "./session.js";
import { GapStats, Turns } from "./turns.js";
import { Vad } from "./vad.js";
import { chooseCodec, createDecoder } from "./video.js";

const MAX_TURN_S = 120; // the server's default limits.max_turn_s
const PING_EVERY_MS = 5000;
const $ = (id) => document.getElementById(id);

const params = new URLSearchParams(location.search);
const defaultUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/session`;
const settings = {
  url: params.get("url") || defaultUrl,
  token: params.get("token") || "",
  avatar: params.get("avatar") || "",
  codec: params.get("codec") || "auto",
  rate: Number(params.get("rate") || 16000),
  jitterMs: Number(params.get("jitter") || 100),
};

const stats = {
  state: "new", codec: null, codecReason: null, tier: null, session: null, rate: settings.rate,
  width: null, height: null, fps: null, videoFrames: 0, audioFrames: 0, framesDrawn: 0,
  speechFramesDrawn: 0, lastDrawn: null, firstFrameMs: null, ttffMs: null, gapMs: null,
  bufferMs: null, rttMs: null, resumes: 0, turnsStarted: [], turnsDone: [], texts: [], errors: [],
  vad: { level: -120, speaking: false },
};
window.avatarStats = stats;

let ctx = null;
let player = null;
let session = null;
let decoder = null;
let mic = null;
let vad = new Vad();
let voiceMode = null; // what the current utterance does: "repeat" or "listen"
let turns = new Turns();
const gaps = new GapStats();
let connectStartMs = 0;
let refused = false; // the server refused the session; its reason stays on screen
let pingId = 0;
const pings = new Map();

// --- UI helpers ----------------------------------------------------------

function log(text, kind = "") {
  const li = document.createElement("li");
  li.className = kind;
  const time = new Date().toLocaleTimeString([], { hour12: false });
  li.innerHTML = `<time>${time}</time> `;
  li.append(text);
  const list = $("log");
  list.prepend(li);
  while (list.children.length > 80) list.lastChild.remove();
}

function fail(text) {
  stats.errors.push(text);
  log(text, "error");
}

function overlay(text, { button = null } = {}) {
  const el = $("overlay");
  el.hidden = text === null;
  $("overlay-text").textContent = text || "";
  $("start").hidden = button === null;
  if (button) $("start").textContent = button;
}

function setState(state, detail) {
  stats.state = state;
  const pill = $("state");
  pill.dataset.state = state;
  pill.textContent = detail ? `${state} · ${detail}` : state;
  const live = state === "connected";
  $("interrupt").disabled = !live;
  $("mic").disabled = !live;
  $("wav-input").disabled = !live;
  $("connect").textContent = ["connecting", "connected", "reconnecting"].includes(state)
    ? "Disconnect" : "Connect";
}

function setTier(tier, reason) {
  stats.tier = tier;
  $("tier").textContent = `tier ${tier}`;
  $("tier").dataset.tier = String(tier);
  $("transcript-panel").classList.toggle("featured", tier === 3);
  if (reason) log(`tier ${tier}: ${reason}`, tier > 1 ? "warn" : "");
}

function ms(v) {
  return v === null || v === undefined ? "–" : `${Math.round(v)} ms`;
}

function refreshStats() {
  const g = gaps.summary();
  stats.gapMs = g;
  stats.bufferMs = player && player.anchor ? player.bufferS * 1000 : null;
  stats.vad = { level: vad.level, speaking: vad.speaking };
  stats.ttffMs = turns.lastTtffMs;
  $("s-ttff").textContent = turns.lastTtffMs === null ? "–" : ms(turns.lastTtffMs);
  $("s-first").textContent = ms(stats.firstFrameMs);
  $("s-gap").textContent = g ? `${ms(g.last)} · p95 ${Math.round(g.p95)} · max ${Math.round(g.max)}` : "–";
  // Red when a gap shows on screen: a frame interval or more went missing.
  $("s-gap").classList.toggle("bad", !!g && stats.fps !== null && g.max > 2000 / stats.fps);
  $("s-buffer").textContent = ms(stats.bufferMs);
  $("s-rtt").textContent = ms(stats.rttMs);
  $("s-frames").textContent = `${stats.framesDrawn} (${stats.speechFramesDrawn} speech, `
    + `${player ? player.stats.dropped : 0} skipped)`;
  $("s-format").textContent = stats.session
    ? `${stats.codec === "h264" ? "H.264" : "JPEG"} ${stats.width}×${stats.height}, ${stats.rate / 1000} kHz` : "–";
  $("s-session").textContent = stats.session ? `${stats.session.slice(0, 10)}…` : "–";
  const speaking = stats.lastDrawn && stats.lastDrawn.speech;
  $("s-speaking").textContent = speaking ? "speaking" : (stats.session ? "idle" : "–");
  $("level").value = Math.max(-80, Math.min(0, vad.level));
  $("vad").textContent = vad.speaking ? "voice" : "";
}

// --- connection ------------------------------------------------------------

async function start() {
  if (!SUPPORTED_AUDIO_RATES.includes(settings.rate)) {
    fail(`rate=${settings.rate} is not a protocol rate (${SUPPORTED_AUDIO_RATES.join(", ")})`);
    return;
  }
  if (ctx === null) {
    // The context runs at the protocol rate: microphone, files and server
    // audio all live at that rate and the browser resamples to the device.
    ctx = new AudioContext({ sampleRate: settings.rate, latencyHint: "interactive" });
    player = new Player(ctx, $("video"), { jitterMs: settings.jitterMs });
    player.onDrawn = onDrawn;
  }
  if (ctx.state !== "running") {
    await ctx.resume().catch(() => {});
  }
  if (ctx.state !== "running") {
    overlay("The browser wants a click before it plays sound.", { button: "Start" });
    return;
  }
  await connect();
}

async function connect() {
  let choice;
  try {
    choice = await chooseCodec(settings.codec);
  } catch (e) {
    fail(e.message);
    overlay(e.message);
    return;
  }
  stats.codec = choice.codec;
  stats.codecReason = choice.reason;
  $("codec").textContent = choice.codec === "h264" ? "H.264 · WebCodecs" : "JPEG";
  $("codec").title = choice.reason;
  log(`video: ${choice.codec} (${choice.reason})`);
  overlay("Connecting…");
  refused = false;
  connectStartMs = performance.now();
  const current = new Session({
    url: settings.url, avatar: settings.avatar || null, token: settings.token || null,
    codec: choice.codec, rate: settings.rate,
  });
  session = current;
  // A replaced session still finishes (bye); its events no longer concern the page.
  const on = (type, handler) => current.addEventListener(type, (ev) => {
    if (session === current) handler(ev.detail);
  });
  on("state", onState);
  on("ready", onReady);
  on("message", onMessage);
  on("media", onMedia);
  on("failed", onFailed);
  session.connect();
}

function disconnect() {
  stopMic();
  if (session) session.close();
}

function onState({ state, detail }) {
  setState(state, detail);
  if (state === "reconnecting") {
    log(`connection lost; ${detail || "reconnecting"}`, "warn");
    overlay("Reconnecting…");
  } else if (state === "closed") {
    stopMic();
    if (decoder) decoder.close();
    decoder = null;
    log(`closed ${detail}`);
    if (!refused) overlay("Not connected.", { button: "Connect" });
  }
}

function onReady(ready) {
  const { video, audio } = ready;
  if (audio.rate !== settings.rate) {
    fail(`server answered audio rate ${audio.rate}, asked for ${settings.rate}`);
  }
  // Turns that were playing or queued are not continued after a resume either.
  turns.forgetPending();
  if (ready.resumed) stats.resumes += 1;
  else {
    player.reset();
    gaps.reset();
    stats.firstFrameMs = null;
  }
  if (decoder) decoder.close();
  decoder = createDecoder(video.codec, onPicture, (e) => fail(e.message));
  player.configure({ width: video.width, height: video.height, rate: audio.rate });
  Object.assign(stats, { session: ready.session, width: video.width, height: video.height, fps: video.fps });
  setTier(ready.tier);
  ping();
  log(`${ready.resumed ? "resumed" : "session"} ${ready.session.slice(0, 8)}… ${video.codec} `
    + `${video.width}×${video.height} @ ${video.fps} fps, ${audio.rate} Hz`);
}

function ping() {
  if (!session || !session.open) return;
  pingId += 1;
  pings.set(pingId, performance.now());
  session.send({ type: "ping", id: pingId });
}

function onFailed({ code, message }) {
  refused = true;
  fail(`${code}: ${message}`);
  const hint = code === "unauthorized" ? " Set a token under Settings." : "";
  overlay(`The server refused the session: ${message}.${hint}`, { button: "Connect" });
}

function onMessage(msg) {
  switch (msg.type) {
    case "turn.started":
      turns.onStarted(msg);
      stats.turnsStarted.push(msg);
      log(`${msg.turn} started`);
      break;
    case "turn.done": {
      const t = turns.onDone(msg);
      stats.turnsDone.push(msg);
      const ttff = t && t.ttffMs !== null ? `, TTFF ${ms(t.ttffMs)}` : "";
      log(`${msg.turn} done: ${msg.frames} frames${msg.interrupted ? ", interrupted" : ""}${ttff}`);
      break;
    }
    case "tier":
      setTier(msg.tier, msg.reason);
      break;
    case "text":
      showText(msg);
      break;
    case "error":
      fail(`${msg.code}: ${msg.message}`);
      break;
    case "pong":
      if (pings.has(msg.id)) stats.rttMs = performance.now() - pings.get(msg.id);
      pings.clear();
      break;
    case "bye":
      log("bye");
      break;
    default:
      log(`unknown message ${msg.type}`, "warn");
  }
}

function showText(msg) {
  stats.texts.push(msg);
  const box = $("transcript");
  box.querySelector(".muted")?.remove();
  const p = document.createElement("p");
  const who = document.createElement("b");
  who.textContent = `${msg.turn}: `;
  p.append(who, msg.text);
  box.append(p);
  box.scrollTop = box.scrollHeight;
}

// --- media -----------------------------------------------------------------

function onMedia(frame) {
  const now = performance.now();
  if (frame.kind === 2) {
    stats.audioFrames += 1;
    player.pushAudio(frame.ptsUs, pcm16ToFloat(frame.payload));
    return;
  }
  stats.videoFrames += 1;
  gaps.push(now);
  turns.onVideo(frame.seq, now);
  // The server sends SPS/PPS in-band with keyframes; a config-only frame
  // carries no picture and this decoder needs none.
  if (frame.configOnly || decoder === null) return;
  player.arrived(frame.ptsUs);
  const meta = { seq: frame.seq, pts: frame.ptsUs, speech: frame.speech, tier: frame.tier, last: frame.lastOfTurn };
  try {
    decoder.decode(frame.payload, frame.ptsUs, frame.keyframe, meta);
  } catch (e) {
    fail(e.message);
  }
}

function onPicture(ptsUs, picture, meta) {
  player.pushPicture(ptsUs, picture, meta);
}

function onDrawn(meta) {
  stats.framesDrawn += 1;
  if (meta.speech) stats.speechFramesDrawn += 1;
  stats.lastDrawn = meta;
  if (stats.firstFrameMs === null) stats.firstFrameMs = performance.now() - connectStartMs;
  if (!$("overlay").hidden && stats.state === "connected") overlay(null);
}

function frameLoop() {
  if (player) player.tick();
  requestAnimationFrame(frameLoop);
}

// --- turns -------------------------------------------------------------------

function sendFrames(id, frames) {
  for (const f of frames) {
    session.sendAudio(f);
    turns.audioSent(id, performance.now());
  }
}

function openTurn(source, text = "") {
  const id = turns.newId(source);
  session.send({ type: "speak.start", turn: id, ...(text ? { text } : {}) });
  turns.open(id, source);
  return id;
}

function endMicTurn() {
  if (turns.openSource !== "mic") return;
  session.send({ type: "speak.end", turn: turns.closeOpen() });
}

async function sayFile(file) {
  if (!session || !session.open) return;
  let samples;
  try {
    samples = await decodeAudioFile(ctx, file);
  } catch (e) {
    fail(e.message);
    return;
  }
  const seconds = samples.length / ctx.sampleRate;
  if (seconds > MAX_TURN_S) {
    fail(`${file.name} is ${seconds.toFixed(0)} s long; a turn may carry at most ${MAX_TURN_S} s`);
    return;
  }
  endMicTurn();
  // A whole file is sent at once: the server renders it as fast as it can.
  const id = openTurn("wav", $("wav-text").value.trim());
  sendFrames(id, toFrames(samples, session.frameSamples));
  session.send({ type: "speak.end", turn: turns.closeOpen() });
  log(`${id}: ${file.name}, ${seconds.toFixed(1)} s`);
}

function interrupt(why) {
  if (!session || !session.open) return;
  session.send({ type: "interrupt" });
  // Received speech still in the jitter buffer is cut at once; the pictures
  // converge to neutral as the server's next frames arrive.
  player.muteScheduled();
  // The server ended the open turn; the rest of this utterance is dropped.
  turns.closeOpen();
  log(`interrupt (${why})`, "warn");
}

function onMicFrame(frame) {
  if (!session || !session.open) return;
  const avatarSpeaks = turns.playing().length > 0;
  for (const ev of vad.push(frame, avatarSpeaks)) {
    if (ev.type === "start") onVoiceStart(ev.frames);
    else if (ev.type === "audio" && turns.openSource === "mic") sendFrames(turns.openId, ev.frames);
    else if (ev.type === "end") onVoiceEnd();
  }
}

function onVoiceStart(preroll) {
  // Barge-in: the avatar is saying something that is not this person's voice.
  const foreign = turns.pending().some((t) => t.source !== "mic");
  if (foreign && $("barge-in").checked) interrupt("voice");
  voiceMode = $("mic-mode").value;
  if (voiceMode === "listen") {
    session.send({ type: "listen.start" });
    return;
  }
  const id = openTurn("mic");
  sendFrames(id, preroll);
  log(`${id}: voice`);
}

function onVoiceEnd() {
  if (voiceMode === "listen") session.send({ type: "listen.end" });
  else endMicTurn();
  voiceMode = null;
}

async function toggleMic() {
  if (mic && mic.active) {
    stopMic();
    return;
  }
  mic = new Microphone(ctx, frameSamples(settings.rate), onMicFrame);
  try {
    await mic.start();
  } catch (e) {
    mic = null;
    fail(`microphone: ${e.message}`);
    return;
  }
  vad = new Vad();
  $("meter").removeAttribute("data-off");
  $("mic").setAttribute("aria-pressed", "true");
  $("mic").textContent = "Mic on";
  log("microphone on");
}

function stopMic() {
  if (!mic || !mic.active) return;
  mic.stop();
  if (session && session.open && voiceMode !== null) onVoiceEnd();
  vad.reset();
  $("meter").setAttribute("data-off", "");
  $("mic").setAttribute("aria-pressed", "false");
  $("mic").textContent = "Mic off";
  log("microphone off");
}

// --- wiring ----------------------------------------------------------------

function bind() {
  $("start").addEventListener("click", () => start());
  $("connect").addEventListener("click", () => {
    if (["connecting", "connected", "reconnecting"].includes(stats.state)) disconnect();
    else start();
  });
  $("interrupt").addEventListener("click", () => interrupt("button"));
  $("mic").addEventListener("click", () => toggleMic());
  $("wav-input").addEventListener("change", (ev) => {
    const file = ev.target.files[0];
    if (file) sayFile(file).finally(() => { ev.target.value = ""; });
  });
  // The whole window is the drop zone (a file dropped elsewhere would replace the page).
  window.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    document.body.classList.add("dragging");
  });
  window.addEventListener("dragleave", (ev) => {
    if (ev.relatedTarget === null) document.body.classList.remove("dragging");
  });
  window.addEventListener("drop", (ev) => {
    ev.preventDefault();
    document.body.classList.remove("dragging");
    const file = ev.dataTransfer.files[0];
    if (file) sayFile(file);
  });
  $("settings").addEventListener("submit", (ev) => {
    ev.preventDefault();
    settings.url = $("f-url").value;
    settings.token = $("f-token").value;
    settings.avatar = $("f-avatar").value;
    settings.codec = $("f-codec").value;
    disconnect();
    start();
  });
  $("f-url").value = settings.url;
  $("f-token").value = settings.token;
  $("f-codec").value = settings.codec;
  $("f-avatar").value = settings.avatar;
}

async function listAvatars() {
  try {
    const res = await fetch("/v1/avatars");
    const { avatars } = await res.json();
    const list = $("avatars");
    for (const a of avatars) {
      const opt = document.createElement("option");
      opt.value = a.id;
      opt.label = `${a.width}×${a.height} @ ${a.fps} fps`;
      list.append(opt);
    }
  } catch {
    // The page may talk to a session URL on another host; ids are then typed in.
  }
}

bind();
listAvatars();
setState("new", "");
setInterval(refreshStats, 250);
setInterval(ping, PING_EVERY_MS);
requestAnimationFrame(frameLoop);
if (params.get("autoconnect") !== "0") start();
else overlay("Not connected.", { button: "Connect" });
