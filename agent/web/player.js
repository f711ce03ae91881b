// Plays server video and audio together by pts, with the AudioContext as the
// one clock.
//
// The first media frame to arrive anchors pts to context time `jitterMs`
// ahead: the jitter buffer. Audio frames are scheduled back to back at their
// pts, so continuous audio stays continuous; the canvas shows, on each
// animation frame, the newest decoded picture whose pts has been reached at
// the speaker (output latency included). A frame that arrives after its time
// re-anchors the clock later (the buffer grows by the lateness and a margin);
// a pts far ahead (a resumed session) re-anchors it to the new position.

const LATE_MARGIN_S = 0.04; // extra buffer added when a frame was late
const REANCHOR_AHEAD_S = 1.5; // a pts this far past the buffer is a jump, not jitter
const MAX_QUEUED_PICTURES = 50; // 2 s at 25 fps; older ones are dropped first

export class Player {
  constructor(audioCtx, canvas, { jitterMs = 100 } = {}) {
    this.ctx = audioCtx;
    this.canvas = canvas;
    this.draw2d = canvas.getContext("2d");
    this.jitterS = jitterMs / 1000;
    this.gain = audioCtx.createGain();
    this.gain.connect(audioCtx.destination);
    this.anchor = null; // {ctxTime, ptsUs}
    this.newestPtsUs = -Infinity;
    this.pictures = []; // [{ptsUs, picture, meta}] sorted by pts
    this.sources = []; // scheduled audio: [{node, startS, endS}]
    this.onDrawn = null; // (meta) => void
    this.stats = { late: 0, reanchors: 0, dropped: 0, drawn: 0 };
  }

  configure({ width, height, rate }) {
    this.rate = rate;
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
    }
  }

  /** Context time at which `ptsUs` plays; anchors or re-anchors the clock as needed. */
  timeFor(ptsUs) {
    const now = this.ctx.currentTime;
    this.newestPtsUs = Math.max(this.newestPtsUs, ptsUs);
    if (this.anchor === null) {
      this.anchor = { ctxTime: now + this.jitterS, ptsUs };
    }
    let t = this.anchor.ctxTime + (ptsUs - this.anchor.ptsUs) / 1e6;
    if (t > now + this.jitterS + REANCHOR_AHEAD_S || t < now - REANCHOR_AHEAD_S) {
      this.anchor = { ctxTime: now + this.jitterS, ptsUs };
      this.stats.reanchors += 1;
      t = this.anchor.ctxTime;
    } else if (t < now) {
      this.anchor.ctxTime += now - t + LATE_MARGIN_S;
      this.stats.late += 1;
      t = now + LATE_MARGIN_S;
    }
    return t;
  }

  /** Received media ahead of what is heard now, seconds (the live jitter buffer). */
  get bufferS() {
    if (this.anchor === null) return 0;
    return Math.max(this.newestPtsUs - this.mediaPtsNow(), 0) / 1e6;
  }

  /** A media frame arrived (before decoding): keep the clock anchored to arrivals. */
  arrived(ptsUs) {
    this.timeFor(ptsUs);
  }

  pushAudio(ptsUs, samples) {
    const when = this.timeFor(ptsUs);
    const buffer = this.ctx.createBuffer(1, samples.length, this.rate);
    buffer.copyToChannel(samples, 0);
    const node = this.ctx.createBufferSource();
    node.buffer = buffer;
    node.connect(this.gain);
    node.start(when);
    const item = { node, endS: when + buffer.duration };
    this.sources.push(item);
    node.onended = () => {
      const i = this.sources.indexOf(item);
      if (i >= 0) this.sources.splice(i, 1);
    };
  }

  /** A decoded picture (VideoFrame or ImageBitmap); the player closes it. */
  pushPicture(ptsUs, picture, meta) {
    const q = this.pictures;
    let i = q.length;
    while (i > 0 && q[i - 1].ptsUs > ptsUs) i--;
    q.splice(i, 0, { ptsUs, picture, meta });
    while (q.length > MAX_QUEUED_PICTURES) {
      q.shift().picture.close();
      this.stats.dropped += 1;
    }
  }

  /** Silence what is scheduled (barge-in): the avatar stops talking at once. */
  muteScheduled() {
    for (const { node } of this.sources) node.stop();
    this.sources = [];
  }

  /** The pts being heard now, from the context's output timestamp. */
  mediaPtsNow() {
    if (this.anchor === null) return -Infinity;
    const ts = this.ctx.getOutputTimestamp ? this.ctx.getOutputTimestamp() : null;
    let heard = this.ctx.currentTime - (this.ctx.outputLatency || 0);
    if (ts && ts.contextTime > 0) {
      heard = ts.contextTime + (performance.now() - ts.performanceTime) / 1000;
    }
    return this.anchor.ptsUs + (heard - this.anchor.ctxTime) * 1e6;
  }

  /** Draw the newest due picture; called on every animation frame. */
  tick() {
    const q = this.pictures;
    if (q.length === 0) return;
    const now = this.mediaPtsNow();
    let due = -1;
    for (let i = 0; i < q.length && q[i].ptsUs <= now; i++) due = i;
    if (due < 0) return;
    for (let i = 0; i < due; i++) {
      q[i].picture.close();
      this.stats.dropped += 1;
    }
    const { picture, meta } = q[due];
    q.splice(0, due + 1);
    this.draw2d.drawImage(picture, 0, 0, this.canvas.width, this.canvas.height);
    picture.close();
    this.stats.drawn += 1;
    if (this.onDrawn) this.onDrawn(meta);
  }

  /** Forget the clock and everything queued (a new session). */
  reset() {
    this.muteScheduled();
    for (const { picture } of this.pictures) picture.close();
    this.pictures = [];
    this.anchor = null;
    this.newestPtsUs = -Infinity;
  }
}
