"""CodeCache (data.py): every damaged, misplaced or unwritable entry is a miss that rebuilds, never an exception."""

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data
from conftest import ROOT, click_song, ogg_bytes, wav_bytes
from test_data import CountingTokenizer, FakeItem, note

CODES = np.array([[1, 1023], [0, 512], [7, 9]], dtype=np.int16)      # (3 frames, 2) a small valid entry


def warnings_matching(caplog, text):
    return [r for r in caplog.records if r.name == "data" and text in r.getMessage()]


def write_entry(path, codes):
    """A well-formed entry whose checksum matches `codes`, whatever they are."""
    np.savez(path, codes=codes, sha1=hashlib.sha1(codes.tobytes()).hexdigest())


def test_cache_second_pass_never_encodes_and_corruption_rebuilds(encodec, tmp_path):
    audio = ogg_bytes(click_song(9.0, [1.0, 2.0, 3.0]))
    items = [FakeItem("s.zip", 120.0, [note(2.0)], audio, difficulty=d) for d in ("Expert", "ExpertPlus")]
    counting = CountingTokenizer(encodec)
    first = [x["input_ids"] for x in data.BeatDataset(items, chunk_duration=4.0, cache_dir=tmp_path,
                                                      audio_tokenizer=counting)]
    assert counting.encode_calls == 1        # two difficulties of one song share one encode
    fresh = CountingTokenizer(encodec)
    again = data.BeatDataset(items, chunk_duration=4.0, cache_dir=tmp_path, audio_tokenizer=fresh)
    assert [x["input_ids"] for x in again] == first and fresh.encode_calls == 0
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:50])                  # truncated
    fresh = CountingTokenizer(encodec)
    rebuilt = data.BeatDataset(items, chunk_duration=4.0, cache_dir=tmp_path, audio_tokenizer=fresh)
    assert [x["input_ids"] for x in rebuilt] == first and fresh.encode_calls == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_detects_flipped_bytes(tmp_path):
    cache = data.CodeCache(tmp_path, "tok")
    cache.put("abc", np.arange(20).reshape(10, 2))
    path = cache.path("abc")
    with np.load(path) as entry:
        codes, checksum = entry["codes"].copy(), str(entry["sha1"])
    codes[3, 1] += 1
    np.savez(path, codes=codes, sha1=checksum)
    assert data.CodeCache(tmp_path, "tok").get("abc") is None
    assert data.CodeCache(tmp_path, "other").path("abc") != path


