"""Proof that the pipeline learns audio → note alignment (slow: a few CPU minutes; part of the default run).

Synthetic songs at 137.5 BPM (non-integer beats per second) with a short tone on a random 30 % of the 1/4-beat
positions; the map's notes (dots, hand and lane by position in the beat) sit exactly on the tones. A tiny
random Encodec and a tiny Qwen3 are trained through train.main (the Unsloth/TRL path), then infer.main writes maps
for held-out songs. Predicted note times are compared, in seconds, with the tone times the generator used (±20 ms).
With the audio replaced by noise or by another song, F1 must fall to the audio-blind level. The play constraint
(the default) must cost at most 0.03 F1 against --unconstrained at ExpertPlus and keep precision ≥ 0.9 at every
easier difficulty.
"""

import json
import math
import time

import numpy as np
import pytest
import soundfile

from conftest import SAMPLE_RATE, click_song, make_map_zip, tiny_encodec_model, tiny_qwen, wav_bytes

BPM = 137.5
SONG_BEATS = 36                  # 15.7 s: four chunks of 9 beats (3.93 s, the most whole beats in 4 s)
CHUNK_S = 4.0
TRAIN_SONGS, TEST_SONGS = 150, 6    # enough songs that memorising them is harder than listening
DIFFICULTIES = ("Easy", "Normal", "Hard", "Expert", "ExpertPlus")
STEPS = 4000


