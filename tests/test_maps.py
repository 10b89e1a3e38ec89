"""Tests for maps.py: every shared fixture map (zipped here in tmp and as a folder) against counts taken straight from
its JSON, facts filters rely on, malformed input (only ValueError may come out), and ZippedBeatSaberDataset."""

import gzip
import hashlib
import io
import json
import logging
import math
import os
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import maps
import utils
from conftest import SHARED
from maps import Note, read_map, ZippedBeatSaberDataset

FIXTURES = SHARED / "fixtures" / "maps"
SCHEMA_TESTS = FIXTURES / "beatmaps-io__beatsaver-common-mp"


def map_folders(root):
    """root → sorted folders holding an Info.dat (any case) below it."""
    if not root.is_dir():
        return []
    return sorted({path.parent for path in root.rglob("*") if path.name.lower() == "info.dat"})


# real maps: every fixture map folder except BeatSaver's synthetic validator cases
REAL_MAPS = [folder for folder in map_folders(FIXTURES) if SCHEMA_TESTS not in folder.parents]
SCHEMA_MAPS = map_folders(SCHEMA_TESTS)
needs_shared = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared fixtures not found at {FIXTURES}")

# (map folder relative to FIXTURES, characteristic, difficulty) → notes the parser must drop, by reason
EXPECTED_DROPPED = {
    ("RHKasper__BeatSaberMaps/Approaching Nirvana - Alone - 6bfa", "Standard", "Expert"):
        {"mapping extensions position": 416},
    ("KivalEvan__BeatSaber-MapCheck/Test Track", "Lawless", "Normal"): {"beat negative": 1},
    ("KivalEvan__BeatSaber-MapCheck/Test Track", "Lightshow", "Expert"): {"chain y out of range": 1},
    ("KivalEvan__BeatSaber-MapCheck/Test Track", "Lightshow", "ExpertPlus"): {"x out of range": 1},
}


def fixture(relative):
    path = FIXTURES / relative
    if not path.is_dir():
        pytest.skip(f"fixture {relative} not found")
    return path


