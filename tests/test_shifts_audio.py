"""Audio shifts: READ's noise table and gains, determinism, severity ordering, length/dtype, clear errors."""

import numpy as np
import pytest

pytest.importorskip("pedalboard")
pytest.importorskip("audiomentations")
pytest.importorskip("av")

from queryshift.shifts import item_rng  # noqa: E402
from queryshift.shifts.audio import (  # noqa: E402
    AUDIO_SHIFTS,
    AUDIO_VALIDATION_SHIFTS,
    NOISE_REFERENCE_RMS,
    READ_NOISES,
    SAMPLE_RATE,
    build_audio_shift,
    corrupt_audio,
    noise_recording,
)

ALL = AUDIO_SHIFTS + AUDIO_VALIDATION_SHIFTS
RANDOM_SHIFTS = ("gaussian_noise", "pitch_shift", "time_stretch", "dropout")


def _tone(seconds=1.0, amplitude=0.3, onset=0.0):
    """A 220 Hz harmonic tone with a 3 Hz tremolo, silent before ``onset`` seconds."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in range(1, 6)) * (0.7 + 0.3 * np.sin(2 * np.pi * 3 * t))
    wave = wave / np.abs(wave).max() * amplitude
    return np.where(t >= onset, wave, 0).astype(np.float32)


def _apply(name, severity, x, seed=0, index=0):
    return build_audio_shift(name, severity)(x, index, 0, 1, item_rng(seed, index))


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def _band_energy(x, low, high):
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def test_catalogue_has_at_least_ten_test_shifts_apart_from_validation():
    assert len(AUDIO_SHIFTS) >= 10
    assert not set(AUDIO_SHIFTS) & set(AUDIO_VALIDATION_SHIFTS)
    assert {"gaussian_noise", *READ_NOISES} <= set(AUDIO_SHIFTS)


@pytest.mark.parametrize("name", ALL)
def test_every_severity_keeps_length_and_float32(name):
    x = _tone(seconds=0.77)  # not a whole number of codec frames or dropout packets
    for severity in range(1, 6):
        out = _apply(name, severity, x)
        assert out.dtype == np.float32 and out.shape == x.shape, (name, severity, out.dtype, out.shape)
        assert np.isfinite(out).all() and np.abs(out).max() <= 1.0, (name, severity)


@pytest.mark.parametrize("name", ALL)
def test_same_rng_gives_identical_audio(name):
    x = _tone()
    np.testing.assert_array_equal(_apply(name, 3, x, seed=5, index=9), _apply(name, 3, x, seed=5, index=9))


@pytest.mark.parametrize("name", RANDOM_SHIFTS)
def test_other_queries_get_other_draws(name):
    x = _tone()
    outs = [_apply(name, 5, x, seed=0, index=i) for i in range(4)]
    assert any(not np.array_equal(outs[0], other) for other in outs[1:]), name


@pytest.mark.parametrize("severity,std", [(1, .08), (2, .12), (3, .18), (4, .26), (5, .38)])
def test_gaussian_noise_std_is_reads_table(severity, std):
    silence = np.zeros(4 * SAMPLE_RATE, np.float32)
    noise = _apply("gaussian_noise", severity, silence)
    # clipping at full scale trims about 1% off the std at severity 5
    assert np.std(noise) == pytest.approx(std, rel=0.03)
    assert abs(np.mean(noise)) < 0.01


@pytest.mark.parametrize("name", READ_NOISES)
def test_environmental_noise_gains_are_reads_1_2_4_6_8_db(name):
    x = _tone(amplitude=0.05)  # quiet, so nothing clips and the added noise is exactly the scaled recording
    added = [np.sqrt(np.mean((_apply(name, s, x) - x) ** 2)) for s in range(1, 6)]
    recording = noise_recording(name)[:len(x)]  # overlaid from its start, as READ does
    gains_db = 20 * np.log10(np.array(added) / np.sqrt(np.mean(recording.astype(float) ** 2)))
    np.testing.assert_allclose(gains_db, [1, 2, 4, 6, 8], atol=0.05)


@pytest.mark.parametrize("name", ("gaussian_noise",) + READ_NOISES + ("reverb", "clipping", "dropout", "lowpass"))
def test_correlation_with_clean_falls_with_severity(name):
    x = _tone()
    corrs = [_corr(x, _apply(name, s, x)) for s in range(1, 6)]
    assert all(a > b for a, b in zip(corrs, corrs[1:])), (name, corrs)


@pytest.mark.parametrize("name", ("codec", "bitcrush"))
def test_severity_five_changes_more_than_severity_one(name):
    x = _tone()
    errors = [np.mean((_apply(name, s, x) - x) ** 2) for s in (1, 5)]
    assert errors[1] > errors[0], (name, errors)


def test_telephone_band_narrows_with_severity():
    x = _tone()  # harmonics at 220-1100 Hz: the narrower band keeps less of them
    kept = [np.sum(_apply("telephone", s, x).astype(float) ** 2) for s in range(1, 6)]
    assert all(a > b for a, b in zip(kept, kept[1:])), kept


def test_codec_output_is_aligned_with_its_input():
    x = _tone()
    assert _corr(x, _apply("codec", 1, x)) > 0.95  # a delayed decode would decorrelate a 220 Hz tone


def test_telephone_keeps_the_voice_band_and_cuts_the_rest():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    x = (0.2 * (np.sin(2 * np.pi * 100 * t) + np.sin(2 * np.pi * 1000 * t) + np.sin(2 * np.pi * 6000 * t)))
    out = _apply("telephone", 1, x.astype(np.float32))
    assert _band_energy(out, 900, 1100) > 0.5 * _band_energy(x, 900, 1100)
    assert _band_energy(out, 50, 150) < 0.05 * _band_energy(x, 50, 150)
    assert _band_energy(out, 5500, 6500) < 0.05 * _band_energy(x, 5500, 6500)


def test_pitch_shift_moves_the_fundamental_by_the_severity_in_semitones():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for severity, semitones in ((1, 1), (5, 6)):
        out = _apply("pitch_shift", severity, x)
        peak = np.fft.rfftfreq(len(out), 1 / SAMPLE_RATE)[np.argmax(np.abs(np.fft.rfft(out)))]
        assert abs(12 * np.log2(peak / 440)) == pytest.approx(semitones, abs=0.15), (severity, peak)


def test_time_stretch_moves_an_onset_further_at_higher_severity():
    x = _tone(onset=0.3)
    onsets = []
    for severity in (1, 5):
        out = _apply("time_stretch", severity, x)
        onsets.append(np.argmax(np.abs(out) > 0.05) / SAMPLE_RATE)
    moves = [abs(onset - 0.3) for onset in onsets]
    assert 0.3 * 0.03 < moves[0] < moves[1], onsets


def test_dropout_silences_about_the_severity_rate_of_20ms_packets():
    x = np.full(20 * SAMPLE_RATE, 0.5, np.float32)
    out = _apply("dropout", 5, x)
    packets = out.reshape(-1, SAMPLE_RATE // 50)
    silent = (packets == 0).all(axis=1)
    assert ((packets == 0) | (packets == 0.5)).all() and (silent | (packets == 0.5).all(axis=1)).all()
    assert silent.mean() == pytest.approx(0.4, abs=0.05)


def test_noise_recordings_sound_like_their_names():
    def low_share(kind):  # share of the energy below 500 Hz
        noise = noise_recording(kind)
        return _band_energy(noise, 0, 500) / _band_energy(noise, 0, SAMPLE_RATE / 2)

    for kind in READ_NOISES:
        assert np.sqrt(np.mean(noise_recording(kind) ** 2)) == pytest.approx(NOISE_REFERENCE_RMS, rel=1e-3)
    assert low_share("rain") < 0.1  # high band-passed clicks
    for kind in ("wind", "thunder", "traffic"):
        assert low_share(kind) > 0.5, kind
    crowd = noise_recording("crowd")
    speech_share = _band_energy(crowd, 200, 3500) / _band_energy(crowd, 0, SAMPLE_RATE / 2)
    assert speech_share > 0.8
    assert len({noise_recording(kind).tobytes() for kind in READ_NOISES}) == len(READ_NOISES)


def test_bad_name_severity_and_shape_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown audio shift 'hail'.*gaussian_noise.*traffic"):
        build_audio_shift("hail", 3)
    with pytest.raises(ValueError, match="wind: severity must be one of 1-5, got 6"):
        build_audio_shift("wind", 6)
    with pytest.raises(ValueError, match="mono 1-D waveform"):
        corrupt_audio(np.zeros((2, 100), np.float32), "wind", 1, item_rng(0, 0))


def test_shift_declares_its_name_and_modality():
    shift = build_audio_shift("traffic", 5)
    assert (shift.name, shift.modality) == ("traffic:5", "audio")
