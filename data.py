"""The token space, chunking, training sequences, the audio-code cache and the collator.

A training sequence for one chunk of one difficulty:

    [BOS] [AUDIO_START] c0_f0 c1_f0 c0_f1 c1_f1 … [AUDIO_END] [NOTES_START] tick type tick type … [EOS]

Ticks are 48 per beat, counted from the chunk's first beat; a note type packs (x, y, color, direction).
"""

import contextlib
import copy
import hashlib
import io
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from audio import audio_duration_s, create_audio_tokenizer, load_audio
from maps import write_atomic

log = logging.getLogger(__name__)

# ---- token space ----

PPQ = 48                    # ticks per beat
N_LANES, N_LAYERS, N_COLORS, N_DIRECTIONS = 4, 3, 2, 10   # direction 9 is never written by the game; the slot stays
N_CODEBOOKS, CODEBOOK_SIZE = 2, 1024                       # Encodec 24 kHz at 1.5 kbps
TOKEN_SPACE_VERSION = 1

# (name, size): contiguous ranges from id 0, in this order; offsets are derived below
TOKEN_TABLE = [
    ("tick", 12288),
    ("note_type", N_LANES * N_LAYERS * N_COLORS * N_DIRECTIONS),   # 240
    ("audio", N_CODEBOOKS * CODEBOOK_SIZE),                        # 2048
    ("bos", 1),
    ("eos", 1),
    ("pad", 1),
    ("audio_start", 1),
    ("audio_end", 1),
    ("notes_start", 1),
]
OFFSETS = {}
SIZES = dict(TOKEN_TABLE)
_next_id = 0
for _name, _size in TOKEN_TABLE:
    OFFSETS[_name] = _next_id
    _next_id += _size
VOCAB_USED = _next_id       # 14582 ids; the model keeps its own (larger) vocabulary

TICK_OFFSET = OFFSETS["tick"]
NOTE_TYPE_OFFSET = OFFSETS["note_type"]
AUDIO_OFFSET = OFFSETS["audio"]
BOS = OFFSETS["bos"]
EOS = OFFSETS["eos"]
PAD = OFFSETS["pad"]
AUDIO_START = OFFSETS["audio_start"]
AUDIO_END = OFFSETS["audio_end"]
NOTES_START = OFFSETS["notes_start"]
MAX_TICK = SIZES["tick"] - 1
IGNORE_INDEX = -100


def note_type(x, y, color, direction):
    """(lane 0..3, layer 0..2, color 0..1, direction 0..9) → note type 0..239 = (y * 4 + x) * 20 + color * 10 + direction."""
    for value, size, what in ((x, N_LANES, "x"), (y, N_LAYERS, "y"), (color, N_COLORS, "color"),
                              (direction, N_DIRECTIONS, "direction")):
        if not 0 <= value < size:
            raise ValueError(f"note {what}={value} out of range 0..{size - 1}")
    return ((y * N_LANES + x) * N_COLORS + color) * N_DIRECTIONS + direction


def note_fields(type_):
    """note type 0..239 → (x, y, color, direction)."""
    if not 0 <= type_ < SIZES["note_type"]:
        raise ValueError(f"note type {type_} out of range 0..{SIZES['note_type'] - 1}")
    position, rest = divmod(type_, N_COLORS * N_DIRECTIONS)
    color, direction = divmod(rest, N_DIRECTIONS)
    y, x = divmod(position, N_LANES)
    return x, y, color, direction


def tick_token(tick):
    if not 0 <= tick <= MAX_TICK:
        raise ValueError(f"tick {tick} out of range 0..{MAX_TICK}")
    return TICK_OFFSET + tick


def note_type_token(type_):
    if not 0 <= type_ < SIZES["note_type"]:
        raise ValueError(f"note type {type_} out of range 0..{SIZES['note_type'] - 1}")
    return NOTE_TYPE_OFFSET + type_


def token_kind(token):
    """Which TOKEN_TABLE range a token id falls in ("tick", "audio", "eos", ...)."""
    for name, size in TOKEN_TABLE:
        if OFFSETS[name] <= token < OFFSETS[name] + size:
            return name
    raise ValueError(f"token {token} is outside the token space 0..{VOCAB_USED - 1}")


def in_range(tokens, name):
    """Boolean mask (same shape as the tensor `tokens`) of ids inside TOKEN_TABLE range `name`."""
    return (tokens >= OFFSETS[name]) & (tokens < OFFSETS[name] + SIZES[name])


def audio_tokens(codes):
    """codes = (frames, N_CODEBOOKS) ints 0..1023 → [c0_f0, c1_f0, c0_f1, c1_f1, ...] token ids."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] != N_CODEBOOKS:
        raise ValueError(f"audio codes must be (frames, {N_CODEBOOKS}), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
        raise ValueError(f"audio codes must lie in 0..{CODEBOOK_SIZE - 1}")
    return (AUDIO_OFFSET + codes + np.arange(N_CODEBOOKS) * CODEBOOK_SIZE).reshape(-1).tolist()


def audio_codes(tokens):
    """Inverse of audio_tokens: flat audio token ids → (frames, N_CODEBOOKS) int64 codes."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, N_CODEBOOKS)
    codes = tokens - AUDIO_OFFSET - np.arange(N_CODEBOOKS) * CODEBOOK_SIZE
    if tokens.size and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
        raise ValueError("audio token of the wrong codebook or outside the audio range")
    return codes


