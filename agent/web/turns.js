// Bookkeeping of the page's turns and of frame arrivals, pure: times are
// performance.now() milliseconds passed in by the caller.
//
// A turn is opened by the page (speak.start), gets its first audio out, is
// closed (speak.end), starts playing (turn.started names its first video seq)
// and is done (turn.done). Time to first frame (TTFF) is, as in the Python
// client, from the first audio frame sent to the arrival of the turn's first
// video frame.

const KEEP_ARRIVALS = 512; // video seq -> arrival, enough for any turn.started delay
const GAP_WINDOW_MS = 5000;

export class Turns {
  constructor() {
    this.count = 0;
    this.byId = new Map(); // id -> {id, source, firstAudioMs, firstSeq, ttffMs, done}
    this.openId = null; // the turn the page is sending audio for
    this.arrivals = new Map(); // video seq -> arrival ms
    this.lastTtffMs = null;
  }

  newId(source) {
    this.count += 1;
    return `${source}-${this.count}`;
  }

  open(id, source) {
    this.byId.set(id, { id, source, firstAudioMs: null, firstSeq: null, ttffMs: null, done: null });
    this.openId = id;
  }

  audioSent(id, nowMs) {
    const t = this.byId.get(id);
    if (t.firstAudioMs === null) t.firstAudioMs = nowMs;
  }

  closeOpen() {
    const id = this.openId;
    this.openId = null;
    return id;
  }

  get openSource() {
    return this.openId === null ? null : this.byId.get(this.openId).source;
  }

  /** Turns started and not done: the avatar is speaking them now. */
  playing() {
    return [...this.byId.values()].filter((t) => t.firstSeq !== null && t.done === null);
  }

  /** Turns sent and not done (playing or queued). */
  pending() {
    return [...this.byId.values()].filter((t) => t.done === null);
  }

  onVideo(seq, arrivalMs) {
    this.arrivals.set(seq, arrivalMs);
    if (this.arrivals.size > KEEP_ARRIVALS) this.arrivals.delete(this.arrivals.keys().next().value);
    for (const t of this.byId.values()) {
      if (t.firstSeq === seq && t.ttffMs === null) this._ttff(t, arrivalMs);
    }
  }

  onStarted(msg) {
    const t = this.byId.get(msg.turn);
    if (!t) return;
    t.firstSeq = msg.seq;
    const arrival = this.arrivals.get(msg.seq);
    if (arrival !== undefined) this._ttff(t, arrival);
  }

  _ttff(t, arrivalMs) {
    if (t.firstAudioMs === null) return;
    t.ttffMs = arrivalMs - t.firstAudioMs;
    this.lastTtffMs = t.ttffMs;
  }

  onDone(msg) {
    const t = this.byId.get(msg.turn);
    if (!t) return null;
    t.done = msg;
    if (this.openId === msg.turn) this.openId = null;
    return t;
  }

  /** A new session: turns of the old one will never finish. */
  forgetPending() {
    for (const t of this.pending()) t.done = { turn: t.id, lost: true };
    this.openId = null;
    this.arrivals.clear();
  }
}

/** Inter-frame arrival gaps over the last few seconds. */
export class GapStats {
  constructor() {
    this.items = []; // [arrivalMs, gapMs]
    this.lastArrival = null;
  }

  push(arrivalMs) {
    if (this.lastArrival !== null) this.items.push([arrivalMs, arrivalMs - this.lastArrival]);
    this.lastArrival = arrivalMs;
    while (this.items.length && this.items[0][0] < arrivalMs - GAP_WINDOW_MS) this.items.shift();
  }

  reset() {
    this.items = [];
    this.lastArrival = null;
  }

  summary() {
    if (!this.items.length) return null;
    const gaps = this.items.map((x) => x[1]).sort((a, b) => a - b);
    const at = (q) => gaps[Math.min(gaps.length - 1, Math.floor(q * gaps.length))];
    return { last: this.items[this.items.length - 1][1], p50: at(0.5), p95: at(0.95), max: gaps[gaps.length - 1] };
  }
}
