// Video decoding: H.264 with WebCodecs, JPEG with createImageBitmap.
//
// Both decoders take one wire payload at a time and hand decoded pictures
// (VideoFrame or ImageBitmap, both drawable and closable) to `onPicture` with
// the frame's metadata. H.264 payloads are Annex-B access units with SPS/PPS
// in-band before every keyframe, so the decoder is configured from the first
// keyframe's SPS and needs no `description`.

const NAL_SPS = 7;
// The probe asks for Constrained Baseline level 3.1: what libx264's ultrafast
// preset produces at the avatar sizes the server sends.
const PROBE_CODEC = "avc1.42E01F";

/** Which codec to ask for: {codec, reason}. `wanted` is "auto", "h264" or "jpeg". */
export async function chooseCodec(wanted) {
  if (wanted === "jpeg") return { codec: "jpeg", reason: "asked for JPEG" };
  let reason;
  if (typeof VideoDecoder !== "function") {
    reason = window.isSecureContext
      ? "this browser has no WebCodecs"
      : "WebCodecs needs a secure context (https or localhost)";
  } else {
    const probe = await VideoDecoder.isConfigSupported({ codec: PROBE_CODEC, optimizeForLatency: true });
    if (probe.supported) return { codec: "h264", reason: "WebCodecs H.264" };
    reason = "this browser's WebCodecs cannot decode H.264";
  }
  if (wanted === "h264") throw new Error(`H.264 was asked for, but ${reason}`);
  return { codec: "jpeg", reason };
}

export function createDecoder(codec, onPicture, onError) {
  if (codec === "h264") return new H264Decoder(onPicture, onError);
  if (codec === "jpeg") return new JpegDecoder(onPicture, onError);
  throw new Error(`no decoder for codec ${codec}`);
}

/** NAL units of an Annex-B byte string, as subarrays starting at the NAL header. */
export function nalUnits(data) {
  const starts = [];
  for (let i = 0; i + 2 < data.length; i++) {
    if (data[i] === 0 && data[i + 1] === 0 && data[i + 2] === 1) {
      starts.push(i + 3);
      i += 2;
    }
  }
  return starts.map((s, k) => data.subarray(s, k + 1 < starts.length ? starts[k + 1] - 3 : data.length));
}

/** RFC 6381 codec string (avc1.PPCCLL) from an SPS NAL unit. */
export function avcCodecString(sps) {
  const hex = (b) => b.toString(16).padStart(2, "0").toUpperCase();
  return `avc1.${hex(sps[1])}${hex(sps[2])}${hex(sps[3])}`;
}

class H264Decoder {
  constructor(onPicture, onError) {
    this.onPicture = onPicture;
    this.onError = onError;
    this.meta = new Map(); // pts -> metadata of frames in the decoder
    this.decoder = null;
    this.codecString = null;
    this.waitingForKey = true;
    this.skipped = 0; // delta frames before the first keyframe
  }

  _open(codecString) {
    this.decoder = new VideoDecoder({
      output: (frame) => {
        const meta = this.meta.get(frame.timestamp);
        this.meta.delete(frame.timestamp);
        this.onPicture(frame.timestamp, frame, meta);
      },
      error: (e) => {
        // The decoder is closed now; start again at the next keyframe.
        this.decoder = null;
        this.waitingForKey = true;
        this.meta.clear();
        this.onError(new Error(`H.264 decoder: ${e.message}`));
      },
    });
    this.decoder.configure({ codec: codecString, optimizeForLatency: true });
    this.codecString = codecString;
  }

  decode(payload, ptsUs, keyframe, meta) {
    if (keyframe) {
      const sps = nalUnits(payload).find((n) => (n[0] & 0x1f) === NAL_SPS);
      if (!sps) throw new Error("H.264 keyframe without SPS (the protocol puts SPS/PPS before every keyframe)");
      const codecString = avcCodecString(sps);
      if (this.decoder === null || codecString !== this.codecString) {
        if (this.decoder !== null) this.decoder.close();
        this._open(codecString);
      }
      this.waitingForKey = false;
    } else if (this.waitingForKey) {
      this.skipped += 1;
      return;
    }
    this.meta.set(ptsUs, meta);
    // The payload's buffer is the whole WebSocket message; the chunk copies it.
    this.decoder.decode(new EncodedVideoChunk({
      type: keyframe ? "key" : "delta", timestamp: ptsUs, data: payload,
    }));
  }

  close() {
    if (this.decoder !== null && this.decoder.state !== "closed") this.decoder.close();
    this.decoder = null;
  }
}

class JpegDecoder {
  constructor(onPicture, onError) {
    this.onPicture = onPicture;
    this.onError = onError;
    this.closed = false;
    this.skipped = 0;
  }

  decode(payload, ptsUs, _keyframe, meta) {
    createImageBitmap(new Blob([payload], { type: "image/jpeg" })).then(
      (bitmap) => {
        if (this.closed) bitmap.close();
        else this.onPicture(ptsUs, bitmap, meta);
      },
      (e) => this.onError(new Error(`JPEG decode: ${e.message}`)),
    );
  }

  close() {
    this.closed = true;
  }
}
