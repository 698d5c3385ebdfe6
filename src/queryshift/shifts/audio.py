"""Audio query shifts: READ's AudioSet-C / VGGSound-C corruptions plus everyday degradations, severities 1-5.

An audio item is a mono ``float32`` waveform (1-D numpy array) at ``sample_rate`` Hz (16 kHz throughout the
project); every shift returns ``float32`` of the same length, clipped to [-1, 1] where it adds energy.

READ's corruptions (``make_corruptions/make_c_audio.py`` in XLearning-SCU/2024-ICLR-READ):

* ``gaussian_noise``: ``audio + N(0, std)``, std .08/.12/.18/.26/.38 for severities 1-5 (READ's table).
* ``traffic``, ``crowd``, ``rain``, ``thunder``, ``wind``: a noise recording, cut or looped to the clip's
  length from its start, raised by 1/2/4/6/8 dB (pydub ``apply_gain``) and overlaid (pydub ``overlay``).

Further shifts (not in READ), each through a library that has the operation:

* ``reverb``: pedalboard ``Reverb``, room size .3/.5/.7/.85/.95, wet .1/.2/.3/.4/.5, dry .9/.8/.7/.6/.5.
* ``pitch_shift``: pedalboard ``PitchShift`` (Rubber Band) by 1/2/3/4/6 semitones, up or down (one draw).
* ``time_stretch``: pedalboard ``time_stretch`` by 1.06/1.12/1.25/1.4/1.6, faster or slower (one draw); the
  result is cut to the input length, or padded with silence at the end when it came out shorter.
* ``clipping``: audiomentations ``ClippingDistortion``: clips at the 5/10/15/22.5/30th and mirrored
  percentiles (``percentile_threshold`` 10/20/30/45/60).
* ``telephone``: audiomentations ``BandPassFilter`` (24 dB/octave): 300-3400 Hz (the telephone band),
  then 400-3000, 500-2600, 600-2200, 700-1800 Hz.
* ``codec``: Opus (libopus through PyAV, in an Ogg stream in memory) at 24/16/12/8/6 kbit/s, decoded and
  resampled back by FFmpeg (swresample).
* ``dropout``: packet loss: each 20 ms packet is silenced with probability .05/.1/.2/.3/.4 (numpy mask).

Validation shifts (``AUDIO_VALIDATION_SHIFTS``: for choosing hyper-parameters, never in test tables):
``lowpass`` (audiomentations ``LowPassFilter``, cutoff 4000/3000/2000/1500/1000 Hz, 12 dB/octave) and
``bitcrush`` (pedalboard ``Bitcrush``, 6/5/4/3/2 bits).

Deviations from READ, and why:

* Noise recordings. READ overlays five recorded ``.wav`` files (``weather_audios/{traffic,...}.wav``) that are
  not redistributed and not available offline. We synthesise stand-ins with numpy/scipy, once per process and
  sample rate from a fixed seed (like a recording, the same noise for every clip, starting at its beginning):
  rain = dense random clicks (Poisson drops with short decays) through a 1.5-6 kHz band-pass over a soft hiss;
  wind = noise low-passed at 500 Hz with slow (0.2-0.5 Hz) gust modulation; thunder = low (< 150 Hz) brown
  rumble bursts with 20-80 ms attacks and 0.8-2.5 s decays, some with a crack; traffic = an engine hum
  (25-40 Hz fundamental, six harmonics, drifting) under road noise, with passing cars as bell-shaped swells
  of tyre noise; crowd = babble of eight voices, each a pitch-modulated (intonation + vibrato) glottal
  sawtooth plus breath noise, filtered syllable by syllable through three vowel formants (the issue's
  espeak-ng voices would need a Debian package and an installed binary; the formant babble keeps the
  module dependency-free). The recordings' own loudness is unknown, so every stand-in is normalised to an
  RMS of ``NOISE_REFERENCE_RMS`` (-20 dBFS) before READ's 1/2/4/6/8 dB gain.
* Clipping. pydub overlays in 16-bit integers and READ's ``sf.write`` saves Gaussian-noise outputs as 16-bit
  PCM, both of which saturate at full scale; we clip to [-1, 1] in float and do not quantise to 16 bits.
* Randomness. READ draws Gaussian noise from the unseeded global ``np.random``; here every draw comes from the
  query's own ``numpy.random.Generator`` (the engine's ``item_rng``), so a query is the same in every run.
  The library transforms are built with fixed parameters (min == max), so their own global-random draws do
  not change the output.
"""

