"""Tests for maps.py against hostile or absurd input: each builds its input here (no binary fixtures) and expects a
ValueError (MapTooLarge for a size limit) naming the file and the limit, or a counted drop or skip, within bounded
time and memory. Families: zips that decompress badly or enormously, unsafe paths and names, values the game would
never load, unreadable entries of a maps directory; then a seeded fuzz over the shared fixture maps."""

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections import Counter

import pytest

import maps
import utils
from conftest import ROOT
from maps import MapTooLarge, Note, ZippedBeatSaberDataset, level_hash, read_map, verify_zip
from test_maps import EXPERT, FIXTURES, REAL_MAPS, needs_shared, v2_info, v3_difficulty, write_map

METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
METHOD_NAMES = ("stored", "deflate", "bzip2", "lzma")


def bounded(call, seconds=5.0, mib=32):
    """call() → its result, or the ValueError it raised; asserts it took under `seconds` and, unless mib is None,
    that its allocations (tracemalloc: Python objects and zlib's, bz2's and lzma's buffers) peaked under mib MiB."""
    if mib is not None:
        tracemalloc.start()
    start_s = time.perf_counter()
    try:
        result = call()
    except ValueError as error:
        result = error
    finally:
        elapsed_s = time.perf_counter() - start_s
        if mib is not None:
            peak_bytes = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert elapsed_s < seconds, f"took {elapsed_s:.1f} s"
    assert mib is None or peak_bytes < mib * 2**20, f"allocated {peak_bytes / 2**20:.0f} MiB"
    return result


def zip_bytes(members, method=zipfile.ZIP_DEFLATED) -> bytes:
    """{name: bytes or JSON value} → a zip written with zipfile.ZipInfo names as given (no normalising)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, value in members.items():
            data = value if isinstance(value, bytes) else json.dumps(value).encode()
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return buffer.getvalue()


def data_span(data, name) -> tuple[int, int]:
    """A zip's bytes, a member name → (start, end) of that member's compressed data in the bytes."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    return start, start + info.compress_size


COMPRESSED_SIZE, UNCOMPRESSED_SIZE = 20, 24   # offsets of 4-byte fields in a central directory entry


def set_size(data, name, field, size_bytes) -> bytes:
    """A zip's bytes with member `name`'s central directory field (COMPRESSED_SIZE or UNCOMPRESSED_SIZE) set."""
    data = bytearray(data)
    i = data.find(b"PK\x01\x02")
    while i >= 0:
        name_length = struct.unpack("<H", data[i + 28:i + 30])[0]
        if data[i + 46:i + 46 + name_length] == name.encode():
            data[i + field:i + field + 4] = struct.pack("<L", size_bytes)
        i = data.find(b"PK\x01\x02", i + 4)
    return bytes(data)


def write(path, data) -> str:
    path.write_bytes(data)
    return str(path)


def map_members(difficulty=None, **files):
    """Members of a small valid map: Info.dat listing Expert.dat, Expert.dat, song.egg, plus files."""
    return {"Info.dat": v2_info(EXPERT), "Expert.dat": difficulty or v3_difficulty([(1, 1, 0, 0, 1)]),
            "song.egg": os.urandom(500), **files}


# ---- 1. zips that decompress badly or enormously ----

@pytest.mark.parametrize("method", METHODS[1:], ids=METHOD_NAMES[1:])
@pytest.mark.parametrize("member", ["Info.dat", "Expert.dat"])
def test_corrupt_compressed_data_is_a_value_error_naming_the_member(tmp_path, method, member):
    # a difficulty of 300 notes, so each member's compressed data has a middle to corrupt
    difficulty = v3_difficulty([(b / 4, b % 4, b % 3, b % 2, b % 9) for b in range(300)])
    data = bytearray(zip_bytes(map_members(difficulty), method))
    start, end = data_span(bytes(data), member)
    middle = (start + end) // 2
    data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
    path = write(tmp_path / "corrupt.zip", bytes(data))
    for call in (read_map, level_hash, verify_zip):
        outcome = bounded(lambda: call(path))
        if call is read_map and member == "Expert.dat":
            assert outcome.broken[("Standard", "Expert")].startswith("Expert.dat: broken zip data")
        else:
            assert type(outcome) is ValueError and str(outcome).startswith(f"{path}: {member}: broken zip data")