def prompt_tokens(codes):
    """codes = (frames, N_CODEBOOKS) → [BOS, AUDIO_START, audio…, AUDIO_END, NOTES_START]; what inference prefills."""
    return [BOS, AUDIO_START, *audio_tokens(codes), AUDIO_END, NOTES_START]


def note_tokens(notes):
    """notes = [(tick, note_type), ...] → [tick, type, tick, type, ...] ids, sorted by (tick, type)."""
    tokens = []
    for tick, type_ in sorted(notes):
        tokens += [tick_token(tick), note_type_token(type_)]
    return tokens


def create_training_sequence(codes, notes):
    """codes = (frames, N_CODEBOOKS) ints; notes = [(tick, note_type), ...] → the full token list ending in EOS."""
    return prompt_tokens(codes) + note_tokens(notes) + [EOS]


def decode_note_tokens(tokens):
    """Generated ids after NOTES_START → [(tick, note_type), ...]; stops at EOS/PAD; ValueError on a broken pair."""
    notes = []
    for i in range(0, len(tokens), 2):
        if tokens[i] in (EOS, PAD):
            break
        if i + 1 >= len(tokens) or token_kind(tokens[i]) != "tick" or token_kind(tokens[i + 1]) != "note_type":
            raise ValueError(f"tokens {list(tokens[i:i + 2])} at {i} are not a (tick, note type) pair")
        notes.append((tokens[i] - TICK_OFFSET, tokens[i + 1] - NOTE_TYPE_OFFSET))
    return notes


def sequence_length(n_frames, n_notes):
    """Tokens in a training sequence: 4 prompt specials + audio + 2 per note + EOS."""
    return 5 + N_CODEBOOKS * n_frames + 2 * n_notes


# ---- model metadata: the token space and audio settings a model was trained with ----

METADATA_FILE = "beatgen.json"
# what infer.py reads from beatgen.json besides the token-space fields: name → type
METADATA_FIELDS = {"audio_model": str, "bandwidth": float, "sample_rate": int, "frame_rate": float,
                   "max_seq_length": int}


def save_metadata(model_dir, audio_tokenizer, audio_model, chunk_duration, max_seq_length, chunk_beats=None):
    """Write model_dir/beatgen.json, which infer.py reads to rebuild the token space, the audio tokenizer and the
    chunking (chunk_beats whole beats, or with chunk_beats None as many as fit in chunk_duration seconds)."""
    metadata = {"token_space_version": TOKEN_SPACE_VERSION, "vocab_used": VOCAB_USED, "ppq": PPQ,
                "audio_model": str(audio_model), "bandwidth": audio_tokenizer.bandwidth,
                "sample_rate": audio_tokenizer.sample_rate, "frame_rate": audio_tokenizer.frame_rate,
                "n_codebooks": audio_tokenizer.n_codebooks, "chunk_beats": chunk_beats,
                "chunk_duration": None if chunk_beats else chunk_duration, "max_seq_length": max_seq_length}
    write_atomic(os.path.join(model_dir, METADATA_FILE), json.dumps(metadata, indent=2))