from __future__ import annotations

import functools
import io

import numpy as np

from . import QueryShift

SAMPLE_RATE = 16000
SEVERITIES = (1, 2, 3, 4, 5)
READ_NOISES = ("traffic", "crowd", "rain", "thunder", "wind")
AUDIO_SHIFTS = ("gaussian_noise",) + READ_NOISES + (
    "reverb", "pitch_shift", "time_stretch", "clipping", "telephone", "codec", "dropout")
AUDIO_VALIDATION_SHIFTS = ("lowpass", "bitcrush")

GAUSSIAN_NOISE_STD = (.08, .12, .18, .26, .38)  # READ's table
NOISE_GAIN_DB = (1, 2, 4, 6, 8)  # READ's apply_gain per severity
NOISE_REFERENCE_RMS = 0.1  # level of the synthetic recordings before READ's gain: -20 dBFS
NOISE_BED_SECONDS = 10.0  # length of the synthetic recordings (looped for longer clips, as READ loops)
_NOISE_SEED = {"traffic": 11, "crowd": 12, "rain": 13, "thunder": 14, "wind": 15}

REVERB = ((.3, .1, .9), (.5, .2, .8), (.7, .3, .7), (.85, .4, .6), (.95, .5, .5))  # room size, wet, dry
PITCH_SEMITONES = (1, 2, 3, 4, 6)
STRETCH_FACTORS = (1.06, 1.12, 1.25, 1.4, 1.6)
CLIPPING_PERCENTILE = (10, 20, 30, 45, 60)
TELEPHONE_BANDS = ((300, 3400), (400, 3000), (500, 2600), (600, 2200), (700, 1800))
CODEC_KBPS = (24, 16, 12, 8, 6)
DROPOUT_RATE = (.05, .1, .2, .3, .4)
DROPOUT_PACKET_SECONDS = 0.02
LOWPASS_HZ = (4000, 3000, 2000, 1500, 1000)
BITCRUSH_BITS = (6, 5, 4, 3, 2)


# -- synthetic stand-ins for READ's noise recordings ---------------------------------------------------------

def _smooth_random(rng: np.random.Generator, n: int, sr: int, rate_hz: float) -> np.ndarray:
    """Standard-normal control signal changing at about ``rate_hz``, linearly interpolated to ``n`` samples."""
    points = max(2, int(np.ceil(n / sr * rate_hz)) + 2)
    return np.interp(np.arange(n), np.linspace(0, n - 1, points), rng.normal(size=points))


def _bandpass(x: np.ndarray, sr: int, low: float | None, high: float | None, order: int = 4) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    nyquist = sr / 2
    high = None if high is None or high >= 0.95 * nyquist else high
    if low and high:
        sos = butter(order, [low, high], btype="bandpass", fs=sr, output="sos")
    elif low:
        sos = butter(order, low, btype="highpass", fs=sr, output="sos")
    elif high:
        sos = butter(order, high, btype="lowpass", fs=sr, output="sos")
    else:
        return x
    return sosfilt(sos, x)


def _rain(rng, n, sr):
    drops = np.zeros(n)
    count = rng.poisson(2500 * n / sr)
    np.add.at(drops, rng.integers(0, n, count), rng.uniform(0.3, 1.0, count) * rng.choice([-1, 1], count))
    decay = np.exp(-np.arange(int(0.002 * sr)) / (0.0004 * sr))  # each drop rings for about a millisecond
    clicks = np.convolve(drops, decay)[:n]
    hiss = 0.3 * rng.normal(size=n)
    return _bandpass(clicks, sr, 1500, 6000) + _bandpass(hiss, sr, 800, 8000)


