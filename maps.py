"""Reading Beat Saber maps: a map .zip or folder → BeatMap, and a directory of maps → MapItems for training.

Info.dat v2 (2.0.0/2.1.0) and v4 (4.0.x); difficulty files v2 (also 1.x and files without `_version`), v3 and
v4, recognised by their own content whatever the Info version. Zips are read in memory, never extracted.
Only this module parses map files; it knows nothing about tokens and imports nothing from the project.

Bad input raises ValueError("<map path>: <file>: <reason>"); MapTooLarge, a ValueError, when the reason is a size
limit (the MAX_* constants below: bytes, JSON objects, notes, listings, compression ratio), so that a map costs
bounded time and memory whatever its files say. Nothing outside the map is read: a map folder's entries must be
regular files or folders (no links), zip member names must be relative paths of plain components ("/" between
them, no "..", no backslash), and no two names of a map may differ only in case.
A difficulty file that cannot be read (missing, broken JSON, a value of the wrong JSON type, past a limit) goes to
BeatMap.broken instead, so the rest of the map stays usable.
A note the game would load but this project cannot represent (NaN or negative beat, beat past MAX_BEAT,
x/y/colour/direction out of range, Mapping Extensions precision values, a chain's segments or squish out of range)
is dropped and counted in Difficulty.dropped[reason].
Absent fields default to 0, as the game's deserialiser does (v3 ≥ 3.3.0 and v4 omit defaults on purpose).
"""

import bz2
import contextlib
import hashlib
import json
import logging
import lzma
import math
import os
import struct
import tempfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

logger = logging.getLogger(__name__)

# Limits on what one map may cost. "Fixture" figures are the largest among the 39 real maps in
# shared/fixtures/maps (BeatSaver's validator cases left out).
MAX_DAT_BYTES = 16 * 2**20        # bytes: one Info / difficulty / AudioData file, uncompressed: 4.5x the largest
                                  # fixture file (3.6 MiB, a Noodle modchart; an unmodded map's largest is 2.8 MiB)
MAX_MAP_DAT_BYTES = 64 * 2**20    # bytes: all of one map's JSON files read together, a file listed twice counting
                                  # twice: 12x a fixture map's most (5.4 MiB); 4 files at MAX_DAT_BYTES
MAX_MAP_JSON_OBJECTS = 1_000_000  # JSON objects and arrays ("{" and "[" bytes, counted before parsing) in one map's
                                  # files together: 6.9x a fixture map's most (145k); as notes, that many parse in
                                  # ~3.5 s on one core, in at most ~450 MB
MAX_NOTES = 100_000               # notes one difficulty stands for, colour notes + every chain's pieces (head
                                  # included), as a chain_notes callable may make them: 19x a fixture's most (5,144)
MAX_DIFFICULTIES = 200            # difficulty listings in one Info.dat: 5x a fixture's most (40 in MapCheck's Test
                                  # Track: the 8 official characteristics x 5 difficulties)
MAX_AUDIO_BYTES = 256 * 2**20     # bytes: the song file, and in verify_zip any member (25 min of 16-bit stereo
                                  # 44.1 kHz WAV; a map's other files are far smaller)
MAX_MAP_BYTES = 512 * 2**20       # bytes: a map zip's members together, uncompressed as declared: a song at
                                  # MAX_AUDIO_BYTES and as much again for the rest
MAX_ENTRIES = 4096                # most files in one map zip or folder
MAX_COMPRESSION_RATIO = 200       # uncompressed / compressed size of a zip member: 2.5x the most compressible fixture
                                  # file (81 with LZMA -9e, 63 bzip2 -9, 38 deflate -9); bombs reach 1,000 (deflate)
                                  # to over 10^6 (bzip2)
RATIO_CHECK_BYTES = 2**20         # bytes: members smaller than this uncompressed skip the ratio check (inflating one
                                  # costs little; MAX_MAP_BYTES bounds them together)
MIN_BPM, MAX_BPM = 10, 1000       # Info BPM range BeatSaver accepts
MAX_BEAT = MAX_BPM * 120          # beats: 2 hours at MAX_BPM; a later note or chain is dropped (the latest fixture
                                  # note is at beat 1037.5; data.py's beat * 48 ticks stay far inside int64)
MAX_CHAIN_SEGMENTS = 100          # pieces of one chain, head included: 11x a fixture's most (9)
MAX_SQUISH = 10.0                 # chain squish, which must also be > 0 (0 crashes the game): 4x the largest in any
                                  # fixture (2.4, a BeatSaver validator case; real maps use 0.2-1)
BPM_TOLERANCE = 1e-5              # relative: a tempo within this of the one in effect is no change (3 ms over 300 s)
UNSUPPORTED_REQUIREMENTS = ("Noodle Extensions", "Mapping Extensions", "Vivify")   # notes move off the grid

LANES = (0, 1, 2, 3)              # x, left → right
LAYERS = (0, 1, 2)                # y, bottom → top
COLORS = (0, 1)                   # red/left, blue/right
DIRECTIONS = tuple(range(9))      # 0 up … 7 down-right, 8 any
V2_BOMB = 3                       # v2 `_type` of a bomb


class MapTooLarge(ValueError):
    """A map, or one of its files, passes a size limit (a MAX_* constant, or verify_zip's max_unzipped_bytes)."""


class Note(NamedTuple):        # one colour note, as in the map file
    beat: float                # JSON beats (Info BPM, no BPM changes applied)
    x: int                     # lane 0..3, left → right
    y: int                     # layer 0..2, bottom → top
    color: int                 # 0 red/left, 1 blue/right
    direction: int             # 0 up, 1 down, 2 left, 3 right, 4 up-left, 5 up-right, 6 down-left, 7 down-right, 8 any (dot)


class Chain(NamedTuple):       # v3 burstSlider / v4 chain: head + segments toward the tail
    beat: float
    x: int
    y: int
    color: int
    direction: int
    tail_beat: float
    tail_x: int
    tail_y: int
    segments: int              # segment count including the head
    squish: float


@dataclass
class Difficulty:
    characteristic: str        # "Standard", "OneSaber", ...
    difficulty: str            # "Easy" … "ExpertPlus"
    filename: str
    version: str               # difficulty schema version ("" when the file has none)
    notes: list[Note]          # colour notes, sorted by (beat, x, y, color, direction)
    chains: list[Chain]
    arcs: int                  # count only (arcs add no notes)
    bombs: int
    obstacles: int
    dropped: Counter[str]      # reason → number of notes dropped; chain reasons start with "chain "
    bpm_changes: list[tuple[float, float]]   # [(beat, bpm)] real tempo changes, see _tempo_changes
    requirements: list[str]    # SongCore _requirements ("Noodle Extensions", "Mapping Extensions", ...)
    njs: float
    offset_beats: float        # note jump start beat offset


@dataclass
class BeatMap:
    source: str                # path of the zip or folder
    info_version: str
    bpm: float
    song_time_offset_s: float  # v2 _songTimeOffset (0 when absent / v4)
    song_filename: str
    song_name: str
    song_sub_name: str
    song_author: str
    level_author: str          # v4: the mappers of all difficulties, joined with ", "
    difficulties: dict[tuple[str, str], Difficulty]     # (characteristic, difficulty) → parsed file
    broken: dict[tuple[str, str], str]                   # (characteristic, difficulty) → why it could not be read

    def read_audio(self) -> bytes:
        """The song file's bytes; ValueError when it is missing or larger than MAX_AUDIO_BYTES."""
        return _read_song(self.source, self.song_filename)


