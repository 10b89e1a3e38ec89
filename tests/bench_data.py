"""Benchmark (not part of the test run): BeatDataset warm-cache throughput and Encodec encode speed on CPU.

    .venv/bin/python tests/bench_data.py

Warm cache: training sequences per second from a BeatDataset whose audio codes are all cached (one core).
Cold: real-time factor of encoding with the full-size 24 kHz Encodec architecture (random weights; same compute).
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import click_song, make_map_zip, ogg_bytes, tiny_encodec_model  # noqa: E402


def main():
    torch.set_num_threads(1)
    from audio import create_audio_tokenizer
    from data import BeatDataset
    from maps import ZippedBeatSaberDataset

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for s in range(8):
            beats = np.sort(rng.choice(np.arange(0, 360, 0.25), 900, replace=False))     # 3 min at 120 BPM, 5 NPS
            song = click_song(180.0, beats * 0.5, seed=s)
            make_map_zip(f"{tmp}/s{s}.zip", 120.0, {"Expert": [(float(b), 1, 0, 0, 1) for b in beats],
                                                    "ExpertPlus": [(float(b), 2, 1, 1, 0) for b in beats]},
                         ogg_bytes(song))
        encodec = create_audio_tokenizer(model=tiny_encodec_model(), device="cpu")
        maps = ZippedBeatSaberDataset(tmp)
        start = time.perf_counter()
        BeatDataset(maps, chunk_duration=30.0, cache_dir=f"{tmp}/cache", audio_tokenizer=encodec)
        first = BeatDataset(maps, chunk_duration=30.0, cache_dir=f"{tmp}/cache", audio_tokenizer=encodec)
        for i in range(len(first)):
            first[i]
        print(f"cold pass (index + tiny-Encodec encode of 8 × 180 s): {time.perf_counter() - start:.1f} s")
        warm = BeatDataset(maps, chunk_duration=30.0, cache_dir=f"{tmp}/cache", audio_tokenizer=encodec)
        order = np.random.default_rng(1).permutation(len(warm))
        for memory_items, where in ((32, "songs held in memory"), (0, "every song read from disk")):
            warm.cache.memory_items = memory_items
            start = time.perf_counter()
            n = 0
            while time.perf_counter() - start < 3.0:
                for i in order:
                    warm[int(i)]
                    n += 1
            elapsed = time.perf_counter() - start
            print(f"warm cache, {where}: {n / elapsed:.0f} sequences/s "
                  f"({len(warm[0]['input_ids'])} tokens each, 1 thread)")

    from transformers import EncodecConfig, EncodecModel
    full = create_audio_tokenizer(model=EncodecModel(EncodecConfig()), device="cpu")
    song = torch.from_numpy(click_song(30.0, np.arange(0, 30, 0.5)))[None]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        full.encode(song[:, :24000])
        start = time.perf_counter()
        full.encode(song)
        elapsed = time.perf_counter() - start
        print(f"full-size Encodec 24 kHz encode, {threads} thread(s): {elapsed:.2f} s for 30 s of audio "
              f"(real-time factor {elapsed / 30:.3f})")


if __name__ == "__main__":
    main()