def _wind(rng, n, sr):
    body = _bandpass(rng.normal(size=n), sr, None, 500)
    whistle = 0.3 * _bandpass(rng.normal(size=n), sr, 300, 900, order=2)
    gusts = np.exp(0.8 * _smooth_random(rng, n, sr, 0.4))  # slow amplitude modulation
    return (body + whistle) * gusts


def _thunder(rng, n, sr):
    brown = np.cumsum(rng.normal(size=n))
    rumble = _bandpass(brown, sr, 20, 150)
    rumble /= np.std(rumble) + 1e-12
    out = 0.1 * rumble  # distant background rumble between the claps
    t = 0.0
    while t < n / sr:
        start = int(t * sr)
        attack, decay = rng.uniform(0.02, 0.08), rng.uniform(0.8, 2.5)
        k = np.arange(n - start) / sr
        envelope = np.minimum(k / attack, 1.0) * np.exp(-np.maximum(k - attack, 0) / decay)
        out[start:] += rng.uniform(0.6, 1.0) * envelope * np.roll(rumble, rng.integers(n))[start:]
        if rng.random() < 0.5:  # a crack at the onset of some claps
            crack = _bandpass(rng.normal(size=n - start), sr, 200, 2000) * np.exp(-k / 0.15)
            out[start:] += 0.5 * crack / (np.std(crack[: int(0.1 * sr)]) + 1e-12)
        t += rng.uniform(1.5, 4.0)
    return out


def _traffic(rng, n, sr):
    t = np.arange(n) / sr
    rpm = 32 * (1 + 0.15 * _smooth_random(rng, n, sr, 0.5))  # engine fundamental drifting around 25-40 Hz
    phase = 2 * np.pi * np.cumsum(rpm) / sr
    hum = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 7))
    road = 2.5 * _bandpass(rng.normal(size=n), sr, None, 300)
    swells = np.zeros(n)
    centre = rng.uniform(0, 1.5)
    tyres = _bandpass(rng.normal(size=n), sr, 300, 2000)
    while centre < n / sr + 1:  # cars passing: bell-shaped swells of tyre noise
        swells += rng.uniform(0.5, 1.5) * np.exp(-0.5 * ((t - centre) / rng.uniform(0.4, 0.9)) ** 2)
        centre += rng.uniform(1.0, 3.0)
    return hum / 2 + road + 0.6 * swells * tyres


_VOWEL_FORMANTS = ((730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410),
                   (300, 870, 2240), (660, 1720, 2410), (490, 1350, 1690))  # a, i, e, o, u, ae, er (Hz)


def _crowd(rng, n, sr):
    from scipy.signal import sawtooth

    out = np.zeros(n)
    for _voice in range(8):
        f0 = rng.uniform(90, 240)
        t = np.arange(n) / sr
        contour = f0 * (1 + 0.12 * _smooth_random(rng, n, sr, 3.0)) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
        source = sawtooth(2 * np.pi * np.cumsum(contour) / sr) + 0.3 * rng.normal(size=n)
        voice = np.zeros(n)
        start = int(rng.uniform(0, 0.3) * sr)
        while start < n:
            length = min(int(rng.uniform(0.12, 0.35) * sr), n - start)
            segment = source[start:start + length]
            formants = _VOWEL_FORMANTS[rng.integers(len(_VOWEL_FORMANTS))]
            sound = sum(_bandpass(segment, sr, 0.85 * f, 1.15 * f, order=2) / (i + 1)
                        for i, f in enumerate(formants) if 1.15 * f < 0.95 * sr / 2)
            voice[start:start + length] += sound * np.hanning(length)
            start += length + int(rng.exponential(0.08) * sr)  # pauses between syllables
        out += voice * rng.uniform(0.5, 1.0)
    return out


_NOISE_MAKERS = {"traffic": _traffic, "crowd": _crowd, "rain": _rain, "thunder": _thunder, "wind": _wind}