class _InfoEntry(NamedTuple):  # one difficulty as Info.dat lists it
    characteristic: str
    difficulty: str
    filename: str
    njs: float
    offset_beats: float
    requirements: list[str]


def read_map(path) -> BeatMap:
    """A map .zip, map folder (or its Info.dat) → BeatMap. ValueError("<path>: <reason>") on bad input,
    MapTooLarge when the map passes a size limit."""
    return _read_map(path)[0]


def _read_map(path) -> tuple[BeatMap, bool]:
    """path → (BeatMap, whether the song file named in Info.dat is in the map)."""
    source = os.fspath(path)
    try:
        with _MapFiles(source) as files:
            beatmap = _read_files(files, source)
            try:
                has_song = files.find(beatmap.song_filename) is not None
            except ValueError as error:
                raise _within(beatmap.song_filename, error) from None
            return beatmap, has_song
    except ValueError as error:
        raise _within(source, error) from None


def _within(where, error) -> ValueError:
    """error with "<where>: " before its message, of the same class (a MapTooLarge stays one)."""
    return (MapTooLarge if isinstance(error, MapTooLarge) else ValueError)(f"{where}: {error}")


def _read_files(files, source) -> BeatMap:
    # head = {BeatMap field: value} for the scalar fields; entries = [_InfoEntry] in Info order
    try:
        head, entries, audio_data_filename = _parse_info(files.load_json(files.read(files.info_name)))
    except ValueError as error:
        raise _within(files.info_name, error) from None

    # tempo_events = [(beat, bpm), ...] from v4 AudioData; they apply to every difficulty
    tempo_events = []
    if audio_data_filename:
        try:
            tempo_events = _audio_data_events(files.load_json(files.read(audio_data_filename)), head["bpm"])
        except ValueError as error:
            raise _within(audio_data_filename, error) from None

    difficulties, broken = {}, {}
    for entry in entries:
        key = (entry.characteristic, entry.difficulty)
        try:
            difficulties[key] = _read_difficulty(files, entry, head["bpm"], tempo_events)
        except ValueError as error:
            broken[key] = f"{entry.filename}: {error}"
    return BeatMap(source=source, difficulties=difficulties, broken=broken, **head)


def level_hash(path) -> str:
    """A map .zip or folder → BeatSaver's version hash (SongCore's level hash), 40 lowercase hex digits.

    SHA-1 over the bytes of Info.dat, then of each file Info.dat lists, in Info order: v2 Info, every
    _beatmapFilename set by set; v4 Info, audioDataFilename, then each difficulty's beatmapDataFilename and
    lightshowDataFilename (a file listed twice is hashed twice). Names are matched as by read_map (ignoring
    case); a listed file the map lacks, or an empty name, is skipped. Only these names are read from Info.dat, so
    a map read_map refuses (no BPM, say) still has a hash. ValueError("<path>: <reason>") on bad input,
    MapTooLarge past one of read_map's size limits (MAX_DIFFICULTIES listings, MAX_MAP_DAT_BYTES read in all, ...).
    """
    source = os.fspath(path)
    try:
        with _MapFiles(source) as files:
            return _level_hash(files)
    except ValueError as error:
        raise _within(source, error) from None


def _level_hash(files) -> str:
    try:
        info_bytes = files.read(files.info_name)
        names = _hashed_files(files.load_json(info_bytes))
    except ValueError as error:
        raise _within(files.info_name, error) from None
    sha1 = hashlib.sha1(info_bytes)
    for name in names:
        try:
            if name and files.find(name) is not None:
                sha1.update(files.read(name))
        except ValueError as error:
            raise _within(name, error) from None
    return sha1.hexdigest()


def verify_zip(path, max_unzipped_bytes=None) -> str:
    """A map .zip → its level_hash (the value level_hash(path) gives), after reading every member in full and
    checking its CRC-32.

    The limits are read_map's (names, MAX_ENTRIES, MAX_MAP_BYTES, MAX_COMPRESSION_RATIO; each member at most
    MAX_AUDIO_BYTES, the largest a song may be), and max_unzipped_bytes, when given, for the members' declared
    uncompressed sizes together. MapTooLarge past a size, ratio or total limit; ValueError("<path>: <reason>") for
    anything else (corrupt data, unsafe or ambiguous names, not a zip, no Info.dat).
    """
    source = os.fspath(path)
    try:
        with _MapFiles(source) as files:
            if files.zip_file is None:
                raise ValueError("not a zip file")
            unzipped_bytes = sum(info.file_size for info in files.infos)
            if max_unzipped_bytes is not None and unzipped_bytes > max_unzipped_bytes:
                raise MapTooLarge(f"unzips to {unzipped_bytes} bytes, more than max_unzipped_bytes = "
                                  f"{max_unzipped_bytes}")
            for info in files.infos:
                try:
                    _read_zip_member(files.zip_file, info, (MAX_AUDIO_BYTES, "MAX_AUDIO_BYTES"))
                except ValueError as error:
                    raise _within(info.filename, error) from None
            return _level_hash(files)
    except ValueError as error:
        raise _within(source, error) from None


def write_atomic(path, data, prefix=".tmp-", suffix=None):
    """data (bytes or str) → path, through a temporary file in the same folder (prefix + random + suffix, suffix
    default "-<name>") renamed over path: readers never see half a file, and a failed write leaves none. The file is
    readable by everyone (maps, models and lists are for sharing); a folder at path is an OSError."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix or "-" + os.path.basename(path))
    try:
        os.chmod(temporary, 0o644)          # mkstemp makes the file private
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def map_files(path) -> dict[str, bytes]:
    """A map .zip or folder → {name relative to the map: bytes} of every file beside its Info.dat, each at most
    MAX_AUDIO_BYTES, the zip under read_map's limits (names, sizes, CRC). ValueError("<path>: <reason>")."""
    source = os.fspath(path)
    try:
        with _MapFiles(source) as files:
            contents = {}
            for name in files.members:
                try:
                    contents[name] = files.read_song(name)
                except ValueError as error:
                    raise _within(name, error) from None
            return contents
    except ValueError as error:
        raise _within(source, error) from None