@pytest.mark.parametrize("method", METHODS[1:], ids=METHOD_NAMES[1:])
def test_member_that_inflates_past_its_declared_size_is_bounded(tmp_path, method):
    # 40 MB of zeros declared as 100 bytes: zipfile's own reader inflated a whole bzip2/LZMA chunk (and deflate
    # up to the read size) before noticing, > 100 MiB for this
    data = set_size(zip_bytes(map_members(b"\0" * 40_000_000), method), "Expert.dat", UNCOMPRESSED_SIZE, 100)
    path = write(tmp_path / "bomb.zip", data)
    beatmap = bounded(lambda: read_map(path), mib=8)
    assert beatmap.broken[("Standard", "Expert")] == (
        "Expert.dat: broken zip data (it does not unpack to the declared 100 bytes)")
    error = bounded(lambda: verify_zip(path), mib=8)
    assert type(error) is ValueError and str(error).startswith(f"{path}: Expert.dat: broken zip data")


def test_lzma_member_claiming_a_huge_dictionary_reads_in_little_memory(tmp_path):
    data = bytearray(zip_bytes(map_members(), zipfile.ZIP_LZMA))
    start, _ = data_span(bytes(data), "Expert.dat")
    # the member's data: LZMA SDK version (2 bytes), properties length (2), lc/lp/pb (1), dictionary size (4)
    data[start + 5:start + 9] = struct.pack("<L", 0xFFFFFFFF)
    path = write(tmp_path / "dict.zip", bytes(data))
    beatmap = bounded(lambda: read_map(path), mib=8)
    assert beatmap.difficulties[("Standard", "Expert")].notes == [Note(1.0, 1, 0, 0, 1)]


def test_member_compressed_past_the_ratio_limit_is_too_large(tmp_path):
    # 8 MiB of a valid difficulty padded with spaces: deflate packs it ~1000 to 1
    padded = b'{"version": "3.3.0", "colorNotes": [' + b" " * 8 * 2**20 + b"]}"
    path = write(tmp_path / "ratio.zip", zip_bytes(map_members(padded)))
    beatmap = bounded(lambda: read_map(path))
    reason = beatmap.broken[("Standard", "Expert")]
    assert reason.startswith("Expert.dat: ") and "(MAX_COMPRESSION_RATIO)" in reason
    error = bounded(lambda: verify_zip(path))
    assert type(error) is MapTooLarge and str(error).startswith(f"{path}: Expert.dat: ")
    assert "(MAX_COMPRESSION_RATIO)" in str(error)


def test_zip_bomb_of_tiny_json_objects_is_too_large(tmp_path):
    # 4 million empty v4 notes ({} is a valid note at beat 0): 12 MB of JSON deflated to ~12 KB
    bomb = b'{"version": "4.0.0", "colorNotesData": [{}], "colorNotes": [' + b"{}," * 4_000_000 + b"{}]}"
    path = write(tmp_path / "objects.zip", zip_bytes(map_members(bomb)))
    beatmap = bounded(lambda: read_map(path))
    assert "more than the limit of 200 to 1 (MAX_COMPRESSION_RATIO)" in beatmap.broken[("Standard", "Expert")]
    # the same bytes stored, or in a folder: no ratio to speak of, the object count refuses them before parsing
    stored = write(tmp_path / "stored.zip", zip_bytes(map_members(bomb), zipfile.ZIP_STORED))
    folder = write_map(tmp_path / "folder", v2_info(EXPERT), {"Expert.dat": bomb})
    for source in (stored, folder):
        reason = bounded(lambda: read_map(source)).broken[("Standard", "Expert")]
        assert reason.startswith("Expert.dat: ") and reason.endswith("(MAX_MAP_JSON_OBJECTS)")


