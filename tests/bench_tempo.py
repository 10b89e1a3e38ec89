"""utils.estimate_beat on real songs with known tempo maps (a benchmark, not collected by pytest): the table in
README "Tempo".

    .venv/bin/python tests/bench_tempo.py [--cache /tmp/beatgen-songs]

Songs, from Debian packages (each set is skipped when its package is missing):
  - Frets on Fire (fretsonfire-songs-muldjord, fretsonfire-songs-sectoid): the stems mixed, the tempo from
    notes.mid, the first beat where the person's chart best aligns with the audio (tests/test_tempo.py);
  - LMMS demo projects (lmms) and Hydrogen demo songs (hydrogen, hydrogen-drumkits), rendered headless into --cache
    (`lmms --allowroot render P -f wav -o W`, `h2cli -s P -o W`; a few minutes in all): the tempo is the project's,
    beat 0 at the render's first sample. Projects that render silent (Hydrogen's pre-1.0 songs) are left out.
A song passes when the tempo is within 1 % of the truth and the first beat within 20 ms.
"""

import argparse
import glob
import gzip
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

RATE = 24000


def fof_songs():
    """[(set, name, audio, bpm, first beat s), ...] of the installed Frets on Fire songs (tests/test_tempo.py)."""
    import test_tempo
    return [("fof", *song) for song in test_tempo.fof_songs()]


def project_bpm(project):
    """The tempo (quarter notes a minute) an LMMS (.mmpz/.mmp) or Hydrogen (.h2song) project file sets."""
    data = Path(project).read_bytes()
    if project.endswith(".mmpz"):
        data = zlib.decompress(data[4:])            # Qt's qCompress: a 4-byte length, then zlib
    elif data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    root = ET.fromstring(data)
    head = root.find("head")
    if head is not None:
        return float(head.get("bpm") or head.find("bpm").get("value"))
    return float(root.find("bpm").text)


def rendered_songs(cache):
    """[(set, name, audio, bpm, 0.0), ...] of the LMMS and Hydrogen demos, rendered into cache once."""
    from audio import load_audio
    projects = [("lmms", p) for p in sorted(glob.glob("/usr/share/lmms/projects/demos/**/*.mmp*", recursive=True)
                                             + glob.glob("/usr/share/lmms/projects/shorties/*.mmp*"))]
    projects += [("hydrogen", p) for p in sorted(glob.glob("/usr/share/hydrogen/data/demo_songs/*.h2song"))]
    songs = []
    for source, project in projects:
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(project).name.split(".")[0])
        wav = Path(cache) / f"{source}-{name}.wav"
        if not wav.exists():
            command = (["lmms", "--allowroot", "render", project, "-f", "wav", "-o", str(wav)] if source == "lmms"
                       else ["h2cli", "-s", project, "-o", str(wav)])
            subprocess.run(command, capture_output=True, timeout=600,
                           env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
        if wav.exists():
            audio = load_audio(wav, RATE)
            if np.abs(audio).max() > 1e-3:
                songs.append((source, name, audio, project_bpm(project), 0.0))
    return songs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/beatgen-songs", help="folder for the rendered songs")
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    import utils
    songs = fof_songs() + rendered_songs(args.cache)
    print("| set | song | tempo map | estimate | error class | phase error | sure (candidates) |")
    print("|---|---|--:|--:|---|--:|---|")
    passed, seconds = 0, []         # seconds = [(estimate_beat's wall time s, song length s), ...]
    for source, name, audio, bpm, first_beat_s in songs:
        start = time.perf_counter()
        estimate = utils.estimate_beat(audio, RATE)
        seconds.append((time.perf_counter() - start, len(audio) / RATE))
        ratio = estimate.bpm / bpm
        error_class = next((label for label, r in (("×1", 1), ("×2", 2), ("×½", 0.5), ("×3/2", 1.5), ("×2/3", 2 / 3))
                            if abs(ratio / r - 1) < 0.01), "other")
        period_s = 60 / bpm
        phase_ms = 1000 * ((estimate.first_beat_s - first_beat_s + period_s / 2) % period_s - period_s / 2)
        ok = error_class == "×1" and abs(phase_ms) < 20
        passed += ok
        sure = "yes" if estimate.sure else f"no ({', '.join(f'{c:.1f}' for c in estimate.candidates) or 'drift'})"
        print(f"| {source} | {name} | {bpm:g} | {estimate.bpm:.2f} | {error_class} | "
              f"{f'{phase_ms:+.1f} ms' if error_class == '×1' else '-'} | {sure} |")
    print(f"\n{passed} of {len(songs)} songs: tempo within 1 % and first beat within 20 ms")
    per_minute = [60 * taken_s / length_s for taken_s, length_s in seconds]
    print(f"estimate_beat: {sum(t for t, _ in seconds):.1f} s for {sum(n for _, n in seconds) / 60:.1f} min of audio; "
          f"{np.median(per_minute):.2f} s per minute of audio (median; {min(per_minute):.2f}–{max(per_minute):.2f})")


if __name__ == "__main__":
    main()
