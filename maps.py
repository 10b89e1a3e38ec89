"""Reading Beat Saber maps: a map .zip or folder → BeatMap, and a directory of maps → MapItems for training.

Info.dat v2 (2.0.0/2.1.0) and v4 (4.0.x); difficulty files v2 (also 1.x and files without `_version`), v3 and
v4, recognised by their own content whatever the Info version. Zips are read in memory, never extracted.
Only this module parses map files; it knows nothing about tokens.

Bad input raises ValueError("<map path>: <file>: <reason>"). A difficulty file that cannot be read (missing,
broken JSON, a value of the wrong JSON type) goes to BeatMap.broken instead, so the rest of the map stays usable.
A note the game would load but this project cannot represent (NaN or negative beat, x/y/colour/direction out of
range, Mapping Extensions precision values) is dropped and counted in Difficulty.dropped[reason].
Absent fields default to 0, as the game's deserialiser does (v3 ≥ 3.3.0 and v4 omit defaults on purpose).
"""

import hashlib
import json
import logging
import math
import os
import struct
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

MAX_DAT_BYTES = 64 * 2**20        # largest Info / difficulty / AudioData file read (uncompressed)
MAX_AUDIO_BYTES = 256 * 2**20     # largest song file read
MAX_ENTRIES = 4096                # most files in one map zip or folder
BPM_TOLERANCE = 1e-5              # relative: a tempo within this of the one in effect is no change (3 ms over 300 s)
UNSUPPORTED_REQUIREMENTS = ("Noodle Extensions", "Mapping Extensions", "Vivify")   # notes move off the grid

LANES = (0, 1, 2, 3)              # x, left → right
LAYERS = (0, 1, 2)                # y, bottom → top
COLORS = (0, 1)                   # red/left, blue/right
DIRECTIONS = tuple(range(9))      # 0 up … 7 down-right, 8 any
V2_BOMB = 3                       # v2 `_type` of a bomb


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
    """A map .zip, map folder (or its Info.dat) → BeatMap. ValueError("<path>: <reason>") on bad input."""
    return _read_map(path)[0]


def _read_map(path) -> tuple[BeatMap, bool]:
    """path → (BeatMap, whether the song file named in Info.dat is in the map)."""
    source = os.fspath(path)
    try:
        with _MapFiles(source) as files:
            beatmap = _read_files(files, source)
            return beatmap, files.find(beatmap.song_filename) is not None
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _read_files(files, source) -> BeatMap:
    # info = the Info.dat JSON object; head = {BeatMap field: value} for the scalar fields
    try:
        head, entries, audio_data_filename = _parse_info(_load_json(files.read(files.info_name, MAX_DAT_BYTES)))
    except ValueError as error:
        raise ValueError(f"{files.info_name}: {error}") from None

    # tempo_events = [(beat, bpm), ...] from v4 AudioData; they apply to every difficulty
    tempo_events = []
    if audio_data_filename:
        try:
            tempo_events = _audio_data_events(_load_json(files.read(audio_data_filename, MAX_DAT_BYTES)), head["bpm"])
        except ValueError as error:
            raise ValueError(f"{audio_data_filename}: {error}") from None

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
    a map read_map refuses (no BPM, say) still has a hash. ValueError("<path>: <reason>") on bad input.
    """
    source = os.fspath(path)
    try:
        with _MapFiles(source) as files:
            info_bytes = files.read(files.info_name, MAX_DAT_BYTES)
            try:
                names = _hashed_files(_load_json(info_bytes))
            except ValueError as error:
                raise ValueError(f"{files.info_name}: {error}") from None
            sha1 = hashlib.sha1(info_bytes)
            for name in names:
                if name and files.find(name) is not None:
                    try:
                        sha1.update(files.read(name, MAX_DAT_BYTES))
                    except ValueError as error:
                        raise ValueError(f"{name}: {error}") from None
            return sha1.hexdigest()
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _read_difficulty(files, entry, bpm, tempo_events) -> Difficulty:
    data = _load_json(files.read(entry.filename, MAX_DAT_BYTES))
    version, parsed = _parse_difficulty(data)
    # parsed = {"notes": [Note], "chains": [Chain], "arcs", "bombs", "obstacles": int,
    #           "dropped": Counter, "tempo_events": [(beat, bpm), ...] from the file itself}
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
    one folder); a folder's are its top-level files. Names are looked up exactly, then ignoring case."""

    def __init__(self, source):
        path = Path(source)
        if path.is_file() and path.name.lower() == "info.dat":
            path = path.parent
        self.zip = None
        if path.is_dir():
            # members = {name relative to the map: Path}
            self.members = _folder_members(path)
        elif path.is_file():
            self.zip, self.members = _open_zip(path)
        else:
            raise ValueError("no such file or folder")
        self.lower_names = {name.lower(): name for name in self.members}
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
        if self.zip is not None:
            self.zip.close()

    def find(self, name):
        """A file name from Info.dat → the member's name, or None when the map has no such file."""
        name = name.replace("\\", "/")
        if name in self.members:
            return name
        return self.lower_names.get(name.lower())

    def read(self, name, limit) -> bytes:
        member = self.find(name)
        if member is None:
            raise ValueError("file missing")
        if self.zip is None:
            return _read_bounded_file(self.members[member], limit)
        return _read_bounded_zip_entry(self.zip, self.members[member], limit)


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError,
               OSError, struct.error, OverflowError, ValueError)