def test_json_objects_are_counted_across_the_map(tmp_path, monkeypatch):
    # four difficulties of 1,000 light events each, under a limit of 3,500 for the map (the real limit, 10^6,
    # works the same, only slower to show): each file alone is fine, the fourth passes the map's limit
    monkeypatch.setattr(maps, "MAX_MAP_JSON_OBJECTS", 3500)
    names = ("Easy", "Normal", "Hard", "Expert")
    difficulty = {**v3_difficulty([(1, 1, 0, 0, 1)]), "basicBeatmapEvents": [{"b": b} for b in range(1000)]}
    files = {f"{name}.dat": difficulty for name in names}
    path = write_map(tmp_path / "map.zip", v2_info({("Standard", name): f"{name}.dat" for name in names}), files)
    beatmap = bounded(lambda: read_map(path))
    assert sorted(beatmap.difficulties) == [("Standard", name) for name in ("Easy", "Hard", "Normal")]
    assert beatmap.broken[("Standard", "Expert")].endswith("more than the limit of 3500 (MAX_MAP_JSON_OBJECTS)")


def test_more_notes_than_the_limit_break_the_difficulty(tmp_path, monkeypatch):
    # under a limit of 1,000 (the real one, 10^5, works the same): 1,001 colour notes; and 11 chains of 100
    # pieces, all sharing one chainsData entry (a tiny file that stands for many notes)
    monkeypatch.setattr(maps, "MAX_NOTES", 1000)
    notes = v3_difficulty([(i / 8, i % 4, 0, 0, 1) for i in range(1001)])
    chains = {"version": "4.0.0", "colorNotesData": [{"x": 1, "d": 1}],
              "chainsData": [{"tx": 1, "ty": 2, "c": 100, "s": 1}],
              "chains": [{"hb": i, "tb": i + 0.5, "i": 0, "ci": 0} for i in range(11)]}
    difficulties = {("Standard", "Expert"): "Expert.dat", ("Standard", "Hard"): "Hard.dat",
                    ("Standard", "Easy"): "Easy.dat"}
    path = write_map(tmp_path / "map.zip", v2_info(difficulties),
                     {"Expert.dat": notes, "Hard.dat": chains, "Easy.dat": {**chains, "chains": chains["chains"][:10]}})
    beatmap = bounded(lambda: read_map(path))
    assert beatmap.broken == {
        ("Standard", "Expert"): "Expert.dat: 1001 notes and chain pieces, more than the limit of 1000 (MAX_NOTES)",
        ("Standard", "Hard"): "Hard.dat: 1100 notes and chain pieces, more than the limit of 1000 (MAX_NOTES)"}
    assert len(beatmap.difficulties[("Standard", "Easy")].chains) == 10