def replace_notes(data: bytes, start_beat, end_beat, notes) -> bytes:
    """A v2 or v3 difficulty file's bytes → the same file with its colour notes at beats in [start_beat, end_beat),
    and the chains and arcs whose head lies there, replaced by notes = [Note, ...]. Everything else — the other
    notes with all their fields, bombs, walls, events, custom data — is kept as it was. ValueError for a v4 file
    (notes there are indices into shared data) or a file read_map could not read."""
    if len(data) > MAX_DAT_BYTES:
        raise MapTooLarge(f"{len(data)} bytes, more than the limit of {MAX_DAT_BYTES} (MAX_DAT_BYTES)")
    difficulty = _parse_json(_gunzip(data) if data[:2] == b"\x1f\x8b" else data)
    version, _ = _parse_difficulty(difficulty)
    inside = lambda beat: type(beat) in (int, float) and start_beat <= beat < end_beat  # noqa: E731
    if version.startswith("4") or "colorNotesData" in difficulty:
        raise ValueError(f"a version {version or '4'} difficulty cannot be rewritten here (its notes index shared "
                         "data); save the map as v3 in your editor")
    if "colorNotes" in difficulty or version.startswith("3"):
        difficulty["colorNotes"] = _splice(
            _objects(difficulty, "colorNotes"), lambda n: inside(n.get("b", 0)), lambda n: n.get("b", 0),
            [v3_note(n) for n in notes])
        for key in ("burstSliders", "sliders"):
            if key in difficulty:
                difficulty[key] = [a for a in _objects(difficulty, key) if not inside(a.get("b", 0))]
    elif version.startswith(("1", "2")) or "_notes" in difficulty:
        # v2 _type: 0 red, 1 blue, 3 bomb (bombs stay)
        difficulty["_notes"] = _splice(
            _objects(difficulty, "_notes"), lambda n: n.get("_type", 0) in (0, 1) and inside(n.get("_time", 0)),
            lambda n: n.get("_time", 0),
            [{"_time": n.beat, "_lineIndex": n.x, "_lineLayer": n.y, "_type": n.color, "_cutDirection": n.direction}
             for n in notes])
        if "_sliders" in difficulty:
            difficulty["_sliders"] = [a for a in _objects(difficulty, "_sliders") if not inside(a.get("_headTime", 0))]
    else:
        raise ValueError(f"version {version!r}: not a v2 or v3 difficulty file")
    return json.dumps(difficulty).encode()


def _splice(objects, removed, time_of, new):
    """objects = [dict, ...] of a difficulty file → the kept ones (not removed(o)) in their own order, with new (sorted
    by time) where the first removed one was, or else before the first kept object later than the new ones' start."""
    kept = [o for o in objects if not removed(o)]
    at = next((i for i, o in enumerate(objects) if removed(o)), None)
    if at is not None:
        at = sum(1 for o in objects[:at] if not removed(o))
    else:
        start = min((time_of(o) for o in new), default=None)
        # time_of(o) is the file's value: maybe not a number
        at = next((i for i, o in enumerate(kept) if start is not None and type(time_of(o)) in (int, float)
                   and time_of(o) > start), len(kept))
    return kept[:at] + new + kept[at:]


def v3_note(note) -> dict:
    """Note → a v3 colorNotes object (every field; angle offset 0)."""
    beat, x, y, color, direction = note
    return {"b": float(beat), "x": int(x), "y": int(y), "c": int(color), "d": int(direction), "a": 0}


def difficulty_v3(notes, basic_events, boost_events) -> dict:
    """notes = [Note, ...] → a v3.3.0 difficulty with every top-level array present and every field of each object
    written; basic_events, boost_events = v3 light event dicts ({"b", "et", "i", "f"}, {"b", "o"})."""
    return {
        "version": "3.3.0",
        "bpmEvents": [],
        "rotationEvents": [],
        "colorNotes": [v3_note(note) for note in sorted(notes)],
        "bombNotes": [],
        "obstacles": [],
        "sliders": [],
        "burstSliders": [],
        "waypoints": [],
        "basicBeatmapEvents": basic_events,
        "colorBoostBeatmapEvents": boost_events,
        "lightColorEventBoxGroups": [],
        "lightRotationEventBoxGroups": [],
        "lightTranslationEventBoxGroups": [],
        "vfxEventBoxGroups": [],
        "_fxEventsCollection": {"_fl": [], "_il": []},
        "basicEventTypesWithKeywords": {"d": []},
        "useNormalEventsAsCompatibleEvents": True,
    }


def info_v2(bpm, difficulties, song_name, song_author, preview_s, editor) -> dict:
    """Info.dat 2.0.0 of a map of song.egg and cover.jpg: difficulties = [(name, rank, NJS, start beat offset), ...]
    of its Standard set (easiest first, files "<name>Standard.dat"); preview_s = (start, duration) of the song
    preview; editor = (name, version) recorded in _customData._editors (as mapping tools record themselves;
    BeatSaver asks that AI-made maps be declared) and as the level author. Every field BeatSaver checks is there."""
    return {
        "_version": "2.0.0",
        "_songName": song_name,
        "_songSubName": "",
        "_songAuthorName": song_author,
        "_levelAuthorName": editor[0],
        "_beatsPerMinute": float(bpm),
        "_songTimeOffset": 0,
        "_shuffle": 0,
        "_shufflePeriod": 0.5,
        "_previewStartTime": round(preview_s[0], 3),
        "_previewDuration": round(preview_s[1], 3),
        "_songFilename": "song.egg",
        "_coverImageFilename": "cover.jpg",
        "_environmentName": "DefaultEnvironment",
        "_allDirectionsEnvironmentName": "GlassDesertEnvironment",
        "_customData": {"_editors": {"_lastEditedBy": editor[0], editor[0]: {"version": editor[1], "generated": True}}},
        "_difficultyBeatmapSets": [{
            "_beatmapCharacteristicName": "Standard",
            "_difficultyBeatmaps": [{
                "_difficulty": name,
                "_difficultyRank": rank,
                "_beatmapFilename": f"{name}Standard.dat",
                "_noteJumpMovementSpeed": njs,
                "_noteJumpStartBeatOffset": offset_beats,
            } for name, rank, njs, offset_beats in difficulties],
        }],
    }


def mark_generated(data: bytes, generator, version) -> bytes:
    """Info.dat bytes → the same Info.dat with generator named in its editors custom data (v2 _customData._editors,
    v4 customData.editors: {"_lastEditedBy"/"lastEditedBy": generator, generator: {"version": version}})."""
    info = _parse_json(data)
    if _info_major(info) == "2":
        custom, editors_key, last_key = info.setdefault("_customData", {}), "_editors", "_lastEditedBy"
    else:
        custom, editors_key, last_key = info.setdefault("customData", {}), "editors", "lastEditedBy"
    if type(custom) is not dict:
        raise ValueError("Info.dat custom data is not an object")
    editors = custom.setdefault(editors_key, {})
    if type(editors) is not dict:
        raise ValueError("Info.dat editors custom data is not an object")
    editors[last_key] = generator
    editors[generator] = {"version": version, "generated": True}
    return json.dumps(info, indent=2).encode()


def _read_difficulty(files, entry, bpm, tempo_events) -> Difficulty:
    data = files.load_json(files.read(entry.filename))
    version, parsed = _parse_difficulty(data)
    # parsed = {"notes": [Note], "chains": [Chain], "arcs", "bombs", "obstacles": int,
    #           "dropped": Counter, "tempo_events": [(beat, bpm), ...] from the file itself}
    # note_count = the notes this difficulty stands for: colour notes + every chain's pieces (head included)
    note_count = len(parsed["notes"]) + sum(chain.segments for chain in parsed["chains"])
    if note_count > MAX_NOTES:
        raise MapTooLarge(f"{note_count} notes and chain pieces, more than the limit of {MAX_NOTES} (MAX_NOTES)")
    return Difficulty(
        characteristic=entry.characteristic, difficulty=entry.difficulty, filename=entry.filename,
        version=version, notes=sorted(parsed["notes"]), chains=sorted(parsed["chains"]),
        arcs=parsed["arcs"], bombs=parsed["bombs"], obstacles=parsed["obstacles"], dropped=parsed["dropped"],
        bpm_changes=_tempo_changes(bpm, parsed["tempo_events"] + tempo_events),
        requirements=entry.requirements, njs=entry.njs, offset_beats=entry.offset_beats)


