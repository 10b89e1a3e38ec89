"""Regenerating part of a map (`infer.py MODEL --base map.zip --regenerate START-END`): the notes outside the range
stay exactly as they were (with everything else in the file), the range is new, and the map stays playable across
both edges. Bases are built here as a mapper's editor writes them (v3 and v2 difficulties, bombs, walls, lights,
custom data)."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import ROOT, click_song, tiny_encodec_model, tiny_qwen, wav_bytes

BPM = 120.0


def playable_notes(duration_s, step_s=0.3):
    """[(beat, x, y, color, direction)]: the hands take turns every step_s, each alternating down and up."""
    notes = []
    for i, time_s in enumerate(np.arange(0.5, duration_s - 0.5, step_s)):
        color = i % 2
        notes.append((round(time_s * BPM / 60, 4), 1 + color, 0, color, 1 if i // 2 % 2 == 0 else 0))
    return notes


def base_map(path, notes, version):
    """A map zip as an editor writes it: one Expert difficulty (v3 or v2) with notes, bombs, a wall, lights and custom
    data, Info.dat 2.0.0 with editor custom data, the click song."""
    if version == 3:
        difficulty = {"version": "3.3.0", "bpmEvents": [], "rotationEvents": [],
                      "colorNotes": [{"b": b, "x": x, "y": y, "c": c, "d": d, "a": 0, "customData": {"mine": i}}
                                     for i, (b, x, y, c, d) in enumerate(notes)],
                      "bombNotes": [{"b": 3.0, "x": 0, "y": 2}], "obstacles": [{"b": 5.0, "d": 1.0, "x": 3, "y": 0,
                                                                                 "w": 1, "h": 5}],
                      "sliders": [], "burstSliders": [], "waypoints": [],
                      "basicBeatmapEvents": [{"b": 0.0, "et": 1, "i": 5, "f": 1.0}], "colorBoostBeatmapEvents": [],
                      "lightColorEventBoxGroups": [], "lightRotationEventBoxGroups": [],
                      "lightTranslationEventBoxGroups": [], "basicEventTypesWithKeywords": {"d": []},
                      "useNormalEventsAsCompatibleEvents": True, "customData": {"bookmarks": [{"b": 4, "n": "drop"}]}}
    else:
        difficulty = {"_version": "2.2.0",
                      "_notes": [{"_time": b, "_lineIndex": x, "_lineLayer": y, "_type": c, "_cutDirection": d}
                                 for b, x, y, c, d in notes] + [{"_time": 3.0, "_lineIndex": 0, "_lineLayer": 2,
                                                                 "_type": 3, "_cutDirection": 0}],
                      "_obstacles": [{"_time": 5.0, "_lineIndex": 3, "_type": 0, "_duration": 1.0, "_width": 1}],
                      "_events": [{"_time": 0.0, "_type": 1, "_value": 5}], "_waypoints": [],
                      "_customData": {"_time": 12.5, "_bookmarks": []}}
    info = {"_version": "2.0.0", "_songName": "Base", "_songSubName": "", "_songAuthorName": "", "_levelAuthorName":
            "someone", "_beatsPerMinute": BPM, "_songTimeOffset": 0, "_shuffle": 0, "_shufflePeriod": 0.5,
            "_previewStartTime": 0, "_previewDuration": 10, "_songFilename": "song.egg", "_coverImageFilename": "",
            "_environmentName": "DefaultEnvironment",
            "_customData": {"_editors": {"_lastEditedBy": "ChroMapper", "ChroMapper": {"version": "0.9"}}},
            "_difficultyBeatmapSets": [{"_beatmapCharacteristicName": "Standard", "_difficultyBeatmaps": [
                {"_difficulty": "Expert", "_difficultyRank": 7, "_beatmapFilename": "ExpertStandard.dat",
                 "_noteJumpMovementSpeed": 16, "_noteJumpStartBeatOffset": 0}]}]}
    song = click_song(30.0, np.arange(0.25, 30, 0.3))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("Info.dat", json.dumps(info))
        archive.writestr("ExpertStandard.dat", json.dumps(difficulty))
        archive.writestr("song.egg", wav_bytes(song))
    return path


@pytest.fixture(scope="module")
def mapper(tmp_path_factory):
    import data
    import infer
    from audio import create_audio_tokenizer
    folder = tmp_path_factory.mktemp("regen")
    tiny_encodec_model().save_pretrained(folder / "encodec")
    tiny_qwen(folder / "model", seed=5)
    data.save_metadata(folder / "model", create_audio_tokenizer(model=str(folder / "encodec"), device="cpu"),
                       str(folder / "encodec"), 10.0, 32767)
    return infer.Mapper(str(folder / "model"), "cpu")


def difficulty_json(zip_path):
    with zipfile.ZipFile(zip_path) as archive:
        return json.loads(archive.read("ExpertStandard.dat")), json.loads(archive.read("Info.dat"))


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_regenerated_range_keeps_the_rest_and_stays_playable(mapper, tmp_path, version, seed):
    import data
    import infer
    import utils
    from maps import read_map
    notes = playable_notes(30.0)
    base = base_map(tmp_path / "mymap.zip", notes, version)
    torch.manual_seed(seed)
    options = infer.Options(("Expert",), data.Sampling(1.0, progress=False))
    result = mapper.map_song(_song(base, tmp_path), str(tmp_path / "out.zip"), options, base=str(base),
                             span_s=(10.0, 20.0))
    before, _ = difficulty_json(base)
    after, info = difficulty_json(result.written)
    key = "colorNotes" if version == 3 else "_notes"
    beat = "b" if version == 3 else "_time"
    def outside(objects):
        return [o for o in objects if not 10.0 <= o[beat] * 60 / BPM < 20.0]
    # untouched notes identical, field by field (custom data too); everything else in the file as it was
    assert outside(after[key]) == outside(before[key])
    assert {k: v for k, v in after.items() if k != key} == {k: v for k, v in before.items() if k != key}
    new = [o for o in after[key] if 10.0 <= o[beat] * 60 / BPM < 20.0]
    assert new and new != [o for o in before[key] if 10.0 <= o[beat] * 60 / BPM < 20.0]
    assert info["_customData"]["_editors"]["_lastEditedBy"] == "beatgen" and "ChroMapper" in info["_customData"]["_editors"]
    # playable everywhere, across both edges (the base itself is playable)
    expert = read_map(result.written).difficulties[("Standard", "Expert")]
    stats = utils.map_stats(expert.notes, BPM)
    assert (stats["parity_errors_red"], stats["parity_errors_blue"], stats["vision_blocks"],
            stats["impossible_doubles"]) == (0, 0, 0, 0), stats
    assert expert.bombs == 1 and expert.obstacles == 1


def _song(base, folder):
    """The base map's song as a file (what a user passes as the song)."""
    from maps import read_map
    path = folder / "song.wav"
    path.write_bytes(read_map(base).read_audio())
    return str(path)


