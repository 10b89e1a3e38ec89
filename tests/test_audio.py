import io
import math
import struct
import time

import numpy as np
import pytest
import soundfile
import torch

import audio
from conftest import click_song


def encoded(samples_at_rate, rate, fmt, subtype=None, channels=2):
    t = np.arange(samples_at_rate) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([tone] * channels, axis=1).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, stereo, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt,subtype", [("OGG", "VORBIS"), ("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("MP3", None)])
def test_load_audio_formats_to_24k_mono(fmt, subtype, tmp_path):
    data = encoded(44100 * 2, 44100, fmt, subtype)
    out = audio.load_audio(data)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 48000) <= 2400           # mp3 encoders add a little padding
    # 440 Hz survives resampling: the strongest FFT bin sits at 440 Hz
    segment = out[4800:28800]
    spectrum = np.abs(np.fft.rfft(segment))
    assert abs(np.argmax(spectrum) * 24000 / len(segment) - 440) <= 2
    path = tmp_path / f"song.{'egg' if fmt == 'OGG' else fmt.lower()}"
    path.write_bytes(data)
    assert np.allclose(audio.load_audio(path), out)
    assert audio.audio_duration_s(data) == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("junk", [b"", b"not audio at all", b"OggS" + bytes(100)])
def test_load_audio_bad_input_names_file(junk, tmp_path):
    with pytest.raises(ValueError, match="broken.egg"):
        audio.load_audio(junk, name="broken.egg")
    path = tmp_path / "broken.egg"
    path.write_bytes(junk)
    with pytest.raises(ValueError, match="broken.egg"):
        audio.load_audio(path)


def wav_with(wav, rate=None, channels=None, data_bytes=None):
    """WAV bytes with header fields overwritten: sample rate (Hz), channel count, data chunk length (bytes)."""
    wav = bytearray(wav)
    fmt, data_chunk = wav.index(b"fmt "), wav.index(b"data")
    for value, offset, code in ((channels, fmt + 10, "<H"), (rate, fmt + 12, "<I"), (data_bytes, data_chunk + 4, "<I")):
        if value is not None:
            struct.pack_into(code, wav, offset, value)
    return bytes(wav)


def flac_with_total_frames(flac, total_frames):
    """FLAC bytes whose STREAMINFO claims `total_frames` (its 36-bit field); the audio data stays as it was."""
    flac = bytearray(flac)
    # STREAMINFO bytes 10..17 = sample rate (20 bits), channels - 1 (3), bits - 1 (5), total frames (36)
    fields = int.from_bytes(flac[18:26], "big")
    flac[18:26] = ((fields >> 36 << 36) | total_frames).to_bytes(8, "big")
    return bytes(flac)


def assert_refused_quickly(data, name, reason, tmp_path):
    """load_audio and audio_duration_s, on bytes and on a file, raise ValueError("<name>: …reason…") in < 2 s."""
    path = tmp_path / name
    path.write_bytes(data)
    for call in (lambda: audio.load_audio(data, name=name), lambda: audio.load_audio(path),
                 lambda: audio.audio_duration_s(data, name=name), lambda: audio.audio_duration_s(path)):
        start_s = time.perf_counter()
        with pytest.raises(ValueError, match=f"{name}: .*{reason}"):
            call()
        assert time.perf_counter() - start_s < 2.0


WAV_2000_FRAMES = encoded(2000, 44100, "WAV", "PCM_16")     # 45 ms of stereo 16-bit at 44.1 kHz


@pytest.mark.parametrize("data,reason", [
    (wav_with(WAV_2000_FRAMES, rate=1), "sample rate 1 Hz is outside 8000..384000 Hz"),
    (wav_with(WAV_2000_FRAMES, rate=1_000_000), "sample rate 1000000 Hz"),
    (wav_with(WAV_2000_FRAMES, channels=1000), "1000 channels, outside 1..8"),
    (flac_with_total_frames(encoded(44100, 44100, "FLAC", "PCM_16"), 2 ** 36 - 1),   # 433 hours
     "more than MAX_DURATION_S = 3600 s"),
    (flac_with_total_frames(encoded(44100, 44100, "FLAC", "PCM_16"), int(audio.MAX_DURATION_S * 44100) + 1),
     "MAX_DURATION_S"),
])
def test_header_outside_the_limits_is_refused_before_decoding(data, reason, tmp_path):
    """At 1 Hz, 2,000 frames would be resampled to 48 million samples at 24 kHz; a FLAC header may claim any length."""
    assert_refused_quickly(data, "hostile.wav", reason, tmp_path)