def _folder_members(path) -> dict[str, Path]:
    try:
        with os.scandir(path) as entries:
            members = {}
            for entry in entries:
                if len(members) >= MAX_ENTRIES:
                    raise ValueError(f"more than {MAX_ENTRIES} files")
                if entry.is_file():
                    members[entry.name] = Path(entry.path)
            return members
    except OSError as error:
        raise ValueError(f"cannot list folder ({error})") from None


def _open_zip(path):
    """→ (open ZipFile, {name relative to the map: ZipInfo}) for the files beside the shallowest Info.dat."""
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except _ZIP_ERRORS as error:
        raise ValueError(f"not a readable zip file ({error})") from None
    if len(infos) > MAX_ENTRIES:
        archive.close()
        raise ValueError(f"more than {MAX_ENTRIES} files in the zip")
    # names = [(path inside the zip with "/" separators, ZipInfo), ...] for files, not folders
    names = [(info.filename.replace("\\", "/"), info) for info in infos if not info.is_dir()]
    info_paths = [name for name, _ in names if name.rsplit("/", 1)[-1].lower() == "info.dat"]
    if not info_paths:
        archive.close()
        raise ValueError("no Info.dat in the zip")
    depth = min(name.count("/") for name in info_paths)
    shallowest = [name for name in info_paths if name.count("/") == depth]
    if len(shallowest) > 1:
        archive.close()
        raise ValueError(f"several Info.dat files: {shallowest}")
    prefix = shallowest[0][: len(shallowest[0]) - len("info.dat")]
    members = {name[len(prefix):]: info for name, info in names if name.startswith(prefix)}
    return archive, members


def _read_bounded_zip_entry(archive, info, limit) -> bytes:
    return _read_bounded(info.file_size, lambda: archive.open(info), limit, _ZIP_ERRORS, "unreadable zip entry")


def _read_bounded_file(path, limit) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ValueError(f"cannot read ({error})") from None
    return _read_bounded(size, lambda: open(path, "rb"), limit, OSError, "cannot read")


def _read_bounded(declared_bytes, open_stream, limit, errors, what) -> bytes:
    """The bytes of a stream whose declared size and actual length must both stay within limit; ValueError if not."""
    if declared_bytes > limit:
        raise ValueError(f"{declared_bytes} bytes, more than the limit of {limit}")
    try:
        with open_stream() as stream:
            data = stream.read(limit + 1)
    except errors as error:
        raise ValueError(f"{what} ({error})") from None
    if len(data) > limit:
        raise ValueError(f"more than the limit of {limit} bytes")
    return data


def _read_song(source, filename) -> bytes:
    try:
        with _MapFiles(source) as files:
            try:
                return files.read(filename, MAX_AUDIO_BYTES)
            except ValueError as error:
                raise ValueError(f"{filename or '(no song file name)'}: {error}") from None
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _load_json(data: bytes):
    """File bytes (UTF-8, optional BOM, optionally gzip-deflated as v4 allows) → the JSON value."""
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data)
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
        raise ValueError(f"gzip data inflates past the limit of {MAX_DAT_BYTES} bytes")
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


def _hashed_files(info) -> list[str]:
    """Info.dat JSON → the file names level_hash reads after Info.dat, in order ("" where a name is absent)."""
    if _info_major(info) == "2":
        return [_field(beatmap, "_beatmapFilename", "string", "")
                for beatmap_set in _objects(info, "_difficultyBeatmapSets")
                for beatmap in _objects(beatmap_set, "_difficultyBeatmaps")]
    names = [_field(_field(info, "audio", "object", {}), "audioDataFilename", "string", "")]
    for beatmap in _objects(info, "difficultyBeatmaps"):
        names += [_field(beatmap, "beatmapDataFilename", "string", ""),
                  _field(beatmap, "lightshowDataFilename", "string", "")]
    return names