def song(seed):
    """→ (tone times in seconds, audio): tones on a random 30 % of the 1/4-beat grid."""
    rng = np.random.default_rng(seed)
    grid_beats = np.arange(0, SONG_BEATS, 0.25)
    beats = np.sort(rng.choice(grid_beats, len(grid_beats) * 3 // 10, replace=False))
    times_s = beats * 60 / BPM
    return times_s, click_song(SONG_BEATS * 60 / BPM, times_s, seed=seed)


def onset_scores(predicted_s, truth_s, window_s=0.020):
    """Greedy one-to-one matching of sorted onset lists within ±window_s → (precision, recall, F1)."""
    predicted_s, truth_s = sorted(set(predicted_s)), sorted(truth_s)
    matched, j = 0, 0
    for t in predicted_s:
        while j < len(truth_s) and truth_s[j] < t - window_s:
            j += 1
        if j < len(truth_s) and abs(truth_s[j] - t) <= window_s:
            matched += 1
            j += 1
    if not predicted_s or not truth_s or not matched:
        return 0.0, 0.0, 0.0
    precision, recall = matched / len(predicted_s), matched / len(truth_s)
    return precision, recall, 2 * precision * recall / (precision + recall)


def onset_f1(predicted_s, truth_s, window_s=0.020):
    return onset_scores(predicted_s, truth_s, window_s)[2]


@pytest.mark.slow
def test_model_learns_click_alignment(tmp_path):
    import infer
    import train
    import utils
    from maps import read_map
    maps_dir = tmp_path / "maps"
    maps_dir.mkdir()
    for s in range(TRAIN_SONGS):
        times_s, audio = song(s)
        beats = times_s * BPM / 60
        # the hand follows the position in the beat (red on the 1/2 beats, blue between: one hand's notes are at
        # least 1/2 beat apart), red in lane 1, blue in lane 2, bottom row; dots, which no swing order can break, so
        # the maps are playable as they are
        notes = [(float(b), 1 + int(b * 4) % 2, 0, int(b * 4) % 2, 8) for b in beats]
        make_map_zip(maps_dir / f"song{s}.zip", BPM, {"Expert": notes}, wav_bytes(audio), song_filename="song.wav")
    tiny_encodec_model().save_pretrained(tmp_path / "encodec")
    model_dir = tiny_qwen(tmp_path / "qwen", hidden=128, layers=4)
    start = time.perf_counter()
    trainer = train.main(train.parse_args([
        str(maps_dir), "--output_dir", str(tmp_path / "out"), "--model", model_dir,
        "--audio_model", str(tmp_path / "encodec"), "--cache_dir", str(tmp_path / "cache"),
        "--chunk_duration", str(CHUNK_S),
        "--max_steps", str(STEPS), "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3",
        "--warmup_steps", "30", "--save_steps", "100000", "--max_seq_length", "2000"]))
    train_s = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    curve = [round(float(np.mean(losses[i:i + 100])), 3) for i in range(0, len(losses), 100)]

    scores = {"real": [], "silence": [], "shuffled": []}
    by_difficulty = {}          # difficulty → [(precision, F1, NPS) per held-out song]
    for s in range(1000, 1000 + TEST_SONGS):
        times_s, audio = song(s)
        inputs = {"real": audio,
                  "silence": np.random.default_rng(s).normal(0, 0.01, len(audio)).astype(np.float32),
                  "shuffled": song(s + 500)[1]}
        for name, samples in inputs.items():
            wav = tmp_path / f"{name}{s}.wav"
            soundfile.write(wav, samples, SAMPLE_RATE)
            dat = infer.main(infer.parse_args([str(tmp_path / "out"), str(wav), "--bpm", str(BPM),
                                               "--temperature", "0", "--output", str(tmp_path / f"{name}{s}.dat")]))
            predicted_s = [note["b"] * 60 / BPM for note in json.loads(open(dat).read())["colorNotes"]]
            scores[name].append(onset_f1(predicted_s, times_s))
            if name == "real":
                second_chunk_s = math.floor(CHUNK_S * BPM / 60) * 60 / BPM
                late = [t for t in predicted_s if t >= second_chunk_s]     # chunks after the first
                scores.setdefault("real, chunks 2-4", []).append(onset_f1(late, times_s[times_s >= second_chunk_s]))
        # the same song without the play constraint, and at every difficulty (one call, one zip)
        wav = tmp_path / f"real{s}.wav"
        dat = infer.main(infer.parse_args([str(tmp_path / "out"), str(wav), "--bpm", str(BPM), "--temperature", "0",
                                           "--unconstrained", "--output", str(tmp_path / f"free{s}.dat")]))
        predicted_s = [note["b"] * 60 / BPM for note in json.loads(open(dat).read())["colorNotes"]]
        scores.setdefault("unconstrained", []).append(onset_f1(predicted_s, times_s))
        for easier in ("thin", "generate"):
            written = infer.main(infer.parse_args([str(tmp_path / "out"), str(wav), "--bpm", str(BPM), "--temperature",
                                                   "0", "--difficulties", *DIFFICULTIES, "--easier", easier, "--output",
                                                   str(tmp_path / f"{easier}{s}.zip")]))
            beatmap = read_map(written)
            for difficulty in DIFFICULTIES:
                notes = beatmap.difficulties[("Standard", difficulty)].notes
                precision, _, f1 = onset_scores([note.beat * 60 / BPM for note in notes], times_s)
                by_difficulty.setdefault((easier, difficulty), []).append(
                    (precision, f1, utils.map_stats(notes, BPM)["nps"]))
    means = {name: round(float(np.mean(values)), 3) for name, values in scores.items()}
    # table = {(easier, difficulty): (mean precision, mean F1, mean NPS)}
    table = {key: tuple(round(float(np.mean(column)), 3) for column in zip(*rows)) for key, rows in by_difficulty.items()}
    print(f"\nlearning: {STEPS} steps in {train_s:.0f} s; loss per 100 steps {curve}\nheld-out onset F1 ±20 ms: {means}")
    for key, (precision, f1, nps) in table.items():
        print(f"constrained, easier by {key[0]}, {key[1]}: precision {precision}, F1 {f1}, NPS {nps}")
    assert means["real"] >= 0.9 and means["real, chunks 2-4"] >= 0.9
    assert means["silence"] <= 0.4 and means["shuffled"] <= 0.45
    assert means["real"] - max(means["silence"], means["shuffled"]) >= 0.4
    # the play constraint costs at most 0.03 F1 at ExpertPlus; easier maps hold fewer notes, still on the clicks
    assert abs(table[("thin", "ExpertPlus")][1] - means["unconstrained"]) <= 0.03
    assert all(table[("thin", name)][0] >= 0.9 for name in DIFFICULTIES[:-1])