def _tempo_changes(bpm, events) -> list[tuple[float, float]]:
    """Info bpm + [(beat, bpm), ...] tempo events → [(beat, bpm)] where the tempo really changes.

    An event whose tempo is within BPM_TOLERANCE of the tempo already in effect is dropped, so a bpmEvent at
    beat 0 equal to the Info BPM (common editor output) or an AudioData region at the Info BPM is no change, and
    a filter can test `if difficulty.bpm_changes:`. Any remaining change means beat → seconds is not beat * 60 / bpm.
    """
    changes = []
    current = bpm
    for beat, new in sorted(events, key=lambda event: event[0]):
        if not abs(new - current) <= BPM_TOLERANCE * abs(current):
            changes.append((beat, new))
            current = new
    return changes


# ---- files of one map: a zip read in memory, or a folder ----

class _MapFiles:
    """The files of one map. A zip's files are those beside its shallowest Info.dat (zips often wrap the map in
    one folder); a folder's are its top-level regular files (subfolders are no part of the map). Names are looked
    up exactly, then ignoring case (no two names of a map differ only in case).

    The JSON files read (read, load_json) count toward the map's budgets, MAX_MAP_DAT_BYTES and
    MAX_MAP_JSON_OBJECTS, however often one file is listed; the song (read_song) does not."""

    def __init__(self, source):
        path = Path(source)
        self.zip_file = None        # the open zip (binary file), or None for a folder
        self.infos = []             # [ZipInfo] of every member of the zip, folders and files outside the map too
        try:
            if path.is_file() and path.name.lower() == "info.dat":
                path = path.parent
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as error:
            raise ValueError(f"cannot read ({error})") from None
        if is_dir:
            # members = {name relative to the map: Path}
            self.members = _folder_members(path)
        elif is_file:
            # members = {name relative to the map: ZipInfo}
            self.zip_file, self.infos, self.members = _open_zip(path)
        else:
            raise ValueError("no such file or folder")
        self.lower_names = {name.lower(): name for name in self.members}
        self.dat_bytes = 0          # bytes of JSON files read so far
        self.json_objects = 0       # JSON objects and arrays in the files loaded so far
        info_name = self.find("Info.dat")
        if info_name is None:
            self.close()
            raise ValueError("no Info.dat")
        self.info_name = info_name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.zip_file is not None:
            self.zip_file.close()

    def find(self, name):
        """A file name from Info.dat → the member's name, or None when the map has no such file. ValueError for a
        name with a backslash: a Windows separator or part of a name, which file it means is ambiguous."""
        if "\\" in name:
            raise ValueError("backslash in the file name")
        if name in self.members:
            return name
        return self.lower_names.get(name.lower())

    def read(self, name) -> bytes:
        """The bytes of the JSON file Info.dat calls name (at most MAX_DAT_BYTES); counts toward MAX_MAP_DAT_BYTES."""
        if self.dat_bytes <= MAX_MAP_DAT_BYTES:   # once past the limit, nothing more is read
            data = self._read(name, (MAX_DAT_BYTES, "MAX_DAT_BYTES"))
            self.dat_bytes += len(data)
        if self.dat_bytes > MAX_MAP_DAT_BYTES:
            raise MapTooLarge(f"the map's JSON files read come to {self.dat_bytes} bytes, more than the limit of "
                              f"{MAX_MAP_DAT_BYTES} (MAX_MAP_DAT_BYTES)")
        return data

    def read_song(self, name) -> bytes:
        """The bytes of the song file Info.dat calls name, at most MAX_AUDIO_BYTES."""
        return self._read(name, (MAX_AUDIO_BYTES, "MAX_AUDIO_BYTES"))

    def _read(self, name, limit) -> bytes:
        # limit = (bytes, the name of the constant they come from, for the message)
        member = self.find(name)
        if member is None:
            raise ValueError("file missing")
        if self.zip_file is None:
            return _read_bounded_file(self.members[member], limit)
        return _read_zip_member(self.zip_file, self.members[member], limit)

    def load_json(self, data: bytes):
        """File bytes (UTF-8, optional BOM, optionally gzip-deflated as v4 allows) → the JSON value; its objects and
        arrays count toward MAX_MAP_JSON_OBJECTS before it is parsed."""
        if data[:2] == b"\x1f\x8b":
            data = _gunzip(data)
        self.json_objects += data.count(b"{") + data.count(b"[")
        if self.json_objects > MAX_MAP_JSON_OBJECTS:
            raise MapTooLarge(f"the map's JSON files loaded hold {self.json_objects} objects and arrays, more than "
                              f"the limit of {MAX_MAP_JSON_OBJECTS} (MAX_MAP_JSON_OBJECTS)")
        return _parse_json(data)


# errors zipfile raises for a damaged or unsupported central directory
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError,
               OSError, struct.error, OverflowError, ValueError)
# errors reading and decompressing one member's data (bz2 raises OSError, lzma LZMAError, zlib zlib.error)
_MEMBER_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError, struct.error, OverflowError)


def _folder_members(path) -> dict[str, Path]:
    """A map folder → {file name: Path} of its regular files. ValueError for a link (its target may lie outside
    the map) or anything else that is neither a regular file nor a folder."""
    try:
        with os.scandir(path) as entries:
            members = {}
            for entry in entries:
                if entry.is_symlink():
                    raise ValueError(f"{entry.name}: a symbolic link (a map's files must lie in its folder)")
                if entry.is_dir(follow_symlinks=False):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    raise ValueError(f"{entry.name}: not a regular file")
                if len(members) >= MAX_ENTRIES:
                    raise MapTooLarge(f"more than {MAX_ENTRIES} files (MAX_ENTRIES)")
                members[entry.name] = Path(entry.path)
    except OSError as error:
        raise ValueError(f"cannot list folder ({error})") from None
    _check_unique(members)
    return members


def _check_unique(names):
    """ValueError naming the first name that repeats an earlier one, exactly or but for case (the game reads maps on
    case-insensitive Windows): which of the two files counts would be undefined."""
    first = {}   # lower-case name → the first name with it
    for name in names:
        other = first.get(name.lower())
        if other == name:
            raise ValueError(f"{name!r}: two members of that name")
        if other is not None:
            raise ValueError(f"{name!r}: same name as {other!r} but for case")
        first[name.lower()] = name


def _open_zip(path):
    """→ (open binary file, [every ZipInfo], {name relative to the map: ZipInfo} for the files beside the shallowest
    Info.dat)."""
    try:
        file = open(path, "rb")
    except OSError as error:
        raise ValueError(f"cannot read ({error})") from None
    try:
        try:
            with zipfile.ZipFile(file) as archive:
                infos = archive.infolist()
            zip_bytes = os.fstat(file.fileno()).st_size
        except _ZIP_ERRORS as error:
            raise ValueError(f"not a readable zip file ({error})") from None
        return file, infos, _zip_members(infos, zip_bytes)
    except ValueError:
        file.close()
        raise