def test_regenerate_command(mapper, tmp_path):
    """As users run it: `python infer.py MODEL --base mymap.zip --regenerate 5-15 --difficulty Expert`, the song taken
    from the base map; errors are one line."""
    base = base_map(tmp_path / "mymap.zip", playable_notes(30.0), 3)
    model = mapper.model_dir
    result = subprocess.run([sys.executable, str(ROOT / "infer.py"), model, "--base", str(base), "--regenerate", "5-15",
                             "--difficulty", "Expert", "--seed", "0"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote mymap_regenerated.zip: Expert of" in result.stdout and "5–15 s regenerated" in result.stdout
    assert "parity errors 0 red / 0 blue, vision blocks 0, impossible doubles 0" in result.stdout
    for args, message in ((["--regenerate", "20-10"], "START < END"), (["--difficulty", "Hard", "--regenerate", "1-2"],
                                                                      "no Standard Hard difficulty"),
                          ([], "--base needs --regenerate")):
        bad = subprocess.run([sys.executable, str(ROOT / "infer.py"), model, "--base", str(base), *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]


def test_v4_base_is_a_clear_error():
    from maps import replace_notes
    v4 = json.dumps({"version": "4.0.0", "colorNotes": [{"b": 1, "i": 0}], "colorNotesData": [{}]}).encode()
    with pytest.raises(ValueError, match="save the map as v3"):
        replace_notes(v4, 0, 10, [])