def load_metadata(model_dir):
    """model_dir/beatgen.json → dict; ValueError when it is missing, unreadable, or for another token space, or a
    METADATA_FIELDS field or the chunking (chunk_beats, or when that is null or absent, chunk_duration) is missing
    or of the wrong type."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise ValueError(f"{model_dir}: no {METADATA_FILE}; is this a folder written by train.py?")
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(metadata, dict) or metadata.get("token_space_version") != TOKEN_SPACE_VERSION \
            or metadata.get("ppq") != PPQ or metadata.get("n_codebooks") != N_CODEBOOKS:
        raise ValueError(f"{path}: written for another token space than version {TOKEN_SPACE_VERSION} "
                         f"(PPQ {PPQ}, {N_CODEBOOKS} codebooks)")
    # chunk_beats set: chunks of whole beats; else (older models too) chunk_duration seconds
    fields = {**METADATA_FIELDS, **({"chunk_beats": int} if metadata.get("chunk_beats") is not None
                                    else {"chunk_duration": float})}
    for key, kind in fields.items():
        if not _usable(metadata.get(key), kind):
            raise ValueError(f"{path}: {key} is {metadata.get(key)!r}, expected "
                             f"{'a name' if kind is str else f'a {kind.__name__} > 0'}")
    return metadata


def _usable(value, kind):
    """Whether a beatgen.json value is of kind: a non-empty str, or a finite number > 0 (an int for int)."""
    if kind is str:
        return isinstance(value, str) and value != ""
    return type(value) in ((int,) if kind is int else (int, float)) and math.isfinite(value) and value > 0


# ---- chunking ----

def beats_per_chunk(bpm, chunk_duration_s=None, chunk_beats=None):
    """Whole beats per chunk: chunk_beats, or as many as fit in chunk_duration_s seconds; at most what the tick range
    can address (256)."""
    if chunk_beats:
        n_beats = int(chunk_beats)
    else:
        n_beats = math.floor(chunk_duration_s * bpm / 60 + 1e-9)
        if n_beats < 1:
            raise ValueError(f"chunk of {chunk_duration_s} s is shorter than one beat at {bpm} BPM")
    return min(n_beats, (MAX_TICK + 1) // PPQ)


def chunk_plan(duration_s, bpm, chunk_duration_s, frame_rate, chunk_beats=None):
    """Split a song into chunks that start and end on whole beats, all with the same number of audio frames.

    Returns [(start_beat, end_beat, start_frame, end_frame), ...] covering [0, duration_s): chunk k spans beats
    [k·n, (k+1)·n) with n = beats_per_chunk(bpm, chunk_duration_s, chunk_beats), and the audio frames
    [floor(start_s·frame_rate), that + ceil(n·60/bpm·frame_rate)): neighbours share at most one frame, and the last
    chunk's frames past the song are silence (chunk_codes).
    """
    n_beats = beats_per_chunk(bpm, chunk_duration_s, chunk_beats)
    n_frames = math.ceil(n_beats * 60 / bpm * frame_rate - 1e-9)
    n_chunks = max(1, math.ceil(duration_s * bpm / 60 / n_beats - 1e-9))
    plan = []
    for k in range(n_chunks):
        start_beat, end_beat = k * n_beats, (k + 1) * n_beats
        start_frame = math.floor(start_beat * 60 / bpm * frame_rate + 1e-9)
        plan.append((start_beat, end_beat, start_frame, start_frame + n_frames))
    return plan


def chunk_codes(codes, start_frame, end_frame, silence):
    """codes = (frames, N_CODEBOOKS) of a whole song → its frames [start_frame, end_frame), the frames past the song
    filled with silence = (N_CODEBOOKS,) the audio tokenizer's codes of silence (AudioTokenizer.silence)."""
    part = codes[start_frame:end_frame]
    missing = end_frame - start_frame - len(part)
    return np.concatenate([part, np.tile(np.asarray(silence, dtype=part.dtype), (missing, 1))]) if missing > 0 else part


def chunk_notes(ticks, types, start_beat, end_beat):
    """ticks = (n,) int absolute ticks sorted, types = (n,) int note types → [(tick from chunk start, type), ...].

    A note belongs to the chunk whose tick range holds its rounded tick, so every note lands in exactly one chunk.
    """
    lo, hi = np.searchsorted(ticks, [start_beat * PPQ, end_beat * PPQ])
    return list(zip((ticks[lo:hi] - start_beat * PPQ).tolist(), types[lo:hi].tolist()))


# ---- dataset with an audio-code cache ----

CACHE_VERSION = 1