def big_json_file(n_bytes):
    """A valid difficulty of about n_bytes that does not compress (a random string in customData)."""
    difficulty = {**v3_difficulty([(1, 1, 0, 0, 1)]), "customData": {"x": os.urandom(n_bytes // 2).hex()}}
    return json.dumps(difficulty).encode()


def test_info_listing_one_file_thousands_of_times_is_refused_fast(tmp_path):
    listings = {("Standard", f"D{i}"): "Expert.dat" for i in range(1000)}
    path = write_map(tmp_path / "map.zip", v2_info(listings), {"Expert.dat": big_json_file(2 * 2**20)})
    for call in (read_map, level_hash, verify_zip):
        error = bounded(lambda: call(path), mib=64)
        assert type(error) is MapTooLarge
        assert str(error) == (f"{path}: Info.dat: 1000 difficulties listed, more than the limit of 200 "
                              f"(MAX_DIFFICULTIES)")


def test_bytes_read_are_counted_across_the_map(tmp_path):
    # 40 listings of one 2 MiB file: read_map reads it until 64 MiB are read in all, then reads nothing more
    listings = {("Standard", f"D{i}"): "Expert.dat" for i in range(40)}
    path = write_map(tmp_path / "map.zip", v2_info(listings), {"Expert.dat": big_json_file(2 * 2**20)})
    sizes = {info.filename: info.file_size for info in zipfile.ZipFile(path).infolist()}
    readable = (maps.MAX_MAP_DAT_BYTES - sizes["Info.dat"]) // sizes["Expert.dat"]
    beatmap = bounded(lambda: read_map(path), seconds=10, mib=64)
    assert len(beatmap.difficulties) == readable == 31 and len(beatmap.broken) == 40 - readable
    over_bytes = sizes["Info.dat"] + (readable + 1) * sizes["Expert.dat"]
    assert set(beatmap.broken.values()) == {f"Expert.dat: the map's JSON files read come to {over_bytes} bytes, "
                                            f"more than the limit of {64 * 2**20} (MAX_MAP_DAT_BYTES)"}
    error = bounded(lambda: level_hash(path), mib=64)
    assert type(error) is MapTooLarge and str(error).startswith(f"{path}: Expert.dat: ")
    assert str(error).endswith(f"more than the limit of {64 * 2**20} (MAX_MAP_DAT_BYTES)")


def test_level_hash_of_a_file_listed_twice_hashes_it_twice(tmp_path):
    info = json.dumps(v2_info({("Standard", "Expert"): "E.dat", ("Standard", "Hard"): "E.dat"})).encode()
    path = write(tmp_path / "map.zip", zip_bytes({"Info.dat": info, "E.dat": b"{}"}, zipfile.ZIP_BZIP2))
    assert level_hash(path) == verify_zip(path) == hashlib.sha1(info + b"{}" + b"{}").hexdigest()


def test_verify_zip_reads_every_member_and_keeps_level_hash(tmp_path):
    members = map_members(**{"cover.jpg": os.urandom(3000), "extra/readme.txt": b"hello" * 100})
    good = write(tmp_path / "good.zip", zip_bytes(members, zipfile.ZIP_LZMA))
    assert verify_zip(good) == level_hash(good)
    assert verify_zip(good, max_unzipped_bytes=10**6) == level_hash(good)
    unzipped_bytes = sum(info.file_size for info in zipfile.ZipFile(good).infolist())
    error = bounded(lambda: verify_zip(good, max_unzipped_bytes=unzipped_bytes - 1))
    assert type(error) is MapTooLarge
    assert str(error) == (f"{good}: unzips to {unzipped_bytes} bytes, more than max_unzipped_bytes = "
                          f"{unzipped_bytes - 1}")
    # a member read_map never opens: read_map and level_hash are fine, verify_zip is not
    data = bytearray(zip_bytes(members))
    start, end = data_span(bytes(data), "extra/readme.txt")
    data[(start + end) // 2] ^= 0xFF
    bad = write(tmp_path / "bad.zip", bytes(data))
    assert read_map(bad).difficulties and level_hash(bad) == level_hash(good)
    error = pytest.raises(ValueError, verify_zip, bad).value
    assert type(error) is ValueError
    assert str(error).startswith(f"{bad}: extra/readme.txt: broken zip data")


@pytest.mark.parametrize("content, reason", [
    (b"not a zip at all", "not a readable zip file"),
    (zip_bytes({"Expert.dat": b"{}"}), "no Info.dat in the zip"),
    (zip_bytes({"Info.dat": b"[]"}), "Info.dat: top level is list"),
])
def test_verify_zip_refuses_what_is_not_a_map_zip(tmp_path, content, reason):
    path = write(tmp_path / "x.zip", content)
    error = pytest.raises(ValueError, verify_zip, path).value
    assert type(error) is ValueError and str(error).startswith(f"{path}: {reason}")
    folder = write_map(tmp_path / "folder", v2_info(EXPERT), {"Expert.dat": v3_difficulty([])})
    assert str(pytest.raises(ValueError, verify_zip, folder).value) == f"{folder}: not a zip file"


def test_total_declared_size_and_overlapping_members(tmp_path, monkeypatch):
    members = map_members(**{"song.egg": os.urandom(5000)})
    path = write(tmp_path / "map.zip", zip_bytes(members, zipfile.ZIP_STORED))
    monkeypatch.setattr(maps, "MAX_MAP_BYTES", 5000)
    for call in (read_map, level_hash, verify_zip):
        error = pytest.raises(MapTooLarge, call, path).value
        assert str(error).startswith(f"{path}: unzips to ") and str(error).endswith(
            "bytes, more than the limit of 5000 (MAX_MAP_BYTES)")
    monkeypatch.undo()
    # three central-directory entries pointing at song.egg's one copy of data: 15,000 bytes "in" a 6 KB zip
    data = zip_bytes(members, zipfile.ZIP_STORED)
    directory_start, end_start = data.find(b"PK\x01\x02"), data.find(b"PK\x05\x06")
    entries = data[directory_start:end_start]
    # song.egg's entry: 46 fixed bytes (name length 8, no extra field or comment), then the name
    song_start = entries.find(b"song.egg") - 46
    copies = b"".join(entries[song_start:song_start + 46] + f"son{i}.egg".encode() for i in range(2))
    end_record = bytearray(data[end_start:])
    count = struct.unpack("<H", end_record[10:12])[0] + 2
    end_record[8:12] = struct.pack("<HH", count, count)
    end_record[12:16] = struct.pack("<L", len(entries) + len(copies))
    overlapped = write(tmp_path / "overlap.zip", data[:directory_start] + entries + copies + bytes(end_record))
    assert len(zipfile.ZipFile(overlapped).infolist()) == 5
    for call in (read_map, verify_zip):
        error = pytest.raises(ValueError, call, overlapped).value
        assert str(error) == f"{overlapped}: members overlap (their compressed sizes add up to more than the zip file)"


# ---- 2. paths and names ----

@pytest.mark.parametrize("name, reason", [
    ("../Expert.dat", "empty, '.' or '..' path component"),
    ("maps/../../x.dat", "empty, '.' or '..' path component"),
    ("./Info.dat", "empty, '.' or '..' path component"),
    ("a//b.dat", "empty, '.' or '..' path component"),
    ("/etc/passwd", "absolute path"),
    ("/Info.dat", "absolute path"),
    ("C:/Windows/x.dat", "drive letter"),
    ("c:x.dat", "drive letter"),
    ("sub\\Expert.dat", "backslash in the name"),
    ("..\\..\\x.dat", "backslash in the name"),
    ("Info.dat\0.txt", "NUL byte in the name"),
])
def test_unsafe_member_names_are_refused_naming_the_member(tmp_path, name, reason):
    # zipfile drops everything from a NUL on: write a same-length stand-in and put the NUL into the bytes
    stand_in = name.replace("\0", "#")
    data = zip_bytes(map_members(**{stand_in: b"{}"})).replace(stand_in.encode(), name.encode())
    path = write(tmp_path / "names.zip", data)
    for call in (read_map, level_hash, verify_zip):
        error = pytest.raises(ValueError, call, path).value
        assert type(error) is ValueError and str(error) == f"{path}: {name!r}: {reason}"


def test_duplicate_and_case_duplicate_members_are_refused(tmp_path):
    cases = {"dup": [("Expert.dat", v3_difficulty([(1, 1, 0, 0, 1)])), ("Expert.dat", v3_difficulty([]))],
             "case": [("expert.DAT", v3_difficulty([]))],
             "info": [("info.dat", v2_info(EXPERT))]}
    expected = {"dup": "'Expert.dat': two members of that name",
                "case": "'expert.DAT': same name as 'Expert.dat' but for case",
                "info": "'info.dat': same name as 'Info.dat' but for case"}
    for label, extra in cases.items():
        buffer = io.BytesIO()
        with pytest.warns(UserWarning) if label == "dup" else contextlib.nullcontext(), \
                zipfile.ZipFile(buffer, "w") as archive:
            for name, value in list(map_members().items()) + extra:
                archive.writestr(name, json.dumps(value) if not isinstance(value, bytes) else value)
        path = write(tmp_path / f"{label}.zip", buffer.getvalue())
        for call in (read_map, level_hash, verify_zip):
            assert str(pytest.raises(ValueError, call, path).value) == f"{path}: {expected[label]}"


def test_case_duplicate_files_in_a_folder_are_refused(tmp_path):
    folder = write_map(tmp_path / "map", v2_info(EXPERT), {"Expert.dat": v3_difficulty([(1, 1, 0, 0, 1)])})
    (folder / "EXPERT.dat").write_text("{}")
    if len({path.name.lower() for path in folder.iterdir()}) == len(list(folder.iterdir())):
        pytest.skip("case-insensitive filesystem: the two names are one file")
    error = pytest.raises(ValueError, read_map, folder).value
    assert "same name as" in str(error) and "but for case" in str(error) and str(error).startswith(f"{folder}: ")


def test_folders_and_one_wrapping_folder_in_a_zip_are_fine(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("Bite Me/"), b"")
        archive.writestr(zipfile.ZipInfo("Bite Me/autosaves/"), b"")
        for name, value in map_members().items():
            archive.writestr("Bite Me/" + name, value if isinstance(value, bytes) else json.dumps(value))
    path = write(tmp_path / "wrapped.zip", buffer.getvalue())
    assert read_map(path).difficulties[("Standard", "Expert")].notes == [Note(1.0, 1, 0, 0, 1)]
    assert verify_zip(path) == level_hash(path)


@pytest.mark.parametrize("link", ["song.egg", "Expert.dat", "Info.dat", "autosaves"])
def test_links_in_a_map_folder_are_refused(tmp_path, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(json.dumps(v3_difficulty([(1, 1, 0, 0, 1)])).encode())
    files = {name: value for name, value in map_members().items() if name not in (link, "Info.dat")}
    folder = write_map(tmp_path / "map", v2_info(EXPERT), files)
    if link == "Info.dat":
        (folder / "Info.dat").unlink()
        (outside / "secret").write_text(json.dumps(v2_info(EXPERT)))
    (folder / link).symlink_to(outside if link == "autosaves" else outside / "secret")
    for call in (read_map, level_hash):
        error = pytest.raises(ValueError, call, folder).value
        assert str(error) == f"{folder}: {link}: a symbolic link (a map's files must lie in its folder)"


def test_special_files_in_a_map_folder_are_refused_and_subfolders_ignored(tmp_path):
    folder = write_map(tmp_path / "map", v2_info(EXPERT), {"Expert.dat": v3_difficulty([(1, 1, 0, 0, 1)])})
    (folder / "autosaves").mkdir()
    (folder / "autosaves" / "Info.dat").write_text("not JSON")
    assert read_map(folder).difficulties[("Standard", "Expert")].notes == [Note(1.0, 1, 0, 0, 1)]
    os.mkfifo(folder / "song.egg")   # reading a FIFO would wait for a writer forever
    error = bounded(lambda: read_map(folder))
    assert str(error) == f"{folder}: song.egg: not a regular file"


def test_backslash_in_a_name_listed_in_info_is_refused(tmp_path):
    info = v2_info({("Standard", "Expert"): "sub\\Expert.dat", ("Standard", "Hard"): "Hard.dat"})
    files = {"sub/Expert.dat": v3_difficulty([(1, 1, 0, 0, 1)]), "Hard.dat": v3_difficulty([(1, 1, 0, 0, 1)])}
    path = write(tmp_path / "map.zip", zip_bytes({"Info.dat": info, **files}))
    beatmap = read_map(path)
    assert beatmap.broken == {("Standard", "Expert"): "sub\\Expert.dat: backslash in the file name"}
    assert list(beatmap.difficulties) == [("Standard", "Hard")]
    assert str(pytest.raises(ValueError, level_hash, path).value) == (
        f"{path}: sub\\Expert.dat: backslash in the file name")
    song = write(tmp_path / "song.zip", zip_bytes({"Info.dat": v2_info(EXPERT, song="sub\\song.egg"), **files}))
    assert str(pytest.raises(ValueError, read_map, song).value) == f"{song}: sub\\song.egg: backslash in the file name"


def test_names_in_info_never_reach_outside_the_map(tmp_path):
    (tmp_path / "secret.dat").write_text(json.dumps(v3_difficulty([(1, 1, 0, 0, 1)])))
    info = v2_info({("Standard", "Expert"): "../secret.dat", ("Standard", "Hard"): str(tmp_path / "secret.dat")})
    folder = write_map(tmp_path / "map", info, {})
    assert read_map(folder).broken == {("Standard", "Expert"): "../secret.dat: file missing",
                                       ("Standard", "Hard"): f"{tmp_path / 'secret.dat'}: file missing"}


# ---- 3. values the game would never load ----

@pytest.mark.parametrize("bpm", [1e-320, 0, -120, 9.99, 1000.5, 1e300, 2**63, float("nan")])
def test_absurd_bpm_refuses_the_map(tmp_path, bpm):
    path = write_map(tmp_path / "map.zip", v2_info(EXPERT, bpm=bpm), {"Expert.dat": v3_difficulty([(1, 1, 0, 0, 1)])})
    error = pytest.raises(ValueError, read_map, path).value
    assert str(error) == f"{path}: Info.dat: BPM {float(bpm)} outside 10..1000 (MIN_BPM, MAX_BPM)"


@pytest.mark.parametrize("bpm", [10, 1000])
def test_bpm_at_the_ends_of_the_range_is_read(tmp_path, bpm):
    path = write_map(tmp_path / "map.zip", v2_info(EXPERT, bpm=bpm), {"Expert.dat": v3_difficulty([(1, 1, 0, 0, 1)])})
    assert read_map(path).bpm == bpm


def test_notes_past_max_beat_are_dropped_and_counted(tmp_path):
    beats = [1e18, maps.MAX_BEAT + 1, maps.MAX_BEAT, 4]
    v2 = {"_version": "2.2.0", "_notes": [{"_time": b, "_lineIndex": 1, "_type": 0, "_cutDirection": 1}
                                          for b in beats]}
    v3 = v3_difficulty([(b, 1, 0, 0, 1) for b in beats])
    v4 = {"version": "4.0.0", "colorNotesData": [{"x": 1, "d": 1}], "colorNotes": [{"b": b, "i": 0} for b in beats]}
    names = {"Hard": v2, "Expert": v3, "ExpertPlus": v4}
    path = write_map(tmp_path / "map.zip", v2_info({("Standard", name): f"{name}.dat" for name in names}),
                     {f"{name}.dat": value for name, value in names.items()} | {"song.egg": b"x"})
    for difficulty in read_map(path).difficulties.values():
        assert difficulty.notes == [Note(4.0, 1, 0, 0, 1), Note(float(maps.MAX_BEAT), 1, 0, 0, 1)]
        assert difficulty.dropped == Counter({"beat past MAX_BEAT": 2})
    dataset = ZippedBeatSaberDataset(tmp_path, difficulties=names)
    assert len(dataset) == 0 and dataset.skipped == Counter({"dropped notes": 3})


def test_absurd_chains_are_dropped_and_counted(tmp_path):
    good = {"b": 1, "x": 1, "c": 1, "d": 1, "tb": 2, "tx": 1, "ty": 2, "sc": 100, "s": 10}
    bad = [{"sc": 10**9}, {"sc": 101}, {"sc": 2.5}, {"sc": 0}, {"s": 1e308}, {"s": 10.5}, {"s": 0}, {"s": -1},
           {"s": float("nan")}]
    late = [{"tb": 1e18}, {"b": 1e18, "tb": 1e18 + 1}]
    v3 = {"version": "3.3.0", "colorNotes": [{"b": 1, "x": 1, "c": 1, "d": 1}],
          "burstSliders": [good] + [{**good, **change} for change in bad + late]}
    v4 = {"version": "4.0.0", "colorNotesData": [{"x": 1, "c": 1, "d": 1}],
          "chainsData": [{"tx": 1, "ty": 2, "c": good["sc"], "s": good["s"]}]
          + [{"tx": 1, "ty": 2, "c": change.get("sc", good["sc"]), "s": change.get("s", good["s"])} for change in bad],
          "chains": [{"hb": 1, "tb": 2, "i": 0, "ci": i} for i in range(len(bad) + 1)] + [{"hb": 1, "tb": 1e18}]}
    difficulties = {("Standard", "Expert"): "v3.dat", ("Standard", "Hard"): "v4.dat"}
    beatmap = bounded(lambda: read_map(write_map(tmp_path / "map.zip", v2_info(difficulties),
                                                 {"v3.dat": v3, "v4.dat": v4})))
    for difficulty in beatmap.difficulties.values():
        assert difficulty.chains == [maps.Chain(1.0, 1, 0, 1, 1, 2.0, 1, 2, 100, 10.0)]
        assert difficulty.dropped == Counter({"chain segments or squish out of range": len(bad),
                                              "chain beat past MAX_BEAT": 1 if difficulty.version == "4.0.0" else 2})
        # the kept chain turns into its 100 pieces at once (a chain of 10^9 would have hung here)
        assert len(bounded(lambda: utils.chains_to_notes(difficulty))) == 100


# ---- 8. the dataset: unreadable entries of the maps directory ----

LOCKED_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from maps import ZippedBeatSaberDataset
maps_dir = sys.argv[2]
for name in ("locked_folder/Info.dat", "locked.zip", "unsearchable/Info.dat"):
    try:
        open(os.path.join(maps_dir, name)).close()
        sys.exit(f"{name} is readable: the test would show nothing")
    except PermissionError:
        pass
dataset = ZippedBeatSaberDataset(maps_dir)
print(json.dumps({"items": len(dataset), "skipped": dict(dataset.skipped)}))
"""


def test_unreadable_folder_and_zip_in_the_maps_directory_are_counted_skips(tmp_path):
    """Honest unreadability: a folder and a zip with mode 000 (and a folder that can be listed but not entered,
    mode 444), read in a subprocess. Run as root, that subprocess is started through util-linux setpriv with
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped, so root honours file modes like anyone else (running it as
    an unprivileged user instead fails here: the interpreter lives under /root, mode 700). Skipped when root and no
    setpriv is there; the subprocess first checks the entries really cannot be read."""
    maps_dir = tmp_path / "maps"
    maps_dir.mkdir()
    files = map_members()
    info = files.pop("Info.dat")
    for name in ("good.zip", "locked_folder", "locked.zip", "unsearchable"):
        write_map(maps_dir / name, info, files)
    command = [sys.executable, "-c", LOCKED_SCRIPT, str(ROOT), str(maps_dir)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no honest way to make a folder unreadable")
        command = [shutil.which("setpriv"), "--inh-caps=-dac_override,-dac_read_search",
                   "--bounding-set=-dac_override,-dac_read_search"] + command
    try:
        for name, mode in (("locked_folder", 0), ("locked.zip", 0), ("unsearchable", 0o444)):
            os.chmod(maps_dir / name, mode)
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        for name in ("locked_folder", "locked.zip", "unsearchable"):
            os.chmod(maps_dir / name, 0o755)
    if os.geteuid() == 0 and result.returncode != 0 and "setpriv" in result.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"items": 1, "skipped": {"unreadable map": 3}}


# ---- fuzz: the fixture maps, re-zipped and damaged ----

@needs_shared
def test_fuzzed_fixture_zips_only_raise_value_error(tmp_path):
    """Every real fixture map, zipped with a compression method in turn (stored, deflate, bzip2, LZMA), then damaged
    three ways (bytes flipped inside one member's compressed data; one member's compressed data cut short; the zip
    file cut short): read_map, level_hash, verify_zip and ZippedBeatSaberDataset return or raise ValueError, each
    call within a time bound. Seed 0."""
    rng = random.Random(0)
    outcomes = Counter()
    fuzz_dir = tmp_path / "fuzz"
    fuzz_dir.mkdir()
    for i, folder in enumerate(REAL_MAPS):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", METHODS[i % 4]) as archive:
            for path in sorted(folder.iterdir()):
                if path.is_file():
                    archive.write(path, path.name)
        data = buffer.getvalue()
        intact = write(tmp_path / f"{i}.zip", data)
        assert verify_zip(intact) == level_hash(intact) == level_hash(folder), folder.relative_to(FIXTURES)
        infos = [info for info in zipfile.ZipFile(io.BytesIO(data)).infolist() if info.compress_size > 8]
        flipped = bytearray(data)
        start, end = data_span(data, rng.choice(infos).filename)
        for position in rng.sample(range(start, end), 4):
            flipped[position] ^= rng.randrange(1, 256)
        cut = rng.choice(infos)
        member_cut = set_size(data, cut.filename, COMPRESSED_SIZE, rng.randrange(cut.compress_size))
        file_cut = data[:rng.randrange(len(data))]
        for label, damaged in (("flipped", bytes(flipped)), ("member_cut", member_cut), ("file_cut", file_cut)):
            path = write(fuzz_dir / f"{i}_{label}.zip", damaged)
            for call in (read_map, level_hash, verify_zip):
                outcome = bounded(lambda: call(path), seconds=10, mib=None)
                if isinstance(outcome, ValueError):
                    assert str(outcome).startswith(f"{path}: ")
                    outcomes["refused"] += 1
                else:
                    outcomes["read"] += 1
    assert outcomes["refused"] and outcomes["read"]
    dataset = bounded(lambda: ZippedBeatSaberDataset(fuzz_dir), seconds=60, mib=None)
    assert dataset.skipped["unreadable map"] >= len(REAL_MAPS)