@pytest.mark.parametrize("rate", [24000, 44100])          # the file's own rate, and one that is resampled
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_samples_are_refused(rate, bad, tmp_path):
    stereo = np.full((rate, 2), 0.1, dtype=np.float32)
    good = io.BytesIO()
    soundfile.write(good, stereo, rate, format="WAV", subtype="FLOAT")
    assert len(audio.load_audio(good.getvalue())) == 24000
    stereo[rate // 4, 1] = bad
    hostile = io.BytesIO()
    soundfile.write(hostile, stereo, rate, format="WAV", subtype="FLOAT")
    with pytest.raises(ValueError, match=r"nan.wav: sample at 0\.250 s is NaN or infinite"):
        audio.load_audio(hostile.getvalue(), name="nan.wav")


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"),
                                         ("MP3", None)])
def test_damaged_files_decode_or_raise_valueerror_naming_the_file(fmt, subtype):
    """Truncated at 24 points, 40 copies with 3 random header bytes changed (seed 0), and for WAV a data chunk that
    claims 4 GB: each load either gives finite mono audio or raises ValueError naming the file, within 2 s."""
    whole = encoded(44100, 44100, fmt, subtype)
    rng = np.random.default_rng(0)
    damaged = [whole[:n] for n in np.linspace(0, len(whole) - 1, 24).astype(int)]
    for _ in range(40):
        copy = bytearray(whole)
        for position in rng.integers(0, min(len(whole), 2048), 3):
            copy[position] = rng.integers(0, 256)
        damaged.append(bytes(copy))
    if fmt == "WAV":
        damaged += [wav_with(whole, data_bytes=0xFFFFFFF0), wav_with(whole[:len(whole) // 2], data_bytes=len(whole))]
    for data in damaged:
        start_s = time.perf_counter()
        try:
            out = audio.load_audio(data, name="damaged.bin")
            assert out.dtype == np.float32 and out.ndim == 1 and np.isfinite(out).all()
            assert len(out) <= 24000 + 2400
            audio.audio_duration_s(data, name="damaged.bin")
        except ValueError as e:
            assert str(e).startswith("damaged.bin: ")
        assert time.perf_counter() - start_s < 2.0


def test_tokenizer_shapes_frame_rate_and_frame_count(encodec):
    assert encodec.sample_rate == 24000 and encodec.frame_rate == 75.0 and encodec.n_codebooks == 2
    for n_samples in (1, 319, 320, 321, 24000, 24001):
        codes = encodec.encode(torch.randn(1, n_samples) * 0.1)
        assert codes.shape == (math.ceil(n_samples / 320), 2)
        assert codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < 1024
    decoded = encodec.decode(codes)
    assert decoded.shape == (1, codes.shape[0] * 320)


def test_long_audio_is_encoded_in_segments_with_exact_frame_count(encodec):
    n_samples = int(audio.ENCODE_SEGMENT_S * 24000) + 24000 * 3 + 17     # crosses a segment boundary
    song = torch.from_numpy(click_song(n_samples / 24000, np.arange(0.25, n_samples / 24000, 0.5)))[None]
    codes = encodec.encode(song)
    assert codes.shape == (math.ceil(n_samples / 320), 2)
    # codes vary (the fixture's codebooks are usable) and clicks change them
    assert len(set(codes[:, 0].tolist())) > 5


def test_identity_depends_on_weights_and_bandwidth():
    from conftest import tiny_encodec_model
    a = audio.create_audio_tokenizer(model=tiny_encodec_model(0), device="cpu")
    b = audio.create_audio_tokenizer(model=tiny_encodec_model(1), device="cpu")
    c = audio.create_audio_tokenizer(bandwidth=3.0, model=tiny_encodec_model(0), device="cpu")
    assert a.identity == audio.create_audio_tokenizer(model=tiny_encodec_model(0), device="cpu").identity
    assert len({a.identity, b.identity, c.identity}) == 3
    assert c.n_codebooks == 4
    with pytest.raises(ValueError, match="bandwidth"):
        audio.create_audio_tokenizer(bandwidth=2.0, model=tiny_encodec_model(0), device="cpu")


def test_local_model_folder_loads(tmp_path):
    from conftest import tiny_encodec_model
    tiny_encodec_model(0).save_pretrained(tmp_path / "enc")
    tok = audio.create_audio_tokenizer(model=str(tmp_path / "enc"), device="cpu")
    ref = audio.create_audio_tokenizer(model=tiny_encodec_model(0), device="cpu")
    x = torch.from_numpy(click_song(1.0, [0.2, 0.6]))[None]
    assert torch.equal(tok.encode(x), ref.encode(x))
