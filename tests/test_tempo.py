"""utils.estimate_beat on real songs with a person's tempo map and note chart: Debian's Frets on Fire song packages
(fretsonfire-songs-muldjord, fretsonfire-songs-sectoid; .ci/run installs them). Each song folder holds the stems
the game plays together (song.ogg, guitar.ogg, sometimes rhythm.ogg) and notes.mid: the tempo map and the chart.

Truth: the tempo is the tempo map's (one tempo per song here). The phase is the grid that best aligns the chart
with the audio: the shift (1 ms steps, ±150 ms) of the chart's note times that puts the most onset strength under
its notes, applied to the tempo map's beat grid. The onset strength is librosa's in short frames (10.7 ms, 0.7 ms
apart): longer frames peak later (2048-sample frames measure the same shifts ~20 ms later). Skipped without the
packages."""

import glob
import os
import re

import librosa
import numpy as np
import pytest

import utils
from audio import load_audio

RATE = 24000
SONG_FOLDERS = sorted(glob.glob("/usr/share/games/fretsonfire/data/songs/*/*/notes.mid"))
pytestmark = pytest.mark.skipif(not SONG_FOLDERS, reason="no Frets on Fire songs (apt install fretsonfire-songs-muldjord)")


def mixed_song(folder):
    """(samples,) float32 at RATE: the song's stems summed, as the game plays them."""
    stems = [load_audio(os.path.join(folder, name), RATE) for name in ("song.ogg", "guitar.ogg", "rhythm.ogg")
             if os.path.exists(os.path.join(folder, name))]
    mix = np.zeros(max(len(stem) for stem in stems), np.float32)
    for stem in stems:
        mix[:len(stem)] += stem
    return mix / max(1.0, float(np.abs(mix).max()))


def tempo_map(folder):
    """notes.mid → (bpm, chart_s): the song's one tempo and the sorted times in seconds of its chart's notes."""
    import mido
    midi = mido.MidiFile(os.path.join(folder, "notes.mid"))
    tempos, chart_ticks = set(), set()
    for track in midi.tracks:
        tick = 0
        for message in track:
            tick += message.time
            if message.type == "set_tempo":
                tempos.add(round(mido.tempo2bpm(message.tempo), 3))
            elif message.type == "note_on" and message.velocity > 0:
                chart_ticks.add(tick)
    assert len(tempos) == 1, f"{folder}: several tempi {tempos}"
    bpm = tempos.pop()
    return bpm, np.array(sorted(chart_ticks)) * 60 / (bpm * midi.ticks_per_beat)


def chart_shift_s(audio, chart_s):
    """The shift (s) of the chart's note times that puts the most onset strength under them."""
    hop = 16
    envelope = librosa.onset.onset_strength(y=audio, sr=RATE, hop_length=hop, n_fft=256, n_mels=40)
    envelope_s = np.arange(len(envelope)) * hop / RATE
    shifts_s = np.arange(-0.15, 0.1505, 0.001)
    return shifts_s[int(np.argmax([np.interp(chart_s + shift_s, envelope_s, envelope).sum() for shift_s in shifts_s]))]


def fof_songs():
    """[(name, audio at RATE, truth bpm, truth first beat s), ...] for every installed song (as the docstring says)."""
    songs = []
    for path in SONG_FOLDERS:
        folder = os.path.dirname(path)
        audio = mixed_song(folder)
        bpm, chart_s = tempo_map(folder)
        songs.append((os.path.basename(folder), audio, bpm, chart_shift_s(audio, chart_s) % (60 / bpm)))
    return songs


@pytest.fixture(scope="module")
def real_songs():
    """[(name, truth bpm, truth first beat s, BeatEstimate), ...] for every installed song."""
    rows = [(name, bpm, first_beat_s, utils.estimate_beat(audio, RATE)) for name, audio, bpm, first_beat_s in fof_songs()]
    print("\nsong                      tempo map  estimate  phase error  sure  candidates")
    for name, bpm, first_beat_s, estimate in rows:
        period_s = 60 / bpm
        error_s = (estimate.first_beat_s - first_beat_s + period_s / 2) % period_s - period_s / 2
        print(f"{name[:24]:24s} {bpm:10.2f} {estimate.bpm:9.2f} {error_s * 1000:+9.1f} ms  {estimate.sure!s:5s} "
              f"{', '.join(f'{c:.1f}' for c in estimate.candidates)}")
    return rows