def _zip_members(infos, zip_bytes) -> dict[str, zipfile.ZipInfo]:
    """Every member's ZipInfo, the zip's size → {name relative to the map: ZipInfo} for the files (not folders)
    beside the shallowest Info.dat. ValueError for an unsafe or repeated name, members that overlap (their
    compressed data adds up to more than the zip); MapTooLarge past MAX_ENTRIES or MAX_MAP_BYTES."""
    if len(infos) > MAX_ENTRIES:
        raise MapTooLarge(f"more than {MAX_ENTRIES} files in the zip (MAX_ENTRIES)")
    for info in infos:
        problem = _name_problem(info.orig_filename)
        if problem:
            raise ValueError(f"{info.orig_filename!r}: {problem}")
    _check_unique([info.filename for info in infos])
    unzipped_bytes = sum(info.file_size for info in infos)
    if unzipped_bytes > MAX_MAP_BYTES:
        raise MapTooLarge(f"unzips to {unzipped_bytes} bytes, more than the limit of {MAX_MAP_BYTES} (MAX_MAP_BYTES)")
    if sum(info.compress_size for info in infos) > zip_bytes:
        raise ValueError("members overlap (their compressed sizes add up to more than the zip file)")
    # names = [(path inside the zip, ZipInfo), ...] for files, not folders
    names = [(info.filename, info) for info in infos if not info.is_dir()]
    info_paths = [name for name, _ in names if name.rsplit("/", 1)[-1].lower() == "info.dat"]
    if not info_paths:
        raise ValueError("no Info.dat in the zip")
    depth = min(name.count("/") for name in info_paths)
    shallowest = [name for name in info_paths if name.count("/") == depth]
    if len(shallowest) > 1:
        raise ValueError(f"several Info.dat files: {shallowest}")
    prefix = shallowest[0][: len(shallowest[0]) - len("info.dat")]
    return {name[len(prefix):]: info for name, info in names if name.startswith(prefix)}


def _name_problem(name) -> str:
    """A zip member's name → why it is unsafe or ambiguous, or "" for a relative path of plain components with "/"
    between them (a trailing "/" marks a folder)."""
    if "\0" in name:
        return "NUL byte in the name"
    if "\\" in name:
        return "backslash in the name"
    if name.startswith("/"):
        return "absolute path"
    if name[1:2] == ":" and name[:1].isalpha():
        return "drive letter"
    if any(part in ("", ".", "..") for part in name.removesuffix("/").split("/")):
        return "empty, '.' or '..' path component"
    return ""


def _read_zip_member(file, info, limit) -> bytes:
    """A zip member's bytes, checked against its declared size and CRC-32; MapTooLarge past the module constant
    limit = (bytes, constant name) or MAX_COMPRESSION_RATIO. Decompressed here into at most the declared size: zipfile's own
    bzip2 and LZMA reads have no output bound (722 bytes of bzip2 made it allocate 2 GB)."""
    limit_bytes, limit_name = limit
    size_bytes = max(info.file_size, info.compress_size)
    if size_bytes > limit_bytes:
        raise MapTooLarge(f"{size_bytes} bytes, more than the limit of {limit_bytes} ({limit_name})")
    if info.file_size > RATIO_CHECK_BYTES and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
        raise MapTooLarge(f"{info.file_size} bytes compressed into {info.compress_size}, more than the limit of "
                          f"{MAX_COMPRESSION_RATIO} to 1 (MAX_COMPRESSION_RATIO)")
    if info.flag_bits & 0x1:
        raise ValueError("encrypted")
    try:
        file.seek(info.header_offset)
        # header = the 30-byte local file header; its last two fields are the lengths of the name and extra field
        header = file.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise ValueError("no local file header")
        name_length, extra_length = struct.unpack("<HH", header[26:])
        local_name = file.read(name_length)
        if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise ValueError(f"the local file header names {local_name!r}")
        file.seek(extra_length, os.SEEK_CUR)
        data = _decompress(info, file.read(info.compress_size))
    except _MEMBER_ERRORS as error:
        raise ValueError(f"broken zip data ({error})") from None
    if len(data) != info.file_size:
        raise ValueError(f"broken zip data (it does not unpack to the declared {info.file_size} bytes)")
    if zlib.crc32(data) != info.CRC:
        raise ValueError("broken zip data (CRC-32 mismatch)")
    return data


def _decompress(info, compressed: bytes) -> bytes:
    """A member's compressed bytes → at most info.file_size + 1 bytes of its data (one more shows it is too long)."""
    out_bytes = info.file_size + 1
    method = info.compress_type
    if method == zipfile.ZIP_STORED:
        return compressed
    if method == zipfile.ZIP_DEFLATED:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(compressed, out_bytes)
    if method == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor().decompress(compressed, out_bytes)
    if method == zipfile.ZIP_LZMA:
        # compressed = LZMA SDK version (2 bytes), properties length (2), properties: lc/lp/pb in one byte and the
        # dictionary size (4), then raw LZMA1 data
        (properties_length,) = struct.unpack("<H", compressed[2:4])
        properties = compressed[4:4 + properties_length]
        if len(properties) < 5:
            raise ValueError("short LZMA properties")
        # a dictionary beyond the data's own size is never used: bounding it bounds the decoder's memory
        dict_bytes = min(int.from_bytes(properties[1:5], "little"), max(info.file_size, 4096))
        lclppb = properties[0]
        lzma_filter = dict(id=lzma.FILTER_LZMA1, dict_size=dict_bytes, lc=lclppb % 9, lp=lclppb // 9 % 5,
                           pb=lclppb // 45)
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma_filter])
        return decompressor.decompress(compressed[4 + properties_length:], out_bytes)
    raise ValueError(f"compression method {method} not supported")


def _read_bounded_file(path, limit) -> bytes:
    """A map folder's file (never through a link) → its bytes; MapTooLarge past limit = (bytes, constant name)."""
    limit_bytes, limit_name = limit
    try:
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as stream:
            size_bytes = os.fstat(stream.fileno()).st_size
            if size_bytes > limit_bytes:
                raise MapTooLarge(f"{size_bytes} bytes, more than the limit of {limit_bytes} ({limit_name})")
            data = stream.read(limit_bytes + 1)
    except OSError as error:
        raise ValueError(f"cannot read ({error})") from None
    if len(data) > limit_bytes:
        raise MapTooLarge(f"more than the limit of {limit_bytes} bytes ({limit_name})")
    return data


def _read_song(source, filename) -> bytes:
    try:
        with _MapFiles(source) as files:
            try:
                return files.read_song(filename)
            except ValueError as error:
                raise _within(filename or "(no song file name)", error) from None
    except ValueError as error:
        raise _within(source, error) from None


def _parse_json(data: bytes):
    """File bytes (UTF-8, optional BOM) → the JSON value."""
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as error:
        raise ValueError(f"broken JSON ({error})") from None


def _gunzip(data: bytes) -> bytes:
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = decompressor.decompress(data, MAX_DAT_BYTES + 1)
    except zlib.error as error:
        raise ValueError(f"broken gzip data ({error})") from None
    if len(out) > MAX_DAT_BYTES:
        raise MapTooLarge(f"gzip data inflates past the limit of {MAX_DAT_BYTES} bytes (MAX_DAT_BYTES)")
    if not decompressor.eof:
        raise ValueError("truncated gzip data")
    return out


