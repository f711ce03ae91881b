"""A small bank of speech clips that simulated users speak, made once per machine.

With espeak-ng installed the clips are real synthetic speech (several voices
and speaking rates), cached as WAV files; otherwise they are speech-like
audio: voiced harmonics with syllable-rate envelopes and pauses. A turn
joins clips with short pauses until it is long enough.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from agent.client import read_wav
from media.audio import StreamResampler

SpeechSource = Literal["auto", "espeak", "synthetic"]

# Replies of a voice assistant, roughly 1 to 6 seconds each when spoken.
SENTENCES = (
    "Sure.",
    "Hello there, how can I help you today?",
    "Let me check that for you.",
    "Your appointment is confirmed for Tuesday at three in the afternoon.",
    "I found two flights that leave tomorrow morning, one at seven and one at nine thirty.",
    "That is a great question.",
    "The weather in Lisbon will be sunny with a high of twenty four degrees.",
    "I am sorry, I did not catch that. Could you say it again?",
    "Your order has shipped and should arrive by Friday.",
    "Here is what I found about the museum opening hours on weekends and holidays.",
    "Okay, done.",
    "To reset your password, open the settings page and choose security, then follow the "
    "link we send to your email address.",
    "The total comes to forty two dollars and fifty cents.",
    "Would you like me to book a table for two at seven?",
    "I have added milk, eggs and bread to your shopping list.",
    "The meeting has been moved to the small conference room on the third floor.",
)
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3", "en-us+f2")
SPEEDS = (150, 165, 180)  # words per minute


@dataclass(frozen=True, slots=True)
class Utterance:
    samples: np.ndarray  # (N,) float32 mono at the bank's rate
    text: str


class SpeechBank:
    def __init__(self, clips: list[Utterance], rate: int, source: str) -> None:
        if not clips:
            raise ValueError("a speech bank needs at least one clip")
        self.clips = clips
        self.rate = rate
        self.source = source  # "espeak-ng" or "synthetic"

    @classmethod
    def build(cls, rate: int, source: SpeechSource, cache_dir: Path, seed: int = 0
              ) -> SpeechBank:
        espeak = shutil.which("espeak-ng")
        if source == "espeak" and espeak is None:
            raise ValueError("--speech espeak: espeak-ng is not installed "
                             "(apt-get install espeak-ng), or use --speech synthetic")
        if espeak is not None and source != "synthetic":
            return cls(_espeak_clips(espeak, rate, cache_dir), rate, "espeak-ng")
        return cls(_synthetic_clips(rate, seed), rate, "synthetic")

    def utterance(self, rng: np.random.Generator, seconds: float) -> Utterance:
        """Random clips joined by 150-400 ms pauses until `seconds` is reached; the
        last clip is cut there so that turn lengths follow the plan."""
        parts: list[np.ndarray] = []
        texts: list[str] = []
        total = 0
        want = int(seconds * self.rate)
        while total < want:
            clip = self.clips[int(rng.integers(len(self.clips)))]
            if parts:
                pause = np.zeros(int(rng.uniform(0.15, 0.4) * self.rate), np.float32)
                parts.append(pause)
                total += len(pause)
            parts.append(clip.samples)
            texts.append(clip.text)
            total += len(clip.samples)
        samples = np.concatenate(parts)[:want]
        return Utterance(samples, " ".join(texts))


def _espeak_clips(espeak: str, rate: int, cache_dir: Path) -> list[Utterance]:
    version = subprocess.run([espeak, "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    cache_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, text in enumerate(SENTENCES):
        voice, speed = VOICES[i % len(VOICES)], SPEEDS[i % len(SPEEDS)]
        key = hashlib.sha1(f"{version}|{voice}|{speed}|{text}".encode()).hexdigest()[:16]
        path = cache_dir / f"{key}.wav"
        if not path.exists():
            tmp = path.with_suffix(".tmp.wav")
            subprocess.run([espeak, "-v", voice, "-s", str(speed), "-w", str(tmp), text],
                           check=True, capture_output=True)
            tmp.replace(path)  # atomic: concurrent runs never read half a file
        samples, wav_rate = read_wav(path)
        clips.append(Utterance(_resample(samples, wav_rate, rate), text))
    return clips


def _resample(samples: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    rs = StreamResampler(in_rate, out_rate)
    return np.concatenate([rs.push(samples.astype(np.float32)), rs.flush()])


def _synthetic_clips(rate: int, seed: int) -> list[Utterance]:
    rng = np.random.default_rng(seed)
    return [Utterance(_speech_like(float(rng.uniform(0.8, 5.0)), rate, rng), "(synthetic)")
            for _ in range(len(SENTENCES))]


def _speech_like(seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Voiced harmonics under a syllable-rate envelope, with word gaps and a
    drifting pitch: loud and quiet stretches at speech rhythm."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * math.pi * rng.uniform(0.3, 1.0) * t))
    phase = 2 * math.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = np.clip(np.sin(2 * math.pi * rng.uniform(3.0, 6.0) * t), 0, None) ** 0.5
    words = (np.sin(2 * math.pi * rng.uniform(0.5, 1.2) * t + rng.uniform(0, 6)) > -0.7)
    noise = rng.normal(0, 0.05, len(t))
    out = (0.5 * voiced + noise) * syllables * words
    return (0.6 * out).astype(np.float32)