class BeatDataset(torch.utils.data.Dataset):
    """Training sequences, one per chunk of every (map, difficulty) item of a ZippedBeatSaberDataset.

    Items are {"input_ids": [int, ...]}. Chunks are chunk_beats whole beats, or with chunk_beats None as many as fit
    in chunk_duration seconds (chunk_plan); the last chunk of a song ends in silence. Audio codes of a whole song are
    computed once (first encounter) and stored in cache_dir; every later chunk, epoch and difficulty of the same song
    reads them from there.
    A chunk longer than max_seq_length is skipped (counted in self.skipped) rather than truncated, because a cut
    sequence would teach the model to stop early.
    """

    def __init__(self, base, chunk_duration=30.0, max_seq_length=32767, cache_dir=None, audio_tokenizer=None,
                 chunk_beats=None):
        # base is a ZippedBeatSaberDataset: base[i] = MapItem(source, bpm, notes, read_audio(), ...)
        self.base = base
        self.chunk_duration = chunk_duration
        self.chunk_beats = chunk_beats
        self.max_seq_length = max_seq_length
        if audio_tokenizer is None:
            audio_tokenizer = create_audio_tokenizer()
        if audio_tokenizer.n_codebooks != N_CODEBOOKS:
            raise ValueError(f"the audio tokenizer gives {audio_tokenizer.n_codebooks} codebooks per frame; the token "
                             f"space holds {N_CODEBOOKS} (Encodec 24 kHz at 1.5 kbps: --bandwidth 1.5)")
        self.audio_tokenizer = audio_tokenizer
        self.cache = CodeCache(cache_dir or default_cache_dir(), audio_tokenizer.identity)
        self.silence = audio_tokenizer.silence      # (N_CODEBOOKS,) codes of silence: pads the last chunk of a song
        self.skipped = Counter()
        # songs = {source: (audio_sha1, duration_s)}, one entry per zip, shared by its difficulties
        songs = {}
        # notes[i] = (ticks (n,) int64 absolute, types (n,) int64); audio_sha1[i] = item i's song key;
        # sources[i] = item i's map path; chunks = [(item index, (start_beat, end_beat, start_frame, end_frame)), ...]
        self.notes, self.audio_sha1, self.sources, self.chunks = [], [], [], []
        for i in tqdm(range(len(base)), desc="indexing maps", unit="map", disable=len(base) < 50):
            item = base[i]
            try:
                if item.source not in songs:
                    songs[item.source] = song_facts(item)
                plan = chunk_plan(songs[item.source][1], item.bpm, chunk_duration, audio_tokenizer.frame_rate,
                                  chunk_beats)
            except ValueError as e:
                self.skipped["unusable song"] += 1
                log.warning("%s %s skipped: %s", item.source, item.difficulty, e)
                plan = []
            self.notes.append(note_arrays(item.notes))
            self.sources.append(item.source)
            self.audio_sha1.append(songs[item.source][0] if plan else None)
            for chunk in plan:
                start_beat, end_beat, start_frame, end_frame = chunk
                n_notes = len(chunk_notes(*self.notes[i], start_beat, end_beat))
                if sequence_length(end_frame - start_frame, n_notes) > max_seq_length:
                    self.skipped["chunk longer than max_seq_length"] += 1
                    log.warning("%s %s beats %d-%d: %d notes exceed max_seq_length %d, chunk skipped",
                                item.source, item.difficulty, start_beat, end_beat, n_notes, max_seq_length)
                    continue
                self.chunks.append((i, chunk))

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, index):
        i, (start_beat, end_beat, start_frame, end_frame) = self.chunks[index]
        # codes = (frames, N_CODEBOOKS) int16 for the whole song
        codes = self.song_codes(i)
        # notes = [(tick relative to start_beat, note_type), ...]
        notes = chunk_notes(*self.notes[i], start_beat, end_beat)
        return {"input_ids": create_training_sequence(chunk_codes(codes, start_frame, end_frame, self.silence), notes)}

    def song_codes(self, i):
        """(frames, N_CODEBOOKS) codes of item i's whole song: from the cache, or encoded and stored on first use."""
        codes = self.cache.get(self.audio_sha1[i])
        if codes is None:
            if self.audio_tokenizer is None:
                raise RuntimeError(f"{self.sources[i]}: audio codes not in the cache {self.cache.directory}, and this "
                                   "copy of the dataset has no maps or audio model (call encode_songs() before pickling)")
            item = self.base[i]
            audio = load_audio(item.read_audio(), self.audio_tokenizer.sample_rate, name=item.source)
            codes = self.audio_tokenizer.encode(torch.from_numpy(audio)[None]).numpy()
            self.cache.put(self.audio_sha1[i], codes)
        return codes

    def encode_songs(self, part=(0, 1), progress=True):
        """Encode every song whose codes are not cached yet (each song once, whatever its difficulties).

        part = (k, n): only the songs k, k + n, k + 2n, ... of the sorted song list (process k of n fills its share
        of a cache the processes share)."""
        # first_item = {audio_sha1: index of the first item using that song}, for songs that have chunks
        first_item = {}
        for i, _ in self.chunks:
            first_item.setdefault(self.audio_sha1[i], i)
        share = sorted(first_item)[part[0]::part[1]]
        missing = [first_item[sha1] for sha1 in share if self.cache.get(sha1) is None]
        for i in tqdm(missing, desc="encoding songs", unit="song", disable=not progress or not missing):
            self.song_codes(i)

    def n_songs(self):
        """Distinct songs (by audio SHA-1) that have chunks."""
        return len({self.audio_sha1[i] for i, _ in self.chunks})

    def song_sources(self):
        """The map files (sources) whose chunks are here, sorted."""
        return sorted({self.sources[i] for i, _ in self.chunks})

    def __getstate__(self):
        """A pickled BeatDataset carries neither the audio model (Encodec cannot be pickled) nor the maps: it reads
        codes from its cache, so encode_songs() first. datasets fingerprints the training data by pickling it."""
        return {**self.__dict__, "base": None, "audio_tokenizer": None}


def training_stream(dataset, seed):
    """BeatDataset → endless {"input_ids"} items: epoch e visits every chunk once, in the order of a permutation
    seeded with seed + e. The same seed gives the same stream in every process and every run, so a resumed run
    (which skips the items already trained on) and the ranks of a multi-GPU run (each takes every world_size-th
    item) see exactly the order a single uninterrupted run would. A module-level function, so datasets pickles
    it by reference whichever module train.py runs as."""
    for epoch in itertools.count():
        for index in np.random.default_rng(seed + epoch).permutation(len(dataset)):
            yield dataset[int(index)]


def held_out_stream(dataset):
    """BeatDataset → each {"input_ids"} chunk once, in order: one pass for the held-out loss."""
    for index in range(len(dataset)):
        yield dataset[index]


