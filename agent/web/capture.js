// Audio in: the microphone as 20 ms frames, and audio files decoded to mono.
// Both come out at the AudioContext's rate, which the page chose to be the
// session's protocol rate, so the browser does all resampling.

const WORKLET_URL = "/web/capture-worklet.js";

export class Microphone {
  constructor(ctx, frameSamples, onFrame) {
    this.ctx = ctx;
    this.frameSamples = frameSamples;
    this.onFrame = onFrame;
    this.stream = null;
    this.nodes = [];
  }

  get active() {
    return this.stream !== null;
  }

  async start() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("no microphone access here: browsers allow it only on https or localhost");
    }
    // Echo cancellation keeps the avatar's own voice out of the microphone.
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    await this.ctx.audioWorklet.addModule(WORKLET_URL);
    const source = this.ctx.createMediaStreamSource(this.stream);
    const node = new AudioWorkletNode(this.ctx, "capture", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { frameSamples: this.frameSamples },
    });
    node.port.onmessage = (ev) => this.onFrame(ev.data);
    source.connect(node);
    // Connected so that the graph pulls it; its output is silence.
    node.connect(this.ctx.destination);
    this.nodes = [source, node];
  }

  stop() {
    for (const n of this.nodes) n.disconnect();
    this.nodes = [];
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    this.stream = null;
  }
}

/** A dropped or chosen file as mono samples at the context's rate. */
export async function decodeAudioFile(ctx, file) {
  let audio;
  try {
    audio = await ctx.decodeAudioData(await file.arrayBuffer());
  } catch (e) {
    throw new Error(`${file.name}: not an audio file this browser can decode (${e.message})`);
  }
  const mono = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const data = audio.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += data[i] / audio.numberOfChannels;
  }
  return mono;
}

/** Cut samples into frames of `size`; the last one is padded with silence. */
export function toFrames(samples, size) {
  const frames = [];
  for (let start = 0; start < samples.length; start += size) {
    const frame = new Float32Array(size);
    frame.set(samples.subarray(start, Math.min(start + size, samples.length)));
    frames.push(frame);
  }
  return frames;
}