@functools.cache
def noise_recording(kind: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The synthetic stand-in for READ's ``<kind>.wav``: ``NOISE_BED_SECONDS`` long, RMS ``NOISE_REFERENCE_RMS``."""
    if kind not in _NOISE_MAKERS:
        raise ValueError(f"unknown noise recording {kind!r}; choose from {', '.join(READ_NOISES)}")
    n = int(NOISE_BED_SECONDS * sample_rate)
    noise = _NOISE_MAKERS[kind](np.random.default_rng(_NOISE_SEED[kind]), n, sample_rate)
    noise = noise - noise.mean()
    noise = noise * (NOISE_REFERENCE_RMS / (np.sqrt(np.mean(noise ** 2)) + 1e-12))
    noise.setflags(write=False)
    return noise.astype(np.float32)


# -- the corruptions -----------------------------------------------------------------------------------------

def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Cut to ``n`` samples, or pad with silence at the end."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    return x[:n] if len(x) >= n else np.concatenate([x, np.zeros(n - len(x), np.float32)])


def _gaussian_noise(x, s, sr, rng):
    return x + rng.normal(0, GAUSSIAN_NOISE_STD[s - 1], size=x.shape)


def _overlay(kind):
    def overlay(x, s, sr, rng):
        recording = noise_recording(kind, sr)
        looped = np.resize(recording, len(x))  # cut, or repeated from its start, as READ does
        return x + looped * 10 ** (NOISE_GAIN_DB[s - 1] / 20)
    overlay.__name__ = kind
    return overlay


def _reverb(x, s, sr, rng):
    from pedalboard import Reverb

    room, wet, dry = REVERB[s - 1]
    return Reverb(room_size=room, wet_level=wet, dry_level=dry)(x, sr)


def _pitch_shift(x, s, sr, rng):
    from pedalboard import PitchShift

    semitones = PITCH_SEMITONES[s - 1] * (1 if rng.random() < 0.5 else -1)
    return PitchShift(semitones=semitones)(x, sr)


def _time_stretch(x, s, sr, rng):
    from pedalboard import time_stretch

    factor = STRETCH_FACTORS[s - 1]
    factor = factor if rng.random() < 0.5 else 1 / factor
    return time_stretch(x[None, :], sr, stretch_factor=factor)[0]


@functools.cache
def _audiomentation(kind: str, s: int):
    import audiomentations as am

    if kind == "clipping":
        p = CLIPPING_PERCENTILE[s - 1]
        return am.ClippingDistortion(min_percentile_threshold=p, max_percentile_threshold=p, p=1.0)
    if kind == "telephone":
        low, high = TELEPHONE_BANDS[s - 1]
        centre, fraction = (low + high) / 2, (high - low) / ((low + high) / 2)
        return am.BandPassFilter(min_center_freq=centre, max_center_freq=centre, min_bandwidth_fraction=fraction,
                                 max_bandwidth_fraction=fraction, min_rolloff=24, max_rolloff=24, p=1.0)
    cutoff = LOWPASS_HZ[s - 1]
    return am.LowPassFilter(min_cutoff_freq=cutoff, max_cutoff_freq=cutoff, min_rolloff=12, max_rolloff=12, p=1.0)


def _clipping(x, s, sr, rng):
    return _audiomentation("clipping", s)(x, sr)


def _telephone(x, s, sr, rng):
    return _audiomentation("telephone", s)(x, sr)


def _lowpass(x, s, sr, rng):
    return _audiomentation("lowpass", s)(x, sr)


def _bitcrush(x, s, sr, rng):
    from pedalboard import Bitcrush

    return Bitcrush(bit_depth=BITCRUSH_BITS[s - 1])(x, sr)


def _codec(x, s, sr, rng):
    import av

    codec_rate = sr if sr in (8000, 12000, 16000, 24000, 48000) else 48000  # the rates Opus codes natively
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=codec_rate, layout="mono")
        stream.bit_rate = CODEC_KBPS[s - 1] * 1000
        to_codec = av.AudioResampler(format="s16", layout="mono", rate=codec_rate)
        fifo = av.AudioFifo()
        source = av.AudioFrame.from_ndarray(
            np.clip(np.rint(x * 32767), -32768, 32767).astype(np.int16)[None, :], format="s16", layout="mono")
        source.sample_rate = sr
        for frame in to_codec.resample(source) + to_codec.resample(None):
            fifo.write(frame)
        frame_size = stream.codec_context.frame_size or 960
        while fifo.samples:
            chunk = fifo.read(min(frame_size, fifo.samples))
            if chunk.samples < frame_size:  # the encoder takes whole frames only: pad the last with silence
                padded = np.zeros((1, frame_size), np.int16)
                padded[:, :chunk.samples] = chunk.to_ndarray()
                chunk = av.AudioFrame.from_ndarray(padded, format="s16", layout="mono")
                chunk.sample_rate = codec_rate
            container.mux(stream.encode(chunk))
        container.mux(stream.encode(None))
    buffer.seek(0)
    decoded = []
    with av.open(buffer, "r") as container:
        back = av.AudioResampler(format="flt", layout="mono", rate=sr)
        for frame in container.decode(audio=0):
            decoded.extend(f.to_ndarray()[0] for f in back.resample(frame))
        decoded.extend(f.to_ndarray()[0] for f in back.resample(None))
    return _fit_length(np.concatenate(decoded) if decoded else np.zeros(0, np.float32), len(x))