# ---- JSON values ----

_JSON_TYPES = {"number": (int, float), "string": (str,), "list": (list,), "object": (dict,)}
LARGEST_INT = 2**63               # JSON integers beyond ±this are refused: float() would overflow on huge ones


def _json_type(value) -> str:
    if type(value) is int and not -LARGEST_INT <= value <= LARGEST_INT:
        return "an integer too large"
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "list",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def _is_number(value) -> bool:
    return type(value) is float or (type(value) is int and -LARGEST_INT <= value <= LARGEST_INT)


def _field(obj, key, expected, default=0):
    """obj[key] (default when absent) checked to be an `expected` JSON type: "number", "string", "list", "object".

    Exact types: JSON true/false are not numbers, null is not a list."""
    value = obj.get(key, default)
    if type(value) not in _JSON_TYPES[expected] or (expected == "number" and not _is_number(value)):
        raise ValueError(f"{key} is {_json_type(value)}, expected {expected}")
    return value


def _objects(obj, key) -> list[dict]:
    """obj[key] as a list of JSON objects ([] when absent)."""
    items = _field(obj, key, "list", [])
    if set(map(type, items)) - {dict}:
        i = next(i for i, item in enumerate(items) if type(item) is not dict)
        raise ValueError(f"{key}[{i}] is {_json_type(items[i])}, expected object")
    return items


def _numbers(items, list_name, keys) -> list[tuple]:
    """[{key: number}, ...] → [(value per key, ...), ...]; absent keys are 0. len(keys) ≥ 2."""
    try:
        rows = list(map(itemgetter(*keys), items))
    except KeyError:
        rows = [tuple([item.get(key, 0) for key in keys]) for item in items]
    # the common case checked at C speed: only ints and floats, none beyond ±LARGEST_INT (min/max skip a NaN
    # unless it comes first, and then the comparison fails and the slow loop below decides)
    values = list(chain.from_iterable(rows))
    if (not set(map(type, values)) <= {int, float}
            or (values and not -LARGEST_INT <= min(values) <= max(values) <= LARGEST_INT)):
        for i, row in enumerate(rows):
            for key, value in zip(keys, row):
                if not _is_number(value):
                    raise ValueError(f"{list_name}[{i}].{key} is {_json_type(value)}, expected number")
    return rows


def _strings(obj, key) -> list[str]:
    values = _field(obj, key, "list", [])
    for i, value in enumerate(values):
        if type(value) is not str:
            raise ValueError(f"{key}[{i}] is {_json_type(value)}, expected string")
    return values


# ---- Info.dat ----

def _info_major(info) -> str:
    """Info.dat JSON → "2" or "4", told by its keys."""
    if type(info) is not dict:
        raise ValueError(f"top level is {_json_type(info)}, expected object")
    if "_version" in info or "_difficultyBeatmapSets" in info:
        return "2"
    if "version" in info or "difficultyBeatmaps" in info:
        return "4"
    raise ValueError("neither a v2 nor a v4 Info.dat (Info 1.x is not supported)")


def _listings(info) -> list[tuple[dict, dict]]:
    """Info.dat JSON → [(beatmap set JSON object, difficulty JSON object), ...] in Info order, one per listed
    difficulty ({} as the set in v4, which has none); MapTooLarge past MAX_DIFFICULTIES."""
    if _info_major(info) == "2":
        listings = [(beatmap_set, beatmap) for beatmap_set in _objects(info, "_difficultyBeatmapSets")
                    for beatmap in _objects(beatmap_set, "_difficultyBeatmaps")]
    else:
        listings = [({}, beatmap) for beatmap in _objects(info, "difficultyBeatmaps")]
    if len(listings) > MAX_DIFFICULTIES:
        raise MapTooLarge(f"{len(listings)} difficulties listed, more than the limit of {MAX_DIFFICULTIES} "
                          f"(MAX_DIFFICULTIES)")
    return listings


def _hashed_files(info) -> list[str]:
    """Info.dat JSON → the file names level_hash reads after Info.dat, in order ("" where a name is absent)."""
    listings = _listings(info)
    if _info_major(info) == "2":
        return [_field(beatmap, "_beatmapFilename", "string", "") for _, beatmap in listings]
    names = [_field(_field(info, "audio", "object", {}), "audioDataFilename", "string", "")]
    for _, beatmap in listings:
        names += [_field(beatmap, "beatmapDataFilename", "string", ""),
                  _field(beatmap, "lightshowDataFilename", "string", "")]
    return names


def _parse_info(info) -> tuple[dict, list[_InfoEntry], str]:
    """Info.dat JSON → ({BeatMap field: value}, [_InfoEntry], AudioData file name or "" when none applies)."""
    if _info_major(info) == "2":
        head, entries, audio_data_filename = _parse_info_v2(info)
    else:
        head, entries, audio_data_filename = _parse_info_v4(info)
    if not MIN_BPM <= head["bpm"] <= MAX_BPM:
        raise ValueError(f"BPM {head['bpm']} outside {MIN_BPM}..{MAX_BPM} (MIN_BPM, MAX_BPM)")
    if not math.isfinite(head["song_time_offset_s"]):
        raise ValueError("song time offset is not finite")
    keys = Counter((entry.characteristic, entry.difficulty) for entry in entries)
    duplicates = [key for key, count in keys.items() if count > 1]
    if duplicates:
        raise ValueError(f"difficulties listed twice: {duplicates}")
    return head, entries, audio_data_filename


def _parse_info_v2(info):
    version = _field(info, "_version", "string", "")
    if version and not version.startswith("2."):
        raise ValueError(f"unsupported Info.dat _version {version!r}")
    head = dict(
        info_version=version,
        bpm=float(_field(info, "_beatsPerMinute", "number")),
        song_time_offset_s=float(_field(info, "_songTimeOffset", "number")),
        song_filename=_field(info, "_songFilename", "string", ""),
        song_name=_field(info, "_songName", "string", ""),
        song_sub_name=_field(info, "_songSubName", "string", ""),
        song_author=_field(info, "_songAuthorName", "string", ""),
        level_author=_field(info, "_levelAuthorName", "string", ""))
    if "_difficultyBeatmapSets" not in info:
        raise ValueError("no _difficultyBeatmapSets")
    entries = []
    for beatmap_set, beatmap in _listings(info):
        custom = _field(beatmap, "_customData", "object", {})
        entries.append(_info_entry(_field(beatmap_set, "_beatmapCharacteristicName", "string", ""), beatmap, custom,
                                   ("_difficulty", "_beatmapFilename", "_noteJumpMovementSpeed",
                                    "_noteJumpStartBeatOffset", "_requirements")))
    return head, entries, ""


def _info_entry(characteristic, beatmap, custom, keys):
    """One difficulty listing of an Info.dat → _InfoEntry; keys = the names (v2 or v4) of its difficulty, file name,
    NJS, start beat offset and (in custom) requirements."""
    difficulty, filename, njs, offset, requirements = keys
    return _InfoEntry(characteristic, _field(beatmap, difficulty, "string", ""), _field(beatmap, filename, "string", ""),
                      float(_field(beatmap, njs, "number")), float(_field(beatmap, offset, "number")),
                      _strings(custom, requirements))