def split_by_song(dataset, fraction):
    """BeatDataset → (training, held out): shallow copies of it holding the chunks of different songs. The songs (by
    their audio's SHA-1, so two maps of one song stay on one side) are ordered by SHA-1 of that hash, and the first
    round(fraction · songs) — at least one when fraction > 0 and there are two songs or more — are held out:
    reproducible, whatever the order of the files."""
    songs = sorted({dataset.audio_sha1[i] for i, _ in dataset.chunks},
                   key=lambda sha1: hashlib.sha1(sha1.encode()).hexdigest())
    n_held = min(len(songs) - 1, max(1, round(fraction * len(songs)))) if fraction > 0 and len(songs) > 1 else 0
    held = set(songs[:n_held])
    training, held_out = copy.copy(dataset), copy.copy(dataset)
    training.chunks = [chunk for chunk in dataset.chunks if dataset.audio_sha1[chunk[0]] not in held]
    held_out.chunks = [chunk for chunk in dataset.chunks if dataset.audio_sha1[chunk[0]] in held]
    return training, held_out


def song_facts(item):
    """(sha1 of the song file's bytes, duration in seconds from its header) for a MapItem."""
    audio_bytes = item.read_audio()
    return hashlib.sha1(audio_bytes).hexdigest(), audio_duration_s(audio_bytes, name=item.source)


def note_arrays(notes):
    """notes = [Note(beat, x, y, color, direction), ...] → (ticks, types): (n,) int64 absolute ticks and note types, sorted."""
    pairs = sorted((round(n.beat * PPQ), note_type(n.x, n.y, n.color, n.direction)) for n in notes)
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0].copy(), arr[:, 1].copy()


