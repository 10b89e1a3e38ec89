"""Shared test fixtures: a tiny random Encodec with usable codebooks, synthetic click songs, map zips built in tmp."""

import functools
import http.server
import io
import json
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

SAMPLE_RATE = 24000


def tiny_encodec_model(seed=0):
    """A small random transformers EncodecModel (24 kHz, hop 320 → 75 frames/s) whose codebooks give varied codes."""
    from transformers import EncodecConfig
    return random_encodec_model(EncodecConfig(num_filters=8, hidden_size=32, codebook_dim=32, num_residual_layers=1,
                                              num_lstm_layers=1), seed)


def random_encodec_model(config, seed=0):
    """A random transformers EncodecModel of this config whose codebooks give varied codes.

    A random EncodecModel has all-zero codebooks (every code 0). Codebook k is drawn from the statistics of its
    own input — the residual left after codebooks < k — measured on noise and clicks.
    """
    from transformers import EncodecModel
    torch.manual_seed(seed)
    model = EncodecModel(config).eval()
    rng = np.random.default_rng(seed)
    probe = rng.normal(0, 0.1, SAMPLE_RATE * 4).astype(np.float32)
    probe[:: SAMPLE_RATE // 8] += 0.9
    with torch.no_grad():
        # residual = (frames, codebook_dim) encoder output, minus what earlier codebooks explain
        residual = model.encoder(torch.from_numpy(probe)[None, None])[0].T
        for layer in model.quantizer.layers:
            embed = residual.mean(0) + residual.std(0) * torch.randn(config.codebook_size, residual.shape[1])
            layer.codebook.embed.copy_(embed)
            layer.codebook.embed_avg.copy_(embed)
            residual = residual - layer.decode(layer.encode(residual.T[None]))[0].T
    return model


# Qwen3-0.6B-Base's config.json values: the real architecture, built here with random weights (no hub)
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                 rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True)


def tiny_qwen(path, hidden=64, layers=2, seed=0):
    """Save a small random Qwen3 (vocab 14,592 ≥ the token space) to path; returns the path as str."""
    return random_qwen(path, dict(vocab_size=14592, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=hidden // 4, max_position_embeddings=4096, tie_word_embeddings=True), seed)


def random_qwen(path, config_values, seed=0):
    """Save a random Qwen3ForCausalLM with these Qwen3Config values to path; returns the path as str."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    Qwen3ForCausalLM(Qwen3Config(**config_values)).save_pretrained(path)
    return str(path)


@pytest.fixture
def http_folder(tmp_path):
    """(folder, base URL) of a local HTTP server serving that folder."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def encodec():
    from audio import create_audio_tokenizer
    return create_audio_tokenizer(bandwidth=1.5, model=tiny_encodec_model(), device="cpu")


def click_song(duration_s, click_times_s, sample_rate=SAMPLE_RATE, seed=0, noise=0.01):
    """(samples,) float32: quiet noise with a 15 ms decaying 2 kHz tone burst starting at each click time."""
    rng = np.random.default_rng(seed)
    audio = rng.normal(0, noise, int(duration_s * sample_rate)).astype(np.float32)
    t = np.arange(int(0.015 * sample_rate)) / sample_rate
    burst = (0.8 * np.sin(2 * np.pi * 2000 * t) * np.exp(-t / 0.004)).astype(np.float32)
    for time_s in click_times_s:
        start = int(round(time_s * sample_rate))
        end = min(start + len(burst), len(audio))
        audio[start:end] += burst[: end - start]
    return audio


def ogg_bytes(audio, sample_rate=SAMPLE_RATE):
    """Ogg Vorbis bytes, written in blocks: one long write crashes libsndfile 1.2.2's encoder (corrections.md §6)."""
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", sample_rate, 1, format="OGG", subtype="VORBIS") as f:
        for start in range(0, len(audio), 65536):
            f.write(audio[start:start + 65536])
    return buffer.getvalue()


def wav_bytes(audio, sample_rate=SAMPLE_RATE):
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sample_rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def make_map_zip(path, bpm, difficulties, audio_bytes, song_filename="song.egg"):
    """Write a minimal v2 Info + v3 difficulty map zip. difficulties = {"Expert": [(beat, x, y, c, d), ...], ...}."""
    beatmaps = [{"_difficulty": name, "_difficultyRank": {"Easy": 1, "Normal": 3, "Hard": 5, "Expert": 7,
                                                           "ExpertPlus": 9}[name],
                 "_beatmapFilename": f"{name}Standard.dat", "_noteJumpMovementSpeed": 16,
                 "_noteJumpStartBeatOffset": 0} for name in difficulties]
    info = {"_version": "2.0.0", "_songName": Path(path).stem, "_songSubName": "", "_songAuthorName": "test",
            "_levelAuthorName": "test", "_beatsPerMinute": bpm, "_songTimeOffset": 0, "_shuffle": 0,
            "_shufflePeriod": 0.5, "_previewStartTime": 0, "_previewDuration": 10, "_songFilename": song_filename,
            "_coverImageFilename": "", "_environmentName": "DefaultEnvironment",
            "_difficultyBeatmapSets": [{"_beatmapCharacteristicName": "Standard", "_difficultyBeatmaps": beatmaps}]}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("Info.dat", json.dumps(info))
        z.writestr(song_filename, audio_bytes)
        for name, notes in difficulties.items():
            diff = {"version": "3.3.0", "bpmEvents": [], "rotationEvents": [], "bombNotes": [], "obstacles": [],
                    "sliders": [], "burstSliders": [], "waypoints": [], "basicBeatmapEvents": [],
                    "colorBoostBeatmapEvents": [],
                    "colorNotes": [{"b": b, "x": x, "y": y, "c": c, "d": d, "a": 0} for b, x, y, c, d in notes]}
            z.writestr(f"{name}Standard.dat", json.dumps(diff))
    return path