def _dropout(x, s, sr, rng):
    packet = max(1, int(DROPOUT_PACKET_SECONDS * sr))
    lost = rng.random(-(-len(x) // packet)) < DROPOUT_RATE[s - 1]
    return x * np.repeat(~lost, packet)[:len(x)]


AUDIO_FUNCTIONS = {
    "gaussian_noise": _gaussian_noise, **{kind: _overlay(kind) for kind in READ_NOISES},
    "reverb": _reverb, "pitch_shift": _pitch_shift, "time_stretch": _time_stretch, "clipping": _clipping,
    "telephone": _telephone, "codec": _codec, "dropout": _dropout, "lowpass": _lowpass, "bitcrush": _bitcrush,
}
ADDS_ENERGY = {"gaussian_noise", *READ_NOISES, "reverb"}  # clipped to full scale afterwards, as 16-bit PCM would


def corrupt_audio(waveform: np.ndarray, name: str, severity: int, rng: np.random.Generator,
                  sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Apply one audio shift to a mono waveform; returns ``float32`` of the same length."""
    _check(name, severity)
    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"{name}: an audio query must be a mono 1-D waveform, got shape {x.shape}")
    if x.size == 0:
        return x.copy()
    out = _fit_length(AUDIO_FUNCTIONS[name](x, severity, sample_rate, rng), len(x))
    return np.clip(out, -1.0, 1.0) if name in ADDS_ENERGY else out


def _check(name: str, severity: int) -> None:
    if name not in AUDIO_FUNCTIONS:
        raise ValueError(f"unknown audio shift {name!r}; choose from "
                         f"{', '.join(AUDIO_SHIFTS + AUDIO_VALIDATION_SHIFTS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"audio shift {name}: severity must be one of 1-5, got {severity!r}")


class AudioShift(QueryShift):
    """One audio shift at one severity, applied to every audio query (a mono float32 waveform)."""

    modality = "audio"

    def __init__(self, shift: str, severity: int, sample_rate: int = SAMPLE_RATE):
        _check(shift, severity)
        self.shift, self.severity, self.sample_rate = shift, severity, sample_rate
        self.name = f"{shift}:{severity}"

    def __call__(self, item, index, position, total, rng):
        return corrupt_audio(item, self.shift, self.severity, rng, self.sample_rate)


def build_audio_shift(name: str, severity: int, sample_rate: int = SAMPLE_RATE) -> AudioShift:
    """The shift ``name`` (one of ``AUDIO_SHIFTS`` or ``AUDIO_VALIDATION_SHIFTS``) at ``severity`` 1-5."""
    return AudioShift(name, severity, sample_rate)