def default_cache_dir():
    """$XDG_CACHE_HOME/beatgen/audio_codes, or ~/.cache/beatgen/audio_codes when that variable is unset or relative."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "beatgen" / "audio_codes"


TEMP_PREFIX, TEMP_SUFFIX = "partial-", ".npz.tmp"     # names of CodeCache's temp files, so only ours are removed
STALE_TEMP_AGE_S = 3600.0   # s; a temp file older than this was left by a killed writer (a put takes milliseconds),
                            # so removing it cannot disturb a writer in another process


class CodeCache:
    """Full-song audio codes on disk, one .npz per (song bytes, audio tokenizer, CACHE_VERSION).

    Each file holds `codes` (frames, N_CODEBOOKS) int16 and `sha1` of those bytes. get() treats any entry it cannot
    use as missing (warns, returns None, so the caller re-encodes): unreadable bytes, a checksum mismatch, a shape
    other than (frames ≥ 1, N_CODEBOOKS), a non-integer dtype, codes outside 0..CODEBOOK_SIZE-1, or something not
    a regular file at the entry path. Writes go to a temp file
    (TEMP_PREFIX…TEMP_SUFFIX) in the same folder and are renamed into place, so readers in other workers or processes
    never see half a file; put() first deletes a directory standing exactly at the entry path (the only thing it
    ever deletes besides its own temp files). Creating a CodeCache removes our temp files older than STALE_TEMP_AGE_S.

    Memory: the last `memory_items` entries read or written are kept (an LRU copy of the disk). When the folder
    cannot be created or written (checked once here, with one warning), or a put() fails (warning), codes are kept
    in `unsaved` instead: unbounded, never evicted, and pickled with the cache, since there is no other copy.
    Entries already in a read-only folder are still read from it.
    """

    def __init__(self, directory, tokenizer_identity, memory_items=32):
        self.directory = Path(directory)
        self.tokenizer_identity = tokenizer_identity
        self.memory = OrderedDict()     # audio_sha1 → (frames, N_CODEBOOKS) int16, copies of recent disk entries
        self.memory_items = memory_items
        self.unsaved = {}               # audio_sha1 → (frames, N_CODEBOOKS) int16 that are on no disk
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
            os.close(fd)
            os.unlink(probe)
            self.writable = True
        except OSError as e:
            log.warning("audio-code cache folder %s cannot be written (%s); this run keeps all codes in memory",
                        self.directory, e)
            self.writable = False
        if self.writable:
            self._remove_stale_temp_files()

    def __getstate__(self):
        """Without the LRU copies (re-read from disk) but with `unsaved` (no other copy): datasets pickles the whole
        training dataset, cache included, to fingerprint it, and a BeatDataset copy reads codes only from here."""
        return {**self.__dict__, "memory": OrderedDict()}

    def path(self, audio_sha1):
        key = hashlib.sha1(f"{audio_sha1}|{self.tokenizer_identity}|v{CACHE_VERSION}".encode()).hexdigest()
        return self.directory / f"{key}.npz"

    def get(self, audio_sha1):
        """(frames, N_CODEBOOKS) integer codes (int16 as put() writes them), or None when absent or unusable."""
        codes = self.unsaved.get(audio_sha1)
        if codes is None and audio_sha1 in self.memory:
            self.memory.move_to_end(audio_sha1)
            codes = self.memory[audio_sha1]
        if codes is None:
            codes = self._read(self.path(audio_sha1))
            if codes is not None:
                self._remember(audio_sha1, codes)
        return codes

    def put(self, audio_sha1, codes):
        """Store codes = (frames, N_CODEBOOKS) ints 0..CODEBOOK_SIZE-1; if writing fails, warn and keep them in RAM."""
        codes = np.ascontiguousarray(codes, dtype=np.int16)
        if self.writable:
            path = self.path(audio_sha1)
            try:
                self._write(path, codes)
                self._remember(audio_sha1, codes)
                return
            except OSError as e:
                log.warning("cache entry %s cannot be written (%s); its codes stay in memory", path, e)
        self.unsaved[audio_sha1] = codes

    def _read(self, path):
        """Validated codes of the entry at path, or None (absent: silently; unusable: with a warning)."""
        try:
            if not path.is_file():
                if path.exists():
                    log.warning("cache entry %s is not a regular file; rebuilding", path)
                return None
            with np.load(path, allow_pickle=False) as entry:
                codes, checksum = entry["codes"], str(entry["sha1"])
        except Exception as e:      # damaged zip/npy bytes raise many types (BadZipFile, zlib.error, NotImplementedError…)
            log.warning("cache entry %s is unreadable (%s: %s); rebuilding", path, type(e).__name__, e)
            return None
        if hashlib.sha1(codes.tobytes()).hexdigest() != checksum:
            problem = "checksum mismatch"
        elif codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] != N_CODEBOOKS:
            problem = f"shape {codes.shape}, not (frames ≥ 1, {N_CODEBOOKS})"
        elif not np.issubdtype(codes.dtype, np.integer):
            problem = f"dtype {codes.dtype}, not integer"
        elif codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
            problem = f"codes outside 0..{CODEBOOK_SIZE - 1}"
        else:
            return codes
        log.warning("cache entry %s is corrupt (%s); rebuilding", path, problem)
        return None

    def _write(self, path, codes):
        buffer = io.BytesIO()
        np.savez(buffer, codes=codes, sha1=hashlib.sha1(codes.tobytes()).hexdigest())
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)     # os.replace cannot replace a directory
        write_atomic(path, buffer.getvalue(), prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)

    def _remember(self, audio_sha1, codes):
        self.memory[audio_sha1] = codes
        while len(self.memory) > self.memory_items:
            self.memory.popitem(last=False)

    def _remove_stale_temp_files(self):
        now_s = time.time()
        for tmp in self.directory.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):      # another process may remove it first
                if tmp.is_file() and now_s - tmp.stat().st_mtime > STALE_TEMP_AGE_S:
                    tmp.unlink()


# ---- collator ----

def audio_masking_collator(batch):
    """batch = [{"input_ids": [int, ...]}, ...] → input_ids, attention_mask, labels as (B, T) int64 tensors.

    Right-padded with PAD. labels keep only note tokens (ticks, note types) and EOS; audio, BOS, AUDIO_START,
    AUDIO_END, NOTES_START and PAD are IGNORE_INDEX (-100), so the model learns notes given audio.
    """
    max_len = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), max_len), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), max_len), dtype=torch.long)
    for row, example in enumerate(batch):
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    trained = in_range(input_ids, "tick") | in_range(input_ids, "note_type") | (input_ids == EOS)
    labels = torch.where(trained & (attention_mask == 1), input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- generation grammar ----

CLOSING_TOKENS = 6     # tokens left at which a constrained row ends: ≤ 2 notes (one per hand its end needs) + EOS


class NoteGrammar:
    """transformers LogitsProcessor keeping generated notes well formed, for a left-padded batch of prompts.

    After the prompt a row alternates tick, note type, tick, note type, …; EOS may come only where a tick could.
    Ticks never decrease within a row and stay ≤ max_ticks[row] (the last tick inside that row's chunk); note
    types use directions 0..8 (9 is not a game direction). After EOS a row may only produce PAD.

    states (optional): one object per row with utils.PlayState's interface, which further masks the ticks and note
    types (in note space: its candidates are NOTE_TYPE_FIELDS) so that the notes are playable; max_new_tokens
    tells when a row must close (CLOSING_TOKENS). The mask only removes choices; the model picks among the rest.
    """

    def __init__(self, prompt_length, max_ticks, states=None, max_new_tokens=None):
        self.prompt_length = prompt_length
        self.max_ticks = torch.as_tensor(max_ticks, dtype=torch.long)      # (B,) last allowed tick per row
        self.tick_ids = torch.arange(SIZES["tick"])
        types = torch.arange(SIZES["note_type"])
        self.valid_types = types % N_DIRECTIONS < 9                          # (240,) bool
        self.states = states
        self.max_new_tokens = max_new_tokens
        self.closing = [False] * len(self.max_ticks)                         # per row: closing since its last tick

    def __call__(self, input_ids, scores):
        # input_ids = (B, prompt_length + n) ids so far; scores = (B, V) logits for the next id
        generated = input_ids[:, self.prompt_length:]
        n = generated.shape[1]
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        if n % 2 == 1:
            allowed[:, NOTE_TYPE_OFFSET:NOTE_TYPE_OFFSET + SIZES["note_type"]] = self.valid_types.to(scores.device)
        else:
            last_tick = generated[:, -2] - TICK_OFFSET if n >= 2 else torch.zeros(len(scores), dtype=torch.long)
            ticks = self.tick_ids.to(scores.device)[None]
            allowed[:, TICK_OFFSET:TICK_OFFSET + SIZES["tick"]] = (
                (ticks >= last_tick.to(scores.device)[:, None]) & (ticks <= self.max_ticks.to(scores.device)[:, None]))
            allowed[:, EOS] = True
        finished = (generated == EOS).any(dim=1)
        if self.states is not None:
            self._play(allowed, generated, n, finished.tolist())
        allowed[finished] = False
        allowed[finished, PAD] = True
        return scores.masked_fill(~allowed, float("-inf"))

    def _play(self, allowed, generated, n, finished):
        """allowed = (B, V) bool, narrowed in place row by row by the play states."""
        last = generated[:, -1].tolist() if n else [None] * len(finished)
        for row, state in enumerate(self.states):
            if finished[row]:
                continue
            if n % 2 == 1:      # the last token was a tick: the note type at it
                state.at(last[row] - TICK_OFFSET)
                types = torch.from_numpy(state.type_mask(self.closing[row]))
                allowed[row, NOTE_TYPE_OFFSET:NOTE_TYPE_OFFSET + SIZES["note_type"]] &= types.to(allowed.device)
                continue
            if n:               # the last token was a note type
                state.push(last[row] - NOTE_TYPE_OFFSET)
            self.closing[row] = (self.max_new_tokens is not None
                                 and self.max_new_tokens - n <= CLOSING_TOKENS)
            ticks, eos = state.tick_mask(self.closing[row])
            row_ticks = torch.zeros(SIZES["tick"], dtype=torch.bool)
            row_ticks[:len(ticks)] = torch.from_numpy(ticks)
            allowed[row, TICK_OFFSET:TICK_OFFSET + SIZES["tick"]] &= row_ticks.to(allowed.device)
            allowed[row, EOS] = bool(eos)


# NOTE_TYPE_FIELDS[t] = (x, y, color, direction) of note type t: the candidates a play state masks
NOTE_TYPE_FIELDS = np.array([note_fields(t) for t in range(SIZES["note_type"])])


# ---- inference: a song's prompts and constrained generation ----

MAX_NOTES_PER_SECOND = 40       # generation budget per chunk; human Expert+ maps stay under ~20


@dataclass
class Song:
    """A song ready to map; beat 0 is its first sample."""
    audio: np.ndarray               # (samples,) float32 at sample_rate
    sample_rate: int
    bpm: float
    codes: np.ndarray               # (frames, N_CODEBOOKS) Encodec codes of the whole song
    plan: list                      # chunk_plan: [(start_beat, end_beat, start_frame, end_frame), ...]

    @property
    def duration_s(self):
        return len(self.audio) / self.sample_rate

    def start_s(self, k):
        """Time of chunk k's first beat."""
        return self.plan[k][0] * 60 / self.bpm


def encode_song(audio, bpm, audio_tokenizer, chunk_duration=None, chunk_beats=None) -> Song:
    """audio = (samples,) float32 at the tokenizer's rate, beat 0 at sample 0 → Song (its codes and chunks)."""
    codes = audio_tokenizer.encode(torch.from_numpy(audio)[None]).numpy()
    plan = chunk_plan(len(audio) / audio_tokenizer.sample_rate, bpm, chunk_duration, audio_tokenizer.frame_rate,
                      chunk_beats)
    return Song(audio, audio_tokenizer.sample_rate, bpm, codes, plan)


def chunk_ticks(song, span_s):
    """{chunk index: (first, last) tick of the chunk inside the song and span_s = (start_s, end_s)} for the chunks
    holding any such tick."""
    tick_s = 60 / song.bpm / PPQ
    ticks = {}
    for k, (start_beat, end_beat, _, _) in enumerate(song.plan):
        first = max(0, math.ceil((span_s[0] - song.start_s(k)) / tick_s - 1e-9))
        end_s = min(song.duration_s, span_s[1])
        last = min((end_beat - start_beat) * PPQ, math.ceil((end_s - song.start_s(k)) / tick_s - 1e-9)) - 1
        if first <= last:
            ticks[k] = (first, last)
    return ticks


def generation_budget(song, prompt_length, max_seq_length):
    """New tokens a row may generate: 2 per note at MAX_NOTES_PER_SECOND over a chunk + EOS, within max_seq_length;
    ValueError when a chunk's audio alone leaves no room (a very slow tempo)."""
    beats = song.plan[0][1] - song.plan[0][0]
    chunk_s = beats * 60 / song.bpm
    budget = min(2 * math.ceil(MAX_NOTES_PER_SECOND * chunk_s) + 1, max_seq_length - prompt_length)
    if budget < 2 * CLOSING_TOKENS:
        raise ValueError(f"at {song.bpm:g} BPM a chunk of {beats} beats lasts {chunk_s:.0f} s, more audio than the "
                         f"model's {max_seq_length} tokens hold; pass --bpm with twice the tempo")
    return budget


def chunk_note_beats(song, k, chunk, first_tick=0):
    """chunk = [(tick, note type), ...] generated for chunk k → [(beat, x, y, color, direction), ...] in the song's
    beats, leaving out ticks before first_tick (an unconstrained row may start before a regenerated range)."""
    return [(song.plan[k][0] + tick / PPQ, *note_fields(type_)) for tick, type_ in chunk if tick >= first_tick]


@dataclass
class Sampling:
    """How the next token is drawn among those the grammar allows."""
    temperature: float = 0.8        # 0: greedy
    top_p: float = 1.0              # nucleus sampling; 1.0: off
    min_p: float = 0.0              # min-p sampling; 0: off
    progress: bool = True           # a progress bar per generate call


class Progress:
    """LogitsProcessor that only advances a progress bar by one generated token per step."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


def generate_notes(model, prompts, max_ticks, max_new_tokens, sampling=Sampling(), states=None,
                   disable_compile=False):
    """One `generate` call of a causal LM over prompts = [[prompt ids], ...] → [[(tick, note type), ...], ...] per row.

    max_ticks = [last tick allowed per row]; states: one utils.PlayState per row (the playability constraint), or
    None for the token grammar alone. Prompts of different lengths are left-padded with PAD (a song's are all alike).
    The sampling warpers run after NoteGrammar, so they only ever choose among allowed tokens.
    """
    # imported here: train.py imports this module before Unsloth, which must patch transformers first
    from transformers import LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopPLogitsWarper
    prompt_length = max(len(p) for p in prompts)
    # input_ids, attention_mask = (rows, prompt_length), left-padded
    input_ids = torch.full((len(prompts), prompt_length), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, prompt_length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, prompt_length - len(prompt):] = 1
    processors = [NoteGrammar(prompt_length, max_ticks, states, max_new_tokens)]
    sample = sampling.temperature > 0
    if sample:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        if sampling.min_p > 0.0:
            processors.append(MinPLogitsWarper(sampling.min_p))
    bar = tqdm(total=max_new_tokens, desc=f"generating {len(prompts)} chunks", unit="tok", disable=not sampling.progress)
    processors.append(Progress(bar))
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
            logits_processor=LogitsProcessorList(processors), do_sample=sample, temperature=1.0, top_p=1.0,
            top_k=None, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS,
            cache_implementation="static", disable_compile=disable_compile)
    bar.close()
    chunks = []
    for row in output[:, prompt_length:].tolist():
        # a row that ran out of budget ends with a tick and no type: drop that tick
        end = row.index(EOS) if EOS in row else len(row) - len(row) % 2
        chunks.append(decode_note_tokens(row[:end]))
    return chunks


KV_BYTES_HEADROOM = 0.8         # share of the free GPU memory the static KV caches of one generate call may use


def chunks_per_call(model_config, tokens_per_chunk, free_bytes, dtype_bytes):
    """How many chunks one generate call can hold: the static KV cache of one chunk is 2 (keys, values) ×
    layers × KV heads × head size × dtype_bytes × tokens_per_chunk (prompt + generation budget), and all chunks'
    caches must fit in KV_BYTES_HEADROOM of free_bytes. Qwen3-0.6B in bf16, a 30 s chunk: 114,688 bytes a token,
    ≈ 0.8 GB a chunk. At least 1."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    cache_bytes = (2 * model_config.num_hidden_layers * model_config.num_key_value_heads * head_dim * dtype_bytes
                   * tokens_per_chunk)
    return max(1, int(KV_BYTES_HEADROOM * free_bytes // cache_bytes))


def generate_rows(model, prompts, max_ticks, max_new_tokens, sampling, batch_size=0, states=None,
                  compile_problem=None):
    """generate_notes over all rows (prompts of one length), batch_size rows a call (0: all on a CPU, what the free
    memory holds on a GPU: chunks_per_call) → [[(tick, type), ...], ...] one per row. On CUDA the decode step is
    compiled unless compile_problem (utils.compile_problem's answer) says why it cannot be."""
    if batch_size <= 0 and model.device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(model.device)
        batch_size = chunks_per_call(model.config, len(prompts[0]) + max_new_tokens, free_bytes, model.dtype.itemsize)
    disable_compile = model.device.type == "cuda" and compile_problem is not None
    if disable_compile:
        print(f"torch.compile needs {compile_problem}: generating without it (slower; see README, GPU set-up)")
    step = batch_size if batch_size > 0 else len(prompts)
    chunks, start_s = [], time.perf_counter()
    for first in range(0, len(prompts), step):
        rows = slice(first, first + step)
        chunks += generate_notes(model, prompts[rows], max_ticks[rows], max_new_tokens, sampling,
                                 states[rows] if states else None, disable_compile)
    if sampling.progress:
        elapsed_s = time.perf_counter() - start_s
        tokens = sum(2 * len(chunk) + 1 for chunk in chunks)        # 2 per note + each row's EOS
        print(f"generated {len(chunks)} chunks: {tokens} tokens in {elapsed_s:.1f} s ({tokens / elapsed_s:.0f} tokens/s)")
    if states and sum(state.dead_ends for state in states):
        print(f"warning: the play constraint was cornered {sum(state.dead_ends for state in states)} times")
    return chunks