def _parse_info_v4(info):
    version = _field(info, "version", "string", "")
    if not version.startswith("4."):
        raise ValueError(f"unsupported Info.dat version {version!r}")
    song = _field(info, "song", "object", {})
    audio = _field(info, "audio", "object", {})
    if "difficultyBeatmaps" not in info:
        raise ValueError("no difficultyBeatmaps")
    entries, mappers = [], []
    for _, beatmap in _listings(info):
        custom = _field(beatmap, "customData", "object", {})
        mappers += _strings(_field(beatmap, "beatmapAuthors", "object", {}), "mappers")
        entries.append(_info_entry(_field(beatmap, "characteristic", "string", ""), beatmap, custom,
                                   ("difficulty", "beatmapDataFilename", "noteJumpMovementSpeed",
                                    "noteJumpStartBeatOffset", "requirements")))
    head = dict(
        info_version=version,
        bpm=float(_field(audio, "bpm", "number")),
        song_time_offset_s=0.0,
        song_filename=_field(audio, "songFilename", "string", ""),
        song_name=_field(song, "title", "string", ""),
        song_sub_name=_field(song, "subTitle", "string", ""),
        song_author=_field(song, "author", "string", ""),
        level_author=", ".join(dict.fromkeys(mappers)))
    return head, entries, _field(audio, "audioDataFilename", "string", "")


def _audio_data_events(data, bpm) -> list[tuple[float, float]]:
    """v4 AudioData (or v2 BPMInfo) JSON → [(beat, bpm), ...]: one event per BPM region, then the Info bpm again
    at the end of the last region (the Info BPM continues after it). Region starts are not checked against the
    beat grid: a first region starting at a sample > 0 would be a song offset, which no fixture has."""
    if type(data) is not dict:
        raise ValueError(f"top level is {_json_type(data)}, expected object")
    if "_regions" in data:
        frequency = _field(data, "_songFrequency", "number")
        regions = _numbers(_objects(data, "_regions"), "_regions",
                           ("_startSampleIndex", "_endSampleIndex", "_startBeat", "_endBeat"))
    else:
        frequency = _field(data, "songFrequency", "number")
        regions = _numbers(_objects(data, "bpmData"), "bpmData", ("si", "ei", "sb", "eb"))
    events = []
    for start_sample, end_sample, start_beat, end_beat in regions:
        duration_s = (end_sample - start_sample) / frequency if frequency > 0 else 0.0
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"BPM region of {end_sample - start_sample} samples at {frequency} Hz")
        events.append((float(start_beat), (end_beat - start_beat) / duration_s * 60))
    if regions:
        events.append((float(regions[-1][3]), bpm))
    return events


# ---- difficulty files ----

def _parse_difficulty(data) -> tuple[str, dict]:
    """Difficulty JSON → (version string or "", parsed fields); the format is read from the file itself."""
    if type(data) is not dict:
        raise ValueError(f"top level is {_json_type(data)}, expected object")
    version = ""
    for key in ("version", "_version"):
        if data.get(key) is not None:
            version = _field(data, key, "string")
            break
    if version:
        major = version.split(".", 1)[0]
    else:
        major = ("4" if "colorNotesData" in data or "bombNotesData" in data
                 else "3" if "colorNotes" in data or "bpmEvents" in data
                 else "2" if "_notes" in data or "_events" in data or "_obstacles" in data
                 else "")
    parsers = {"1": _parse_v2, "2": _parse_v2, "3": _parse_v3, "4": _parse_v4}
    if major not in parsers:
        raise ValueError(f"unknown difficulty format (version {version!r})")
    return version, parsers[major](data)


def _parse_v2(data) -> dict:
    # rows = [(beat, x, y, type, direction), ...]; type 0 red, 1 blue, 3 bomb
    rows = _numbers(_objects(data, "_notes"), "_notes", ("_time", "_lineIndex", "_lineLayer", "_type", "_cutDirection"))
    notes, dropped = [], Counter()
    bombs = 0
    for beat, x, y, kind, direction in rows:
        if kind == V2_BOMB:
            bombs += 1
        else:
            _add_note(notes, dropped, beat, x, y, kind, direction)
    # tempo_events = [(beat, bpm), ...] from _events of _type 100 with a _floatValue (official BPM change, 2.5.0+)
    tempo_events = []
    for i, event in enumerate(_objects(data, "_events")):
        if event.get("_type") == 100 and "_floatValue" in event:
            beat, new_bpm = _numbers([event], f"_events[{i}]", ("_time", "_floatValue"))[0]
            tempo_events.append((float(beat), float(new_bpm)))
    return dict(notes=notes, chains=[], arcs=len(_objects(data, "_sliders")), bombs=bombs,
                obstacles=len(_objects(data, "_obstacles")), dropped=dropped, tempo_events=tempo_events)


def _parse_v3(data) -> dict:
    notes, chains, dropped = [], [], Counter()
    for beat, x, y, color, direction in _numbers(_objects(data, "colorNotes"), "colorNotes", ("b", "x", "y", "c", "d")):
        _add_note(notes, dropped, beat, x, y, color, direction)
    chain_keys = ("b", "x", "y", "c", "d", "tb", "tx", "ty", "sc", "s")
    for row in _numbers(_objects(data, "burstSliders"), "burstSliders", chain_keys):
        _add_chain(chains, dropped, row)
    tempo_events = [(float(beat), float(new_bpm))
                    for beat, new_bpm in _numbers(_objects(data, "bpmEvents"), "bpmEvents", ("b", "m"))]
    return dict(notes=notes, chains=chains, arcs=len(_objects(data, "sliders")),
                bombs=len(_objects(data, "bombNotes")), obstacles=len(_objects(data, "obstacles")),
                dropped=dropped, tempo_events=tempo_events)


def _parse_v4(data) -> dict:
    # note_data = [(x, y, color, direction), ...] shared by notes (colorNotes[].i) and chain heads (chains[].i)
    note_data = _numbers(_objects(data, "colorNotesData"), "colorNotesData", ("x", "y", "c", "d"))
    # chain_data = [(tail_x, tail_y, segments, squish), ...] indexed by chains[].ci
    chain_data = _numbers(_objects(data, "chainsData"), "chainsData", ("tx", "ty", "c", "s"))
    notes, chains, dropped = [], [], Counter()
    for beat, index in _numbers(_objects(data, "colorNotes"), "colorNotes", ("b", "i")):
        index = _index(index, len(note_data))
        if index is None:
            dropped["data index out of range"] += 1
        else:
            _add_note(notes, dropped, beat, *note_data[index])
    for beat, tail_beat, index, chain_index in _numbers(_objects(data, "chains"), "chains", ("hb", "tb", "i", "ci")):
        index, chain_index = _index(index, len(note_data)), _index(chain_index, len(chain_data))
        if index is None or chain_index is None:
            dropped["chain data index out of range"] += 1
        else:
            x, y, color, direction = note_data[index]
            tail_x, tail_y, segments, squish = chain_data[chain_index]
            _add_chain(chains, dropped, (beat, x, y, color, direction, tail_beat, tail_x, tail_y, segments, squish))
    return dict(notes=notes, chains=chains, arcs=len(_objects(data, "arcs")),
                bombs=len(_objects(data, "bombNotes")), obstacles=len(_objects(data, "obstacles")),
                dropped=dropped, tempo_events=[])


