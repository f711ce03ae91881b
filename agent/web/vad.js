// Voice activity detection over 20 ms frames, a pure state machine: frames in,
// events out; time is the frame count. No audio nodes, no timers.
//
// Energy against a noise floor: the quietest frame of the last 3 s outside
// speech (speech has pauses, background noise has none). Speech starts when
// enough recent frames are loud, and the turn then begins `prerollFrames` earlier, so
// the first syllable is not clipped. It ends after `hangoverFrames` quiet
// frames: long enough to bridge the pauses between syllables and words. While
// the avatar speaks (`strict`), onset needs a louder and longer sound, so that
// the avatar's voice leaking back into the microphone does not barge in.

export const VAD_DEFAULTS = Object.freeze({
  onsetDb: 12, // above the noise floor
  strictExtraDb: 8, // more while the avatar speaks
  minDbfs: -55, // never call quieter frames speech
  // Onset: this many loud frames among the last `onsetWindow`; syllables are
  // 100-250 ms of voice with short gaps, clicks and knocks are shorter.
  onsetFrames: 3, // 60 ms of voice within 100 ms
  onsetWindow: 5,
  strictOnsetFrames: 8, // 160 ms of voice within 400 ms
  strictOnsetWindow: 20,
  hangoverFrames: 30, // 600 ms
  prerollFrames: 20, // 400 ms: covers the longest onset window
  maxFrames: 1500, // 30 s: one utterance per turn, well below the server's turn limit
  floorFrames: 150, // 3 s of non-speech frames make up the noise floor
});

export function frameDbfs(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  return 10 * Math.log10(sum / Math.max(samples.length, 1) + 1e-12);
}

export class Vad {
  constructor(options = {}) {
    this.opt = { ...VAD_DEFAULTS, ...options };
    this.floorWindow = []; // dBFS of recent frames outside speech
    this.speaking = false;
    this.loud = []; // loud flags of recent frames outside speech
    this.quietRun = 0;
    this.length = 0; // frames in the current utterance
    this.ring = []; // recent frames while silent (pre-roll)
    this.level = -120;
  }

  get floor() {
    return this.floorWindow.length ? Math.min(...this.floorWindow) : -120;
  }

  threshold(strict) {
    const o = this.opt;
    return Math.max(this.floor + o.onsetDb + (strict ? o.strictExtraDb : 0), o.minDbfs);
  }

  /**
   * One 20 ms frame. `strict`: the avatar is speaking.
   * Returns events: {type: "start", frames} (pre-roll including this frame),
   * {type: "audio", frames: [frame]}, {type: "end", reason}.
   */
  push(frame, strict = false) {
    const o = this.opt;
    const db = frameDbfs(frame);
    this.level = db;
    if (!this.speaking) {
      this.ring.push(frame);
      if (this.ring.length > o.prerollFrames) this.ring.shift();
      this.floorWindow.push(db);
      if (this.floorWindow.length > o.floorFrames) this.floorWindow.shift();
      this.loud.push(db > this.threshold(strict));
      if (this.loud.length > o.strictOnsetWindow) this.loud.shift();
      const recent = this.loud.slice(-(strict ? o.strictOnsetWindow : o.onsetWindow));
      const loudFrames = recent.filter(Boolean).length;
      if (loudFrames >= (strict ? o.strictOnsetFrames : o.onsetFrames)) {
        const frames = this.ring;
        this.ring = [];
        this.speaking = true;
        this.quietRun = 0;
        this.length = frames.length;
        return [{ type: "start", frames }];
      }
      return [];
    }
    this.length += 1;
    // Hysteresis: staying in speech takes 4 dB less than entering it.
    this.quietRun = db > this.threshold(false) - 4 ? 0 : this.quietRun + 1;
    const events = [{ type: "audio", frames: [frame] }];
    if (this.quietRun >= o.hangoverFrames || this.length >= o.maxFrames) {
      events.push({ type: "end", reason: this.length >= o.maxFrames ? "max_length" : "silence" });
      this.reset();
    }
    return events;
  }

  /** Forget the current utterance (after an interrupt); the floor is kept. */
  reset() {
    this.speaking = false;
    this.loud = [];
    this.quietRun = 0;
    this.length = 0;
    this.ring = [];
  }
}