def test_real_songs_tempo_within_one_percent_and_first_beat_within_20ms(real_songs):
    for name, bpm, first_beat_s, estimate in real_songs:
        assert abs(estimate.bpm / bpm - 1) < 0.01, (name, bpm, estimate)
        period_s = 60 / bpm
        error_s = (estimate.first_beat_s - first_beat_s + period_s / 2) % period_s - period_s / 2
        assert abs(error_s) < 0.020, (name, error_s, estimate)


def test_real_songs_hold_one_steady_tempo(real_songs):
    # studio recordings at one tempo: the song's thirds agree (a drifting live take would not)
    assert all(estimate.drift <= utils.DRIFT_LIMIT for *_, estimate in real_songs)


def write_mixed_song(folder, path):
    """The song's stems summed at their own rate and channels (44.1 kHz stereo here) → an Ogg Vorbis file at path,
    written in blocks (corrections.md §6)."""
    import soundfile
    stems = [soundfile.read(os.path.join(folder, name), dtype="float32", always_2d=True)
             for name in ("song.ogg", "guitar.ogg", "rhythm.ogg") if os.path.exists(os.path.join(folder, name))]
    rate = stems[0][1]
    mix = np.zeros((max(len(stem) for stem, _ in stems), stems[0][0].shape[1]), np.float32)
    for stem, _ in stems:
        mix[:len(stem)] += stem
    mix /= max(1.0, float(np.abs(mix).max()))
    with soundfile.SoundFile(path, "w", rate, mix.shape[1], format="OGG", subtype="VORBIS") as out:
        for start in range(0, len(mix), 65536):
            out.write(mix[start:start + 65536])
    return path


@pytest.mark.slow
def test_infer_maps_a_real_song_at_its_own_tempo(tmp_path):
    """`python infer.py MODEL song.ogg` (no --bpm) on a real 3-minute song as a user runs it, from a folder outside
    the repository, with tiny random models: a zip that passes BeatSaver's rules with the song's tempo in Info.dat,
    and one line of stage timings and peak memory."""
    import json
    import subprocess
    import sys
    import zipfile

    import data
    from audio import create_audio_tokenizer
    from conftest import ROOT, tiny_encodec_model, tiny_qwen
    from test_utils import beatsaver_problems
    folder = os.path.dirname(next((p for p in SONG_FOLDERS if "armygeddon" in p), SONG_FOLDERS[0]))
    song = write_mixed_song(folder, tmp_path / "song.ogg")
    bpm, _ = tempo_map(folder)
    tiny_encodec_model().save_pretrained(tmp_path / "encodec")
    tiny_qwen(tmp_path / "model", seed=2)
    data.save_metadata(tmp_path / "model", create_audio_tokenizer(model=str(tmp_path / "encodec"), device="cpu"),
                       str(tmp_path / "encodec"), None, 32767, chunk_beats=16)
    result = subprocess.run([sys.executable, str(ROOT / "infer.py"), "model", song.name, "--seed", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    assert re.search(r"^time: decode [\d.]+ s, tempo [\d.]+ s, Encodec [\d.]+ s, generation [\d.]+ s, writing "
                     r"[\d.]+ s; peak memory [\d.]+ GiB", result.stdout, re.M)
    with zipfile.ZipFile(tmp_path / "song_beatgen.zip") as archive:
        archive.extractall(tmp_path / "map")
    info = json.loads((tmp_path / "map" / "Info.dat").read_text())
    assert abs(info["_beatsPerMinute"] / bpm - 1) < 0.01, info["_beatsPerMinute"]
    assert beatsaver_problems(tmp_path / "map") == []