def test_cache_every_byte_flip_is_a_miss_or_the_original(tmp_path, caplog):
    """Each byte of a whole entry, xor-ed with 0x01, 0x80 and 0xFF in turn: get() never raises; it returns the exact
    codes (the flip hit zip metadata the codes do not depend on) or None with a warning naming the entry."""
    cache = data.CodeCache(tmp_path, "tok", memory_items=0)
    cache.put("song", CODES)
    path = cache.path("song")
    original = path.read_bytes()
    n_misses = 0
    for position in range(len(original)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(original)
            damaged[position] ^= mask
            path.write_bytes(damaged)
            got = cache.get("song")
            if got is None:
                n_misses += 1
            else:
                assert np.array_equal(got, CODES), f"byte {position} ^ {mask:#x} gave other codes"
    assert n_misses > len(original)          # most flips damage the entry
    assert len(warnings_matching(caplog, str(path))) == n_misses
    cache.put("song", CODES)                # the rebuild replaces the damaged file
    assert np.array_equal(data.CodeCache(tmp_path, "tok").get("song"), CODES)


@pytest.mark.parametrize("codes,problem", [
    (np.array([[1, 5000], [2, 3]], dtype=np.int16), "outside"),
    (np.array([[1, -1], [2, 3]], dtype=np.int16), "outside"),
    (np.zeros((4, 3), dtype=np.int16), "shape"),
    (np.zeros(8, dtype=np.int16), "shape"),
    (np.zeros((0, 2), dtype=np.int16), "shape"),
    (np.zeros((4, 2), dtype=np.float32), "dtype"),
])
def test_cache_well_formed_entry_with_impossible_codes_is_a_miss(tmp_path, caplog, codes, problem):
    cache = data.CodeCache(tmp_path, "tok")
    write_entry(cache.path("song"), codes)
    assert cache.get("song") is None
    assert [problem in r.getMessage() for r in warnings_matching(caplog, str(cache.path("song")))] == [True]
    cache.put("song", CODES)
    assert np.array_equal(data.CodeCache(tmp_path, "tok").get("song"), CODES)


def test_cache_directory_or_fifo_at_entry_path_is_a_miss_and_replaced(tmp_path, caplog):
    """A directory or a FIFO where the entry should be: get() returns None at once (a FIFO would block np.load), and
    put() replaces it. Only the directory at exactly the entry path is deleted; a neighbouring one stays."""
    cache = data.CodeCache(tmp_path, "tok")
    neighbour = tmp_path / "keep"
    neighbour.mkdir()
    (neighbour / "notes.txt").write_text("not the cache's")
    path = cache.path("song")
    path.mkdir()
    (path / "inner.npz").write_bytes(b"x")
    assert cache.get("song") is None and warnings_matching(caplog, "not a regular file")
    cache.put("song", CODES)
    assert path.is_file() and np.array_equal(data.CodeCache(tmp_path, "tok").get("song"), CODES)
    assert (neighbour / "notes.txt").read_text() == "not the cache's"

    def hung(signum, frame):
        raise TimeoutError("get() blocked on a FIFO")
    fifo = cache.path("other song")
    os.mkfifo(fifo)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        assert cache.get("other song") is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    cache.put("other song", CODES)
    assert np.array_equal(data.CodeCache(tmp_path, "tok").get("other song"), CODES)


def test_cache_uncreatable_folder_warns_once_and_training_runs_from_memory(encodec, tmp_path, caplog):
    """The cache folder's parent is a regular file, so mkdir fails with NotADirectoryError (also as root, where
    chmod would not stop a write). Training-style use: index, encode each song once, two epochs, and a pickled
    copy without an audio model (what datasets fingerprints) still finds every song's codes."""
    blocker = tmp_path / "a file"
    blocker.write_text("")
    songs = [FakeItem(f"{k}.zip", 120.0, [note(2.0)], wav_bytes(click_song(5.0, [1.0], seed=k))) for k in range(3)]
    counting = CountingTokenizer(encodec)
    ds = data.BeatDataset(songs, chunk_duration=4.0, cache_dir=blocker / "cache", audio_tokenizer=counting)
    ds.cache.memory_items = 1                                  # memory-only mode never evicts
    ds.encode_songs(progress=False)
    epochs = [[ds[k]["input_ids"] for k in range(len(ds))] for _ in range(2)]
    assert counting.encode_calls == 3 and epochs[0] == epochs[1] and len(ds) == 6
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.audio_tokenizer is None and [copy[k]["input_ids"] for k in range(len(copy))] == epochs[0]
    assert len(warnings_matching(caplog, "cannot be written")) == 1
    assert blocker.read_text() == ""


def test_cache_put_failure_warns_and_keeps_codes_in_memory(tmp_path, caplog):
    """The folder is replaced by a regular file after the cache was created, so writing a temp file fails."""
    folder = tmp_path / "cache"
    cache = data.CodeCache(folder, "tok", memory_items=0)
    shutil.rmtree(folder)
    folder.write_text("")
    cache.put("song", CODES)
    assert warnings_matching(caplog, "cannot be written") and np.array_equal(cache.get("song"), CODES)
    assert np.array_equal(pickle.loads(pickle.dumps(cache)).get("song"), CODES)


READ_ONLY_CHECK = """
import logging, sys, numpy as np, data
logging.basicConfig(level=logging.WARNING, format="%(message)s")
cache = data.CodeCache(sys.argv[1], "tok")
assert not cache.writable
assert np.array_equal(cache.get("old"), np.arange(8).reshape(4, 2))    # entries already there are still read
cache.put("new", np.ones((3, 2)))
assert np.array_equal(cache.get("new"), np.ones((3, 2)))
"""


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("unshare"), reason="root without unshare")
def test_cache_read_only_folder_reads_entries_and_keeps_new_codes_in_memory(tmp_path):
    """A truly read-only folder: as root (chmod does not stop root), the check runs in a subprocess inside its own
    mount namespace where the folder is bind-mounted read-only (`unshare -m`, needs CAP_SYS_ADMIN, skipped without);
    as another user, the folder is chmod 0o555."""
    folder = tmp_path / "cache"
    data.CodeCache(folder, "tok").put("old", np.arange(8).reshape(4, 2))
    before = sorted(os.listdir(folder))
    check = [sys.executable, "-c", READ_ONLY_CHECK, str(folder)]
    if os.geteuid() == 0:
        command = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" || exit 77; exec "$@"', folder, *check]
    else:
        folder.chmod(0o555)
        command = check
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    if result.returncode == 77:
        pytest.skip(f"cannot bind-mount read-only here: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("cannot be written") == 1, result.stderr
    assert sorted(os.listdir(folder)) == before                  # nothing was written


def test_cache_stale_temp_files_are_removed_fresh_and_foreign_ones_kept(tmp_path):
    old_s = time.time() - data.STALE_TEMP_AGE_S - 60
    stale = tmp_path / f"{data.TEMP_PREFIX}killed{data.TEMP_SUFFIX}"
    fresh = tmp_path / f"{data.TEMP_PREFIX}writing{data.TEMP_SUFFIX}"   # another process may be writing it now
    foreign = tmp_path / "notes.tmp"                                    # not named like ours
    for path in (stale, fresh, foreign):
        path.write_bytes(b"partial")
    os.utime(stale, (old_s, old_s))
    os.utime(foreign, (old_s, old_s))
    data.CodeCache(tmp_path, "tok")
    assert not stale.exists() and fresh.exists() and foreign.exists()


def test_cache_pickle_drops_disk_copies_and_keeps_memory_only_entries(tmp_path):
    codes = np.random.default_rng(0).integers(0, 1024, (20000, 2))      # 80,000 bytes as int16
    on_disk = data.CodeCache(tmp_path / "cache", "tok")
    on_disk.put("song", codes)
    assert "song" in on_disk.memory and len(pickle.dumps(on_disk)) < 10_000
    assert np.array_equal(pickle.loads(pickle.dumps(on_disk)).get("song"), codes)      # re-read from disk
    blocker = tmp_path / "a file"
    blocker.write_text("")
    in_memory = data.CodeCache(blocker / "cache", "tok")
    in_memory.put("song", codes)
    assert np.array_equal(pickle.loads(pickle.dumps(in_memory)).get("song"), codes)    # no other copy exists


def _write_many(directory, codes, times):
    cache = data.CodeCache(directory, "tok", memory_items=0)
    for _ in range(times):
        cache.put("song", codes)


def test_cache_shared_by_processes_never_shows_partial_entries(tmp_path, caplog):
    import multiprocessing
    codes = np.random.default_rng(0).integers(0, 1024, (20000, 2))
    writers = [multiprocessing.get_context("fork").Process(target=_write_many, args=(tmp_path, codes, 15))
               for _ in range(2)]
    for writer in writers:
        writer.start()
    reader = data.CodeCache(tmp_path, "tok", memory_items=0)
    while any(writer.is_alive() for writer in writers):
        got = reader.get("song")      # None until the first rename, then always the whole entry
        if got is not None:
            assert np.array_equal(got, codes)
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert np.array_equal(reader.get("song"), codes) and not list(tmp_path.glob("*.tmp"))
    assert "rebuilding" not in caplog.text          # a reader never met a half-written file
