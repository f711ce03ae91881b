// Wire format of PROTOCOL.md version 1, pure code: the 16-byte media header and
// the client messages. No sockets, no DOM.

export const PROTOCOL_VERSION = 1;
export const HEADER_SIZE = 16;
export const SUPPORTED_AUDIO_RATES = [16000, 22050, 24000, 44100, 48000];
export const KIND_VIDEO = 1;
export const KIND_AUDIO = 2;
export const FLAG_KEYFRAME = 1;
export const FLAG_SPEECH = 2;
export const FLAG_LAST_OF_TURN = 4;
export const FLAG_CONFIG_ONLY = 8;
// Client audio goes out in 20 ms frames: every accepted rate divides into
// whole 20 ms frames (rate / 50 samples).
export const FRAME_MS = 20;

/** Split a binary frame into its header fields and payload; throws on a malformed one. */
export function unpackMedia(buffer) {
  if (buffer.byteLength < HEADER_SIZE) {
    throw new Error(`binary frame of ${buffer.byteLength} bytes is shorter than the header`);
  }
  const view = new DataView(buffer);
  const kind = view.getUint8(0);
  if (kind !== KIND_VIDEO && kind !== KIND_AUDIO) {
    throw new Error(`unknown media kind ${kind} in binary header`);
  }
  const flags = view.getUint8(1);
  return {
    kind,
    flags,
    keyframe: (flags & FLAG_KEYFRAME) !== 0,
    speech: (flags & FLAG_SPEECH) !== 0,
    lastOfTurn: (flags & FLAG_LAST_OF_TURN) !== 0,
    configOnly: (flags & FLAG_CONFIG_ONLY) !== 0,
    tier: view.getUint8(2),
    seq: view.getUint32(4),
    // uint64 microseconds; exact as a Number for 285 years of session time.
    ptsUs: Number(view.getBigUint64(8)),
    payload: new Uint8Array(buffer, HEADER_SIZE),
  };
}

/** One client audio frame: header (kind 2, tier 0, pts 0) and PCM s16le mono. */
export function packAudio(seq, samples) {
  const out = new ArrayBuffer(HEADER_SIZE + 2 * samples.length);
  const view = new DataView(out);
  view.setUint8(0, KIND_AUDIO);
  view.setUint32(4, seq >>> 0);
  view.setBigUint64(8, 0n);
  for (let i = 0; i < samples.length; i++) {
    // Same scaling as the server's pcm16 codec: x 32768, clipped, not wrapped.
    const v = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32768)));
    view.setInt16(HEADER_SIZE + 2 * i, v, true);
  }
  return out;
}

/** PCM s16le bytes to float samples in [-1, 1). */
export function pcm16ToFloat(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(bytes.byteLength >> 1);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

export function frameSamples(rate) {
  if (!SUPPORTED_AUDIO_RATES.includes(rate)) {
    throw new Error(`audio rate ${rate} is not one of ${SUPPORTED_AUDIO_RATES.join(", ")}`);
  }
  return (rate * FRAME_MS) / 1000;
}

export function helloMessage({ avatar, token, codec, rate, resume }) {
  const msg = { type: "hello", v: PROTOCOL_VERSION, video: { codec }, audio: { rate } };
  if (avatar) msg.avatar = avatar;
  if (token) msg.token = token;
  if (resume) msg.resume = resume;
  return msg;
}