def _parse_info(info) -> tuple[dict, list[_InfoEntry], str]:
    """Info.dat JSON → ({BeatMap field: value}, [_InfoEntry], AudioData file name or "" when none applies)."""
    if _info_major(info) == "2":
        head, entries, audio_data_filename = _parse_info_v2(info)
    else:
        head, entries, audio_data_filename = _parse_info_v4(info)
    if not (math.isfinite(head["bpm"]) and head["bpm"] > 0):
        raise ValueError(f"BPM {head['bpm']} is not a positive number")
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
    for beatmap_set in _objects(info, "_difficultyBeatmapSets"):
        characteristic = _field(beatmap_set, "_beatmapCharacteristicName", "string", "")
        for beatmap in _objects(beatmap_set, "_difficultyBeatmaps"):
            custom = _field(beatmap, "_customData", "object", {})
            entries.append(_InfoEntry(
                characteristic=characteristic,
                difficulty=_field(beatmap, "_difficulty", "string", ""),
                filename=_field(beatmap, "_beatmapFilename", "string", ""),
                njs=float(_field(beatmap, "_noteJumpMovementSpeed", "number")),
                offset_beats=float(_field(beatmap, "_noteJumpStartBeatOffset", "number")),
                requirements=_strings(custom, "_requirements")))
    return head, entries, ""


def _parse_info_v4(info):
    version = _field(info, "version", "string", "")
    if not version.startswith("4."):
        raise ValueError(f"unsupported Info.dat version {version!r}")
    song = _field(info, "song", "object", {})
    audio = _field(info, "audio", "object", {})
    if "difficultyBeatmaps" not in info:
        raise ValueError("no difficultyBeatmaps")
    entries, mappers = [], []
    for beatmap in _objects(info, "difficultyBeatmaps"):
        custom = _field(beatmap, "customData", "object", {})
        mappers += _strings(_field(beatmap, "beatmapAuthors", "object", {}), "mappers")
        entries.append(_InfoEntry(
            characteristic=_field(beatmap, "characteristic", "string", ""),
            difficulty=_field(beatmap, "difficulty", "string", ""),
            filename=_field(beatmap, "beatmapDataFilename", "string", ""),
            njs=float(_field(beatmap, "noteJumpMovementSpeed", "number")),
            offset_beats=float(_field(beatmap, "noteJumpStartBeatOffset", "number")),
            requirements=_strings(custom, "requirements")))
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
        _add_chain(chains, dropped, *row)
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
            _add_chain(chains, dropped, beat, x, y, color, direction, tail_beat, tail_x, tail_y, segments, squish)
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
    """→ why a note cannot be represented, or None when beat ≥ 0 is finite and x, y, color, direction are in range."""
    if not math.isfinite(beat):
        return "beat not finite"
    if beat < 0:
        return "beat negative"
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
    if 0 <= beat < math.inf and x in LANES and y in LAYERS and color in COLORS and direction in DIRECTIONS:
        notes.append(Note(float(beat), int(x), int(y), int(color), int(direction)))
    else:
        dropped[_note_problem(beat, x, y, color, direction)] += 1


def _add_chain(chains, dropped, beat, x, y, color, direction, tail_beat, tail_x, tail_y, segments, squish):
    # the tail has no direction of its own: 8 (any) lets _note_problem check only its beat and position
    problem = (_note_problem(beat, x, y, color, direction)
               or _note_problem(tail_beat, tail_x, tail_y, color, 8)
               or (None if segments >= 1 and float(segments).is_integer() and math.isfinite(squish)
                   else "segments or squish out of range"))
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
                               # chain_notes, also each chain's head and segment notes (utils.chains_to_notes)
    audio_filename: str        # the song file's name inside the map

    def read_audio(self) -> bytes:
        """The song file's bytes (still encoded: .ogg/.egg/.wav); ValueError when missing."""
        return _read_song(self.source, self.audio_filename)


class ZippedBeatSaberDataset:
    """One MapItem per usable (map, difficulty) in a directory of map zips (and map folders)."""

    def __init__(self, directory, characteristic="Standard", difficulties=("Expert", "ExpertPlus"),
                 chain_notes=False):
        """directory: holds *.zip maps and/or map folders with an Info.dat. Unusable maps and difficulties are
        skipped, logged (one line each: path and reason) and counted in self.skipped[reason].
        chain_notes: MapItem.notes also holds the notes each chain stands for (head + segments); off by default."""
        self.directory = Path(directory)
        self.characteristic = characteristic
        self.difficulties = tuple(difficulties)
        # chains_to_notes = utils.chains_to_notes (Difficulty → [Note]) or None. Parsing stays here, conversion in
        # utils.py, imported only when asked for (utils imports maps); it runs once per difficulty while reading.
        self.chains_to_notes = None
        if chain_notes:
            from utils import chains_to_notes
            self.chains_to_notes = chains_to_notes
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
        except ValueError as error:
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
            notes = self.chains_to_notes(difficulty) if self.chains_to_notes else difficulty.notes
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
    """directory → sorted [*.zip files and folders holding an Info.dat (any case)]."""
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    paths = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix.lower() == ".zip":
            paths.append(path)
        elif path.is_dir() and any(child.name.lower() == "info.dat" for child in path.iterdir()):
            paths.append(path)
    return paths