def _index(value, size):
    """A JSON number used as a list index → int, or None when it is not an integer in 0..size-1."""
    if type(value) is float:
        if not value.is_integer():
            return None
        value = int(value)
    return value if 0 <= value < size else None


def _note_problem(beat, x, y, color, direction):
    """→ why a note cannot be represented, or None when beat is in 0..MAX_BEAT and x, y, color, direction are in
    range."""
    if not math.isfinite(beat):
        return "beat not finite"
    if beat < 0:
        return "beat negative"
    if beat > MAX_BEAT:
        return "beat past MAX_BEAT"
    if (math.isfinite(x) and abs(x) >= 1000) or (math.isfinite(y) and abs(y) >= 1000):
        return "mapping extensions position"
    if x not in LANES:
        return "x out of range"
    if y not in LAYERS:
        return "y out of range"
    if color not in COLORS:
        return "color out of range"
    if 1000 <= direction <= 1360:
        return "mapping extensions direction"
    if direction not in DIRECTIONS:
        return "direction out of range"
    return None


def _add_note(notes, dropped, beat, x, y, color, direction):
    if 0 <= beat <= MAX_BEAT and x in LANES and y in LAYERS and color in COLORS and direction in DIRECTIONS:
        notes.append(Note(float(beat), int(x), int(y), int(color), int(direction)))
    else:
        dropped[_note_problem(beat, x, y, color, direction)] += 1


def _add_chain(chains, dropped, row):
    """row = (beat, x, y, color, direction, tail beat, tail x, tail y, segments, squish) numbers of a chain → a Chain
    appended to chains, or a reason counted in dropped."""
    beat, x, y, color, direction, tail_beat, tail_x, tail_y, segments, squish = row
    # the tail has no direction of its own: 8 (any) lets _note_problem check only its beat and position
    problem = (_note_problem(beat, x, y, color, direction)
               or _note_problem(tail_beat, tail_x, tail_y, color, 8)
               or (None if 1 <= segments <= MAX_CHAIN_SEGMENTS and float(segments).is_integer()
                   and 0 < squish <= MAX_SQUISH else "segments or squish out of range"))
    if problem:
        dropped["chain " + problem] += 1
    else:
        chains.append(Chain(float(beat), int(x), int(y), int(color), int(direction),
                            float(tail_beat), int(tail_x), int(tail_y), int(segments), float(squish)))


# ---- many maps ----

@dataclass
class MapItem:
    source: str                # path of the map zip or folder
    characteristic: str
    difficulty: str
    bpm: float                 # Info BPM; the map has no tempo changes
    notes: list[Note]          # colour notes sorted by (beat, x, y, color, direction); with the dataset's
                               # chain_notes, what it returns (e.g. also each chain's head and pieces)
    audio_filename: str        # the song file's name inside the map

    def read_audio(self) -> bytes:
        """The song file's bytes (still encoded: .ogg/.egg/.wav); ValueError when missing."""
        return _read_song(self.source, self.audio_filename)


class ZippedBeatSaberDataset:
    """One MapItem per usable (map, difficulty) in a directory of map zips (and map folders)."""

    def __init__(self, directory, characteristic="Standard", difficulties=("Expert", "ExpertPlus"),
                 chain_notes=None):
        """directory: holds *.zip maps and/or map folders with an Info.dat. Unusable maps and difficulties are
        skipped, logged (one line each: path and reason) and counted in self.skipped[reason]; a map that cannot be
        read (any ValueError, or an OSError such as an unreadable folder) counts as "unreadable map".
        chain_notes: None (MapItem.notes = the colour notes) or a callable Difficulty → [Note] giving MapItem.notes,
        e.g. utils.chains_to_notes to add the notes each chain stands for; it runs once per difficulty."""
        if chain_notes is not None and not callable(chain_notes):
            raise TypeError(f"chain_notes must be None or a callable Difficulty → [Note], not {chain_notes!r}")
        self.directory = Path(directory)
        self.characteristic = characteristic
        self.difficulties = tuple(difficulties)
        self.chain_notes = chain_notes
        # skipped = {reason: number of maps or difficulties skipped for it}
        self.skipped = Counter()
        # items = [MapItem, ...]; each keeps its notes (~100 bytes a note, ~0.1 MB a difficulty): simple, and fine
        # for tens of thousands of difficulties
        self.items = []
        paths = _map_paths(self.directory)
        for path in tqdm(paths, desc="reading maps", unit="map", disable=len(paths) < 100):
            self.items += self._usable_items(path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i) -> MapItem:
        return self.items[i]

    def _skip(self, where, reason, detail=""):
        self.skipped[reason] += 1
        logger.info("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
        return []

    def _usable_items(self, path) -> list[MapItem]:
        try:
            beatmap, has_song = _read_map(path)
        except (ValueError, OSError) as error:
            return self._skip(path, "unreadable map", str(error))
        keys = set(beatmap.difficulties) | set(beatmap.broken)
        wanted = [(self.characteristic, name) for name in self.difficulties if (self.characteristic, name) in keys]
        if not any(characteristic == self.characteristic for characteristic, _ in keys):
            return self._skip(path, "characteristic absent", self.characteristic)
        if not wanted:
            return self._skip(path, "difficulty absent", "/".join(self.difficulties))
        if beatmap.song_time_offset_s != 0:
            return self._skip(path, "song time offset", f"{beatmap.song_time_offset_s} s")
        if not has_song:
            return self._skip(path, "missing audio file", beatmap.song_filename)
        items = []
        for key in wanted:
            where = f"{path} {key[0]}/{key[1]}"
            if key in beatmap.broken:
                self._skip(where, "broken difficulty file", beatmap.broken[key])
                continue
            difficulty = beatmap.difficulties[key]
            reason = _difficulty_problem(difficulty)
            if reason:
                self._skip(where, reason)
                continue
            notes = difficulty.notes if self.chain_notes is None else self.chain_notes(difficulty)
            if not notes:
                self._skip(where, "no notes")
                continue
            items.append(MapItem(source=beatmap.source, characteristic=key[0], difficulty=key[1], bpm=beatmap.bpm,
                                 notes=notes, audio_filename=beatmap.song_filename))
        return items


def _difficulty_problem(difficulty):
    """→ why a parsed difficulty is unusable for training, or None."""
    if difficulty.bpm_changes:
        return "bpm changes"
    for requirement in UNSUPPORTED_REQUIREMENTS:
        if requirement in difficulty.requirements:
            return f"requires {requirement}"
    if difficulty.dropped:
        return "dropped notes"
    return None


def _map_paths(directory) -> list[Path]:
    """directory → sorted [*.zip files, folders holding an Info.dat (any case), and entries that cannot be looked
    at: reading those fails, so the dataset counts them as unreadable maps]."""
    try:
        with os.scandir(directory) as entries:
            entries = sorted(entries, key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{directory}: not a directory") from None
    except OSError as error:
        raise ValueError(f"{directory}: cannot list ({error})") from None
    paths = []
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_file() and path.suffix.lower() == ".zip":
                paths.append(path)
            elif entry.is_dir():
                with os.scandir(path) as children:
                    if any(child.name.lower() == "info.dat" for child in children):
                        paths.append(path)
        except OSError:
            paths.append(path)
    return paths