def zip_folder(folder, zip_path, prefix=""):
    """Zip the files of a map folder (flat, or under `prefix/`) into zip_path → zip_path."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                archive.write(path, prefix + path.name)
    return zip_path


def load(path):
    return json.loads(path.read_bytes().decode("utf-8-sig"))


def info_difficulties(folder):
    """Info.dat read directly → {(characteristic, difficulty): difficulty file name}."""
    info_path = next(path for path in folder.iterdir() if path.name.lower() == "info.dat")
    info = load(info_path)
    if "_difficultyBeatmapSets" in info:
        return {(beatmap_set["_beatmapCharacteristicName"], beatmap["_difficulty"]): beatmap["_beatmapFilename"]
                for beatmap_set in info["_difficultyBeatmapSets"] for beatmap in beatmap_set["_difficultyBeatmaps"]}
    return {(beatmap["characteristic"], beatmap["difficulty"]): beatmap["beatmapDataFilename"]
            for beatmap in info["difficultyBeatmaps"]}


def count_objects(path):
    """A difficulty file read directly → (colour notes, bombs, obstacles, chains) as listed in its JSON."""
    data = load(path)
    if "_notes" in data:
        notes = data["_notes"]
        return (sum(note.get("_type", 0) != 3 for note in notes), sum(note.get("_type", 0) == 3 for note in notes),
                len(data.get("_obstacles", [])), 0)
    chains = data.get("burstSliders", data.get("chains", []))
    return len(data.get("colorNotes", [])), len(data.get("bombNotes", [])), len(data.get("obstacles", [])), len(chains)


# ---- every fixture map ----

@needs_shared
@pytest.mark.parametrize("folder", REAL_MAPS, ids=[str(folder.relative_to(FIXTURES)) for folder in REAL_MAPS])
def test_fixture_map_counts_match_its_json(folder, tmp_path):
    relative = str(folder.relative_to(FIXTURES))
    expected = info_difficulties(folder)
    zipped = read_map(zip_folder(folder, tmp_path / "map.zip"))
    unzipped = read_map(folder)
    assert zipped.difficulties == unzipped.difficulties and zipped.broken == unzipped.broken
    assert set(zipped.difficulties) | set(zipped.broken) == set(expected)
    for key, filename in expected.items():
        if not (folder / filename).is_file():
            # PARTIAL fixtures: the Info.dat lists files that were not copied
            assert zipped.broken[key] == f"{filename}: file missing"
            continue
        difficulty = zipped.difficulties[key]
        colour, bombs, obstacles, chains = count_objects(folder / filename)
        dropped_notes = sum(n for reason, n in difficulty.dropped.items() if not reason.startswith("chain "))
        assert len(difficulty.notes) + dropped_notes == colour
        assert len(difficulty.chains) + difficulty.dropped.total() - dropped_notes == chains
        assert (difficulty.bombs, difficulty.obstacles) == (bombs, obstacles)
        assert difficulty.dropped == Counter(EXPECTED_DROPPED.get((relative, *key), {}))
        assert difficulty.notes == sorted(difficulty.notes)
        assert all(0 <= note.x <= 3 and 0 <= note.y <= 2 and note.color in (0, 1) and 0 <= note.direction <= 8
                   for note in difficulty.notes)


@needs_shared
def test_schema_test_maps_only_raise_value_error(tmp_path):
    # BeatSaver's validator cases, whole maps: read, or refused with the path and a reason
    assert SCHEMA_MAPS
    outcomes = Counter()
    for i, folder in enumerate(SCHEMA_MAPS):
        for source in (folder, zip_folder(folder, tmp_path / f"{i}.zip")):
            try:
                beatmap = read_map(source)
                outcomes["read"] += 1
                assert all(reason for reason in beatmap.broken.values())
            except ValueError as error:
                outcomes["refused"] += 1
                assert str(error).startswith(f"{source}: ")
    assert outcomes["read"] and outcomes["refused"]


@needs_shared
def test_every_schema_test_file_as_info_or_difficulty_only_raises_value_error(tmp_path):
    files = sorted(path for path in SCHEMA_TESTS.rglob("*") if path.is_file())
    assert len(files) > 100
    for i, path in enumerate(files):
        content = path.read_bytes()
        as_difficulty = write_map(tmp_path / f"d{i}.zip", v2_info({("Standard", "Expert"): "Expert.dat"}),
                                  {"Expert.dat": content})
        beatmap = read_map(as_difficulty)
        assert set(beatmap.difficulties) | set(beatmap.broken) == {("Standard", "Expert")}
        as_info = write_map(tmp_path / f"i{i}.zip", content, {"Easy.dat": v3_difficulty([(1, 1, 0, 0, 1)])})
        read_or_value_error(as_info)


# ---- facts filters rely on ----

@needs_shared
def test_official_bpm_events_are_changes():
    goodbye = read_map(fixture("Lekrkoekj__the-big-goodbye/the-big-goodbye"))
    changes = goodbye.difficulties[("Standard", "ExpertPlus")].bpm_changes
    # 9 bpmEvents; the first, at beat 0, repeats the Info BPM 184 and is no change
    assert len(changes) == 8 and changes[0] == (378.0, 210.286) and changes[-1] == (853.0, 184.0)
    cascade = read_map(fixture("benzhenwen__Cascade/Cascade"))
    # Info says 130, the first bpmEvent says 128 at beat 0: a change
    assert cascade.difficulties[("Standard", "ExpertPlus")].bpm_changes[0] == (0.0, 128.0)


@needs_shared
def test_editor_bpm_changes_and_repeated_info_bpm_are_not_changes():
    folder = fixture("RHKasper__BeatSaberMaps/ef5a (Blackbird - EmotionalFlight)")
    assert len(load(folder / "EasyStandard.dat")["_customData"]["_BPMChanges"]) == 50
    beatmap = read_map(folder)
    assert len(beatmap.difficulties) == 6
    assert all(not difficulty.bpm_changes for difficulty in beatmap.difficulties.values())
    # bpmEvent (0, 75.00000762939453): the Info BPM 75 written as float32
    overthrower = read_map(fixture("NexVRStudios__Overthrower/Overthrower"))
    assert overthrower.difficulties[("Standard", "ExpertPlus")].bpm_changes == []


@needs_shared
def test_v4_info_with_v3_difficulty_and_audio_data_tempo():
    beatmap = read_map(fixture("dragonruler1000__Any_man_of_mine/Any_man_of_mine"))
    difficulty = beatmap.difficulties[("Standard", "Easy")]
    assert (beatmap.info_version, difficulty.version, beatmap.bpm) == ("4.0.1", "3.3.0", 88.0)
    # Info says 88; the bpmEvent and the AudioData region both say 78 from beat 0, then Info BPM after the region
    assert [(beat, round(bpm, 3)) for beat, bpm in difficulty.bpm_changes] == [(0.0, 78.0), (320.847717, 88.0)]


@needs_shared
def test_v4_default_note_and_matching_audio_data():
    beatmap = read_map(fixture("Flexey9920__heavenly-jumpstyle/heavenly-jumpstyle"))
    hard = beatmap.difficulties[("Standard", "Hard")]
    data = load(fixture("Flexey9920__heavenly-jumpstyle/heavenly-jumpstyle") / "Hard.beatmap.dat")
    assert data["colorNotes"][0] == {} and data["colorNotesData"][0] == {"x": 1}
    # {} = beat 0, data index 0 → colorNotesData[0] = x 1, every other field 0
    assert hard.notes[0] == Note(0.0, 1, 0, 0, 0)
    assert hard.bpm_changes == []
    assert (beatmap.info_version, beatmap.bpm, beatmap.song_filename) == ("4.0.0", 60.0, "HEAVENLY JUMPSTYLE.wav")


@needs_shared
def test_mod_requirements_reported():
    pure = read_map(fixture("ScuffedItalian__ScuffedNoodleMaps/Pure"))
    assert "Noodle Extensions" in pure.difficulties[("Standard", "Expert")].requirements
    drift = read_map(fixture("Darkchaos2__BeatMap-drift/BeatMap-drift"))
    assert "Noodle Extensions" in drift.difficulties[("Standard", "ExpertPlus")].requirements
    assert "Noodle Extensions" not in drift.difficulties[("Standard", "Easy")].requirements
    nirvana = read_map(fixture("RHKasper__BeatSaberMaps/Approaching Nirvana - Alone - 6bfa"))
    assert "Mapping Extensions" in nirvana.difficulties[("Standard", "Expert")].requirements
    test_track = read_map(fixture("KivalEvan__BeatSaber-MapCheck/Test Track"))
    assert "Mapping Extensions" in test_track.difficulties[("Lightshow", "Expert")].requirements


@needs_shared
def test_lowercase_info_and_versionless_v2(tmp_path):
    folder = fixture("BRFrags__Six60NeverEnoughBS/Six60NeverEnoughBS")
    assert (folder / "info.dat").is_file() and "_version" not in load(folder / "ExpertPlusStandard.dat")
    zipped = zip_folder(folder, tmp_path / "six60.zip")
    assert "info.dat" in zipfile.ZipFile(zipped).namelist()
    difficulty = read_map(zipped).difficulties[("Standard", "ExpertPlus")]
    assert (difficulty.version, len(difficulty.notes), difficulty.obstacles) == ("", 706, 2)
    choose_you = read_map(fixture("RHKasper__BeatSaberMaps/9683 (I Choose You - Majorpickle)"))
    assert choose_you.bpm == 154.0 and set(choose_you.difficulties) == {("Standard", "Expert"), ("360Degree", "Expert")}


@needs_shared
def test_zip_with_the_map_in_a_folder(tmp_path):
    folder = fixture("eggn0gg__serenade/serenade")
    beatmap = read_map(zip_folder(folder, tmp_path / "nested.zip", prefix="Bite Me/"))
    assert len(beatmap.difficulties[("Standard", "Expert")].notes) == 538


# ---- synthetic maps ----

def v2_info(difficulties, bpm=120, offset_s=0, requirements=(), song="song.egg"):
    """{(characteristic, difficulty): file name} → Info.dat v2 JSON object."""
    sets = {}
    for (characteristic, name), filename in difficulties.items():
        sets.setdefault(characteristic, []).append({
            "_difficulty": name, "_difficultyRank": 7, "_beatmapFilename": filename, "_noteJumpMovementSpeed": 16,
            "_noteJumpStartBeatOffset": 0.5, "_customData": {"_requirements": list(requirements)}})
    return {"_version": "2.0.0", "_songName": "Song", "_songSubName": "", "_songAuthorName": "Artist",
            "_levelAuthorName": "Mapper", "_beatsPerMinute": bpm, "_songTimeOffset": offset_s,
            "_songFilename": song, "_coverImageFilename": "", "_environmentName": "DefaultEnvironment",
            "_difficultyBeatmapSets": [{"_beatmapCharacteristicName": characteristic, "_difficultyBeatmaps": beatmaps}
                                       for characteristic, beatmaps in sets.items()]}


def v3_difficulty(notes, bpm_events=()):
    """[(beat, x, y, color, direction), ...] → v3.3.0 difficulty JSON object."""
    return {"version": "3.3.0", "bpmEvents": [{"b": b, "m": m} for b, m in bpm_events], "bombNotes": [],
            "obstacles": [], "sliders": [], "burstSliders": [],
            "colorNotes": [{"b": b, "x": x, "y": y, "c": c, "d": d, "a": 0} for b, x, y, c, d in notes]}


def write_map(path, info, files):
    """Write a map (zip when path ends in .zip, else a folder). info and files values: JSON objects or bytes."""
    contents = {"Info.dat": info, **files}
    contents = {name: value if isinstance(value, bytes) else json.dumps(value).encode()
                for name, value in contents.items()}
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in contents.items():
                archive.writestr(name, data)
    else:
        path.mkdir()
        for name, data in contents.items():
            (path / name).write_bytes(data)
    return path


EXPERT = {("Standard", "Expert"): "Expert.dat"}


@pytest.mark.parametrize("suffix", [".zip", ""])
def test_synthetic_map_fields_and_audio(tmp_path, suffix):
    song = os.urandom(1000)
    path = write_map(tmp_path / f"map{suffix}", v2_info(EXPERT, bpm=150),
                     {"Expert.dat": v3_difficulty([(2, 3, 2, 1, 8), (1, 0, 0, 0, 1)]), "song.egg": song})
    beatmap = read_map(path)
    assert (beatmap.source, beatmap.bpm, beatmap.song_name, beatmap.level_author) == (str(path), 150.0, "Song", "Mapper")
    difficulty = beatmap.difficulties[("Standard", "Expert")]
    assert difficulty.notes == [Note(1.0, 0, 0, 0, 1), Note(2.0, 3, 2, 1, 8)]
    assert (difficulty.njs, difficulty.offset_beats, difficulty.filename) == (16.0, 0.5, "Expert.dat")
    assert beatmap.read_audio() == song


def test_bom_gzip_case_insensitive_names_and_defaulted_fields(tmp_path):
    info = v2_info({("Standard", "Expert"): "expert.DAT", ("Standard", "Hard"): "Hard.dat"})
    v4 = {"version": "4.0.0", "colorNotes": [{"b": 4, "i": 1}, {}], "colorNotesData": [{}, {"x": 3, "c": 1, "d": 2}],
          "chains": [{"hb": 1, "tb": 2, "i": 1, "ci": 0}], "chainsData": [{"tx": 2, "ty": 1, "c": 4, "s": 0.5}]}
    path = write_map(tmp_path / "map.zip", b"\xef\xbb\xbf" + json.dumps(info).encode(),
                     {"Expert.dat": gzip.compress(json.dumps(v4).encode()),
                      "Hard.dat": {"version": "3.3.0", "colorNotes": [{"b": 1}]}})
    beatmap = read_map(path)
    expert = beatmap.difficulties[("Standard", "Expert")]
    assert expert.notes == [Note(0.0, 0, 0, 0, 0), Note(4.0, 3, 0, 1, 2)]
    assert expert.chains == [maps.Chain(1.0, 3, 0, 1, 2, 2.0, 2, 1, 4, 0.5)]
    assert beatmap.difficulties[("Standard", "Hard")].notes == [Note(1.0, 0, 0, 0, 0)]


def test_chains_v3(tmp_path):
    chains = [{"b": 1, "x": 1, "c": 1, "d": 1, "tb": 1.5, "tx": 1, "ty": 2, "sc": 5, "s": 0.8},
              {"b": 2, "sc": 0, "s": 1}, {"b": 3, "ty": 3, "sc": 3, "s": 1}]
    difficulty = {"version": "3.3.0", "colorNotes": [{"b": 1, "x": 1, "c": 1, "d": 1}], "burstSliders": chains}
    expert = read_map(write_map(tmp_path / "map.zip", v2_info(EXPERT), {"Expert.dat": difficulty})).difficulties[
        ("Standard", "Expert")]
    assert expert.chains == [maps.Chain(1.0, 1, 0, 1, 1, 1.5, 1, 2, 5, 0.8)]
    assert expert.dropped == Counter({"chain segments or squish out of range": 1, "chain y out of range": 1})


def test_unrepresentable_notes_are_dropped_and_counted(tmp_path):
    v2 = {"_version": "2.2.0", "_notes": [
        {"_time": 1, "_lineIndex": 1, "_lineLayer": 0, "_type": 0, "_cutDirection": 1},
        {"_time": 1, "_lineIndex": 1, "_lineLayer": 0, "_type": 3, "_cutDirection": 0},
        {"_time": 1, "_lineIndex": 1, "_lineLayer": 0, "_type": 2, "_cutDirection": 0},
        {"_time": float("nan"), "_lineIndex": 1, "_lineLayer": 0, "_type": 0, "_cutDirection": 0},
        {"_time": -1, "_lineIndex": 1, "_lineLayer": 0, "_type": 0, "_cutDirection": 0},
        {"_time": 2, "_lineIndex": 4, "_lineLayer": 0, "_type": 0, "_cutDirection": 0},
        {"_time": 2, "_lineIndex": 2500, "_lineLayer": 1000, "_type": 0, "_cutDirection": 0},
        {"_time": 2, "_lineIndex": 0, "_lineLayer": 1.5, "_type": 1, "_cutDirection": 0},
        {"_time": 2, "_lineIndex": 0, "_lineLayer": 0, "_type": 1, "_cutDirection": 1045},
        {"_time": 2, "_lineIndex": 0, "_lineLayer": 0, "_type": 1, "_cutDirection": 9}],
        "_events": [{"_time": 8, "_type": 100, "_value": 0, "_floatValue": 140}]}
    v4 = {"version": "4.0.0", "colorNotes": [{"b": 1, "i": 5}, {"b": 1, "i": 0.5}, {"b": 2}],
          "colorNotesData": [{"x": 1}], "bombNotes": [{}, {}], "obstacles": [{}]}
    beatmap = read_map(write_map(tmp_path / "map.zip", v2_info({("Standard", "Expert"): "v2.dat",
                                                                 ("Standard", "Hard"): "v4.dat"}),
                                 {"v2.dat": v2, "v4.dat": v4}))
    expert = beatmap.difficulties[("Standard", "Expert")]
    assert expert.notes == [Note(1.0, 1, 0, 0, 1)] and expert.bombs == 1
    assert expert.dropped == Counter({"color out of range": 1, "beat not finite": 1, "beat negative": 1,
                                      "x out of range": 1, "mapping extensions position": 1, "y out of range": 1,
                                      "mapping extensions direction": 1, "direction out of range": 1})
    assert expert.bpm_changes == [(8.0, 140.0)]
    hard = beatmap.difficulties[("Standard", "Hard")]
    assert hard.notes == [Note(2.0, 1, 0, 0, 0)] and (hard.bombs, hard.obstacles) == (2, 1)
    assert hard.dropped == Counter({"data index out of range": 2})


def test_whole_file_problems_break_one_difficulty(tmp_path):
    names = ("Easy", "Normal", "Hard", "Expert", "ExpertPlus", "Huge")
    difficulties = {("Standard", name): f"{name}.dat" for name in names}
    files = {"Easy.dat": b'{"version": "3.3.0", "colorNotes": [', "Normal.dat": {"version": "3.3.0", "colorNotes": [{"x": "1"}]},
             "Hard.dat": b"\xff\xfe not utf-8", "Expert.dat": v3_difficulty([(1, 1, 1, 1, 1)]),
             "Huge.dat": {"version": "3.3.0", "colorNotes": [{"b": 10**400}]}}
    beatmap = read_map(write_map(tmp_path / "map.zip", v2_info(difficulties), files))
    assert list(beatmap.difficulties) == [("Standard", "Expert")]
    assert beatmap.broken[("Standard", "Easy")].startswith("Easy.dat: broken JSON")
    assert beatmap.broken[("Standard", "Normal")] == "Normal.dat: colorNotes[0].x is string, expected number"
    assert beatmap.broken[("Standard", "Hard")] == "Hard.dat: not UTF-8 text"
    assert beatmap.broken[("Standard", "ExpertPlus")] == "ExpertPlus.dat: file missing"
    assert beatmap.broken[("Standard", "Huge")] == "Huge.dat: colorNotes[0].b is an integer too large, expected number"


@pytest.mark.parametrize("content, reason", [
    (None, "not a readable zip file"),
    (b"PK\x05\x06" + bytes(18), "no Info.dat"),
    ({"Info.dat": b"{"}, "Info.dat: broken JSON"),
    ({"Info.dat": b"[]"}, "Info.dat: top level is list, expected object"),
    ({"Info.dat": {**v2_info(EXPERT), "_beatsPerMinute": "120"}}, "Info.dat: _beatsPerMinute is string, expected number"),
    ({"Info.dat": {**v2_info(EXPERT), "_beatsPerMinute": -5}},
     "Info.dat: BPM -5.0 outside 10..1000 (MIN_BPM, MAX_BPM)"),
    ({"Info.dat": {"difficultyLevels": []}}, "Info.dat: neither a v2 nor a v4 Info.dat"),
    ({"Info.dat": {"version": "4.0.0", "audio": {"bpm": 120, "audioDataFilename": "AudioData.dat"},
                   "difficultyBeatmaps": []}}, "AudioData.dat: file missing"),
    ({"a/Info.dat": b"{}", "b/info.dat": b"{}"}, "several Info.dat files"),
])
def test_bad_maps_raise_value_error_naming_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.zip"
    if content is None:
        path.write_bytes(b"this is not a zip")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            for name, value in content.items():
                archive.writestr(name, value if isinstance(value, bytes) else json.dumps(value))
    with pytest.raises(ValueError) as error:
        read_map(path)
    assert str(error.value).startswith(f"{path}: {reason}")


def test_missing_path_and_size_limits(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such file or folder"):
        read_map(tmp_path / "nothing.zip")
    no_song = write_map(tmp_path / "no_song.zip", v2_info(EXPERT), {"Expert.dat": v3_difficulty([])})
    with pytest.raises(ValueError, match=f"^{no_song}: song.egg: file missing$"):
        read_map(no_song).read_audio()
    path = write_map(tmp_path / "map.zip", v2_info(EXPERT), {"Expert.dat": v3_difficulty([(1, 1, 1, 1, 1)]),
                                                             "song.egg": bytes(5000)})
    monkeypatch.setattr(maps, "MAX_AUDIO_BYTES", 4999)
    with pytest.raises(ValueError, match="song.egg: 5000 bytes, more than the limit of 4999"):
        read_map(path).read_audio()
    monkeypatch.setattr(maps, "MAX_DAT_BYTES", 100)
    with pytest.raises(ValueError, match="Info.dat: .* bytes, more than the limit of 100"):
        read_map(path)
    monkeypatch.setattr(maps, "MAX_ENTRIES", 2)
    with pytest.raises(ValueError, match="more than 2 files"):
        read_map(path)


def test_gzip_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(maps, "MAX_DAT_BYTES", 10_000)
    bomb = gzip.compress(b'{"version": "4.0.0", "colorNotes": [' + b" " * 100_000 + b"]}")
    beatmap = read_map(write_map(tmp_path / "map.zip", v2_info(EXPERT), {"Expert.dat": bomb}))
    assert "inflates past the limit" in beatmap.broken[("Standard", "Expert")]


# ---- malformed input: only ValueError ----

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -2**64]) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read_or_value_error(path):
    try:
        return read_map(path)
    except ValueError as error:
        assert str(error).startswith(f"{path}: ")
        return None


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_as_zip(tmp_path, data):
    path = tmp_path / "random.zip"
    path.write_bytes(data)
    assert read_or_value_error(path) is None


@PROPERTY_SETTINGS
@given(fields=st.dictionaries(st.sampled_from(["b", "x", "y", "c", "d", "i", "_time", "_lineIndex", "_lineLayer",
                                               "_type", "_cutDirection", "tb", "tx", "ty", "sc", "s", "m"]),
                              JSON_VALUES, max_size=6),
       top=st.dictionaries(st.sampled_from(["version", "_version", "colorNotes", "bpmEvents", "_events"]),
                           JSON_VALUES, max_size=2))
def test_random_json_in_note_fields(tmp_path, fields, top):
    v2 = {"_version": "2.2.0", "_notes": [fields], "_events": [{"_type": 100, **fields}]}
    v3 = {"version": "3.3.0", "colorNotes": [fields], "burstSliders": [fields], "bpmEvents": [fields]}
    v4 = {"version": "4.0.0", "colorNotes": [fields], "colorNotesData": [fields], "chains": [fields],
          "chainsData": [fields]}
    difficulties = {("Standard", name): f"{name}.dat" for name in ("Hard", "Expert", "ExpertPlus", "Easy")}
    files = {"Hard.dat": v2, "Expert.dat": v3, "ExpertPlus.dat": v4, "Easy.dat": {**v3, **top}}
    path = tmp_path / "fields.zip"
    path.unlink(missing_ok=True)
    beatmap = read_map(write_map(path, v2_info(difficulties), files))
    assert len(beatmap.difficulties) + len(beatmap.broken) == 4
    for difficulty in beatmap.difficulties.values():
        for note in difficulty.notes:
            assert math.isfinite(note.beat) and note.beat >= 0
            assert note.x in range(4) and note.y in range(3) and note.color in (0, 1) and note.direction in range(9)


@PROPERTY_SETTINGS
@given(key=st.sampled_from(["_version", "_beatsPerMinute", "_songTimeOffset", "_songFilename",
                            "_difficultyBeatmapSets", "_songName"]),
       value=JSON_VALUES)
def test_random_json_in_info_fields(tmp_path, key, value):
    path = tmp_path / "info.zip"
    path.unlink(missing_ok=True)
    read_or_value_error(write_map(path, {**v2_info(EXPERT), key: value}, {"Expert.dat": v3_difficulty([])}))


@pytest.fixture(scope="module")
def small_map_zip():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("Info.dat", json.dumps(v2_info(EXPERT)))
        archive.writestr("Expert.dat", json.dumps(v3_difficulty([(b / 2, b % 4, b % 3, b % 2, b % 9)
                                                                 for b in range(200)])))
        archive.writestr("song.egg", os.urandom(2000))
    return buffer.getvalue()


@PROPERTY_SETTINGS
@given(cut=st.floats(0, 1), flip=st.tuples(st.floats(0, 1), st.integers(1, 255)))
def test_truncated_and_corrupted_zips(tmp_path, small_map_zip, cut, flip):
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(small_map_zip[: int(cut * len(small_map_zip))])
    read_or_value_error(truncated)
    corrupted = bytearray(small_map_zip)
    corrupted[int(flip[0] * (len(corrupted) - 1))] ^= flip[1]
    path = tmp_path / "corrupted.zip"
    path.write_bytes(bytes(corrupted))
    beatmap = read_or_value_error(path)
    if beatmap is not None:
        try:
            beatmap.read_audio()
        except ValueError as error:
            assert str(error).startswith(f"{path}: song.egg: ")


def test_level_hash_v2_and_v4(tmp_path):
    info2 = json.dumps({"_difficultyBeatmapSets": [{"_difficultyBeatmaps": [
        {"_beatmapFilename": "ExpertStandard.dat"}, {"_beatmapFilename": "Missing.dat"},
        {"_beatmapFilename": "HardStandard.dat"}]}]}).encode()
    path = tmp_path / "v2.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in {"info.dat": info2, "hardstandard.dat": b"H", "ExpertStandard.dat": b"E",
                           "song.egg": b"x"}.items():
            archive.writestr(name, data)
    assert maps.level_hash(path) == hashlib.sha1(info2 + b"E" + b"H").hexdigest()
    info4 = json.dumps({"audio": {"audioDataFilename": "AudioData.dat"}, "difficultyBeatmaps": [
        {"beatmapDataFilename": "Easy.dat", "lightshowDataFilename": "Lights.dat"},
        {"beatmapDataFilename": "Hard.dat", "lightshowDataFilename": "Lights.dat"}]}).encode()
    files = {"AudioData.dat": b"A", "Easy.dat": b"e", "Hard.dat": b"h", "Lights.dat": b"L"}
    expected = hashlib.sha1(info4 + b"A" + b"e" + b"L" + b"h" + b"L").hexdigest()
    assert maps.level_hash(write_map(tmp_path / "v4.zip", info4, files)) == expected
    assert maps.level_hash(write_map(tmp_path / "v4_folder", info4, files)) == expected
    with pytest.raises(ValueError, match=r"bad: Info.dat: top level is list"):
        maps.level_hash(write_map(tmp_path / "bad", b"[]", {}))


# ---- ZippedBeatSaberDataset ----

def test_dataset_keeps_usable_difficulties_and_counts_skips(tmp_path, caplog):
    song = os.urandom(3000)
    notes = [(1, 1, 0, 0, 1), (2, 2, 0, 1, 1)]
    both = {("Standard", "Expert"): "E.dat", ("Standard", "ExpertPlus"): "EP.dat"}
    good = {"E.dat": v3_difficulty(notes), "EP.dat": v3_difficulty(notes[:1]), "song.egg": song}
    write_map(tmp_path / "good.zip", v2_info(both), good)
    write_map(tmp_path / "folder_map", v2_info(both), good)
    write_map(tmp_path / "hard_only.zip", v2_info({("Standard", "Hard"): "E.dat"}), good)
    write_map(tmp_path / "one_saber.zip", v2_info({("OneSaber", "Expert"): "E.dat"}), good)
    write_map(tmp_path / "offset.zip", v2_info(both, offset_s=0.25), good)
    write_map(tmp_path / "no_song.zip", v2_info(both, song="missing.ogg"), good)
    expert = {("Standard", "Expert"): "E.dat"}
    write_map(tmp_path / "noodle.zip", v2_info(expert, requirements=["Noodle Extensions"]), good)
    write_map(tmp_path / "tempo.zip", v2_info(both), {**good, "E.dat": v3_difficulty(notes, [(0, 120), (16, 90)])})
    write_map(tmp_path / "empty.zip", v2_info(expert), {**good, "E.dat": v3_difficulty([])})
    write_map(tmp_path / "broken.zip", v2_info(both), {**good, "EP.dat": b"{"})
    write_map(tmp_path / "mapping_ext.zip", v2_info(expert), {**good, "E.dat": v3_difficulty([(1, 1500, 0, 0, 1)])})
    (tmp_path / "garbage.zip").write_bytes(os.urandom(100))
    (tmp_path / "readme.txt").write_text("not a map")
    with caplog.at_level(logging.INFO, logger="maps"):
        dataset = ZippedBeatSaberDataset(tmp_path)
    assert dataset.skipped == Counter({
        "difficulty absent": 1, "characteristic absent": 1, "song time offset": 1, "missing audio file": 1,
        "requires Noodle Extensions": 1, "bpm changes": 1, "no notes": 1, "broken difficulty file": 1,
        "dropped notes": 1, "unreadable map": 1})
    assert len(caplog.records) == sum(dataset.skipped.values())
    assert all("skipped " + str(tmp_path) in record.getMessage() for record in caplog.records)
    # good.zip and folder_map: 2 each; tempo.zip and broken.zip: 1 each
    assert len(dataset) == 6
    assert sorted((Path(item.source).name, item.difficulty) for item in dataset.items) == [
        ("broken.zip", "Expert"), ("folder_map", "Expert"), ("folder_map", "ExpertPlus"),
        ("good.zip", "Expert"), ("good.zip", "ExpertPlus"), ("tempo.zip", "ExpertPlus")]
    item = dataset[0]
    assert (item.characteristic, item.bpm, item.audio_filename) == ("Standard", 120.0, "song.egg")
    assert item.notes[0] == Note(1.0, 1, 0, 0, 1)
    assert all(item.read_audio() == song for item in dataset.items)


def test_dataset_other_characteristic_and_difficulties(tmp_path):
    write_map(tmp_path / "a.zip", v2_info({("OneSaber", "Hard"): "H.dat"}),
              {"H.dat": v3_difficulty([(1, 1, 0, 0, 1)]), "song.egg": b"x"})
    dataset = ZippedBeatSaberDataset(tmp_path, characteristic="OneSaber", difficulties=("Hard",))
    assert len(dataset) == 1 and dataset[0].difficulty == "Hard" and not dataset.skipped
    with pytest.raises(ValueError, match="not a directory"):
        ZippedBeatSaberDataset(tmp_path / "a.zip")


def test_dataset_chain_notes(tmp_path):
    # a chain of 3 pieces from (1, 0) at beat 2 to (1, 2) at beat 3, its head under a colour note
    difficulty = v3_difficulty([(1, 0, 0, 0, 1), (2, 1, 0, 1, 1)])
    difficulty["burstSliders"] = [{"b": 2, "x": 1, "y": 0, "c": 1, "d": 1, "tb": 3, "tx": 1, "ty": 2, "sc": 3, "s": 1}]
    write_map(tmp_path / "chain.zip", v2_info(EXPERT), {"Expert.dat": difficulty, "song.egg": b"x"})
    plain = ZippedBeatSaberDataset(tmp_path)
    assert plain[0].notes == [Note(1.0, 0, 0, 0, 1), Note(2.0, 1, 0, 1, 1)]
    with_chains = ZippedBeatSaberDataset(tmp_path, chain_notes=utils.chains_to_notes)
    assert with_chains[0].notes == plain[0].notes + [Note(2.5, 1, 1, 1, 1), Note(3.0, 1, 2, 1, 1)]
    with pytest.raises(TypeError, match="chain_notes must be None or a callable"):
        ZippedBeatSaberDataset(tmp_path, chain_notes=True)
