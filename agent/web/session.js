// One conversation over a WebSocket: hello/ready, message dispatch, client
// audio frames, and resume after a lost connection (PROTOCOL.md "Resume").
//
// Events (CustomEvent detail): "state" {state, detail}, "ready" (the ready
// message), "message" (any other JSON message), "media" (a parsed binary
// frame), "failed" {code, message} (a fatal error or a refused session).

import { frameSamples, helloMessage, packAudio, unpackMedia } from "./protocol.js";

const RESUME_WINDOW_MS = 60000; // the server keeps a lost session this long
const RETRY_DELAYS_MS = [250, 500, 1000, 2000, 4000];
// Close codes after which trying again cannot help (normal, policy, too big).
const FINAL_CLOSE_CODES = new Set([1000, 1008, 1009]);

export class Session extends EventTarget {
  constructor({ url, avatar, token, codec, rate }) {
    super();
    this.url = url;
    this.avatar = avatar;
    this.token = token;
    this.codec = codec;
    this.rate = rate;
    this.frameSamples = frameSamples(rate);
    this.ws = null;
    this.state = "new";
    this.ready = null; // the last ready message
    this.resumeToken = null;
    this.lastVideoSeq = null;
    this.audioSeq = 0;
    this.lostAt = null;
    this.attempt = 0;
    this.closing = false;
    this.retryAfterMs = 0;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state, detail = "") {
    this.state = state;
    this._emit("state", { state, detail });
  }

  connect() {
    this.closing = false;
    this._open();
  }

  _open() {
    const resuming = this.ready !== null;
    this._setState(resuming ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      const resume = resuming ? {
        session: this.ready.session, token: this.resumeToken,
        ...(this.lastVideoSeq !== null ? { last_seq: this.lastVideoSeq } : {}),
      } : undefined;
      ws.send(JSON.stringify(helloMessage({
        avatar: this.avatar, token: this.token, codec: this.codec, rate: this.rate, resume,
      })));
    };
    ws.onmessage = (ev) => this._onMessage(ev.data);
    ws.onclose = (ev) => this._onClose(ws, ev);
  }

  _onMessage(data) {
    if (typeof data !== "string") {
      const frame = unpackMedia(data);
      if (frame.kind === 1) this.lastVideoSeq = frame.seq;
      this._emit("media", frame);
      return;
    }
    const msg = JSON.parse(data);
    switch (msg.type) {
      case "ready":
        this.ready = msg;
        this.resumeToken = msg.resume_token;
        this.lostAt = null;
        this.attempt = 0;
        if (!msg.resumed) {
          this.audioSeq = 0;
          this.lastVideoSeq = null;
        }
        this._setState("connected", msg.resumed ? "resumed" : "");
        this._emit("ready", msg);
        return;
      case "turn.done":
        if (msg.resume_token) this.resumeToken = msg.resume_token;
        break;
      case "error":
        if (msg.fatal) {
          this.retryAfterMs = msg.retry_after_ms || 0;
          this._emit("failed", { code: msg.code, message: msg.message });
        }
        break;
      case "bye":
        this.closing = true;
        break;
      default:
        break;
    }
    this._emit("message", msg);
  }

  _onClose(ws, ev) {
    if (ws !== this.ws) return;
    this.ws = null;
    const now = performance.now();
    if (this.closing || FINAL_CLOSE_CODES.has(ev.code)) {
      this._setState("closed", `${ev.code}${ev.reason ? " " + ev.reason : ""}`);
      return;
    }
    if (this.lostAt === null) this.lostAt = now;
    if (now - this.lostAt > RESUME_WINDOW_MS) {
      this._setState("closed", `gave up after ${Math.round((now - this.lostAt) / 1000)} s`);
      return;
    }
    const delay = Math.max(this.retryAfterMs,
      RETRY_DELAYS_MS[Math.min(this.attempt, RETRY_DELAYS_MS.length - 1)]);
    this.attempt += 1;
    this.retryAfterMs = 0;
    this._setState("reconnecting", `closed ${ev.code}; retry in ${delay} ms`);
    setTimeout(() => { if (!this.closing) this._open(); }, delay);
  }

  get open() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.state === "connected";
  }

  send(msg) {
    if (!this.open) throw new Error(`cannot send ${msg.type}: not connected`);
    this.ws.send(JSON.stringify(msg));
  }

  /** One 20 ms frame of float samples at the session rate. */
  sendAudio(samples) {
    if (samples.length !== this.frameSamples) {
      throw new Error(`audio frame of ${samples.length} samples; 20 ms is ${this.frameSamples}`);
    }
    if (!this.open) throw new Error("cannot send audio: not connected");
    this.ws.send(packAudio(this.audioSeq, samples));
    this.audioSeq += 1;
  }

  /** Finish politely (bye) when connected; otherwise just close. */
  close() {
    this.closing = true;
    if (this.open) this.send({ type: "bye" });
    else if (this.ws) this.ws.close(1000);
    else this._setState("closed", "by user");
  }
}
