"""scrape.py against a mock BeatSaver on 127.0.0.1 (recorded payloads, zips built from fixture map folders, injected
faults), the filter's decisions on fixture maps, a SIGKILL mid-run followed by a resume, and both commands run as
users run them (a subprocess in a temporary folder) on hostile zips, new map versions, duplicate ids, a corrupt
maps.sqlite, and retries under the rate limit."""

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import lzma
import random
import signal
import sqlite3
import subprocess
import struct
import sys
import threading
import time
import zipfile
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import maps
import scrape
from conftest import ROOT, SHARED

API_FIXTURES = SHARED / "fixtures" / "beatsaver-api"
MAP_FIXTURES = SHARED / "fixtures" / "maps"
needs_shared = pytest.mark.skipif(not MAP_FIXTURES.is_dir() or not API_FIXTURES.is_dir(),
                                  reason="/work/shared fixtures absent")
needs_read_map = pytest.mark.skipif(not hasattr(maps, "read_map"), reason="maps.read_map not written yet")

# every criterion off: download mechanics without maps.py or metadata opinions
ACCEPT_ALL = ["--allow_ai", "--min_score", "0", "--min_upvotes", "0", "--characteristic", "", "--difficulties", "",
              "--allow_mods", "--allow_bpm_changes", "--allow_song_offset", "--min_duration_s", "0",
              "--max_duration_s", "0", "--min_nps", "0", "--max_nps", "0", "--max_parity_errors", "-1"]
# only the zip criteria, with every difficulty wanted: maps.read_map decides
RELAXED = ["--min_score", "0", "--min_upvotes", "0", "--min_duration_s", "0", "--max_duration_s", "0",
           "--min_nps", "0", "--max_nps", "0", "--max_parity_errors", "-1", "--difficulties", ""]
# short waits: the mock answers at once, a "timeout" fault stalls TIMEOUT_STALL_S against a 0.5 s client timeout
FAST = ["--request_interval_s", "0.01", "--timeout_s", "0.5", "--retries", "3", "--backoff_s", "0.05"]
TIMEOUT_STALL_S = 1.0


# ---- fixture data ----

def fixture_docs():
    """The 30 recorded MapDetail dicts (ids/ 8 maps, 2021 search, 2025 detail, websocket update)."""
    by_id = json.loads((API_FIXTURES / "maps_ids_8maps__Unvire.json").read_text())
    search = json.loads((API_FIXTURES / "search_response_2021__Danielduel_mock.json").read_text())
    detail = json.loads((API_FIXTURES / "map_detail_2025_4b6f1__mercurialworld_drm-beatsaver-cacher.json").read_text())
    ws = json.loads((API_FIXTURES / "ws_messages__RamsesDeserTest.json").read_text())
    return list(by_id.values()) + search["docs"] + [detail] + [m["msg"] for m in ws if m["type"] == "MAP_UPDATE"]


def v2_map_folders():
    """Fixture map folders with an Info.dat v2 whose difficulty files are all present, smallest first."""
    folders = []
    for info_path in MAP_FIXTURES.glob("*/*/*"):
        if info_path.name.lower() != "info.dat":
            continue
        info = json.loads(info_path.read_text(encoding="utf-8-sig"))
        files = [b["_beatmapFilename"] for s in info.get("_difficultyBeatmapSets", []) for b in s["_difficultyBeatmaps"]]
        if files and all((info_path.parent / f).is_file() for f in files):
            folders.append(info_path.parent)
    return sorted(folders, key=lambda f: sum(p.stat().st_size for p in f.iterdir()))


def zip_map(folder, info_edit=None):
    """A map folder → (zip bytes, BeatSaver version hash). The zip holds the folder's files plus a small fake song
    under Info's _songFilename; info_edit(info dict) may change Info.dat first.

    The hash follows SongCore's rule, written out here independently of maps.level_hash:
    SHA-1 of Info.dat's bytes followed by each _beatmapFilename's bytes in Info order."""
    info_path = next(p for p in folder.iterdir() if p.name.lower() == "info.dat")
    info_bytes = info_path.read_bytes()
    info = json.loads(info_bytes.decode("utf-8-sig"))
    if info_edit:
        info_edit(info)
        info_bytes = json.dumps(info).encode()
    song_name = info.get("_songFilename") or "song.egg"
    sha1 = hashlib.sha1(info_bytes)
    for s in info["_difficultyBeatmapSets"]:
        for b in s["_difficultyBeatmaps"]:
            sha1.update((folder / b["_beatmapFilename"]).read_bytes())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("Info.dat", info_bytes)
        for path in sorted(folder.iterdir()):
            if path.suffix == ".dat" and path.name.lower() != "info.dat":
                zf.write(path, path.name)
        zf.writestr(song_name, b"OggS" + hashlib.sha256(folder.name.encode()).digest() * 64)
    return buffer.getvalue(), sha1.hexdigest()


def map_pairs(n, docs=None):
    """[(MapDetail dict, zip bytes, hash)] pairing recorded payloads with the n smallest v2 fixture maps."""
    docs = docs or fixture_docs()
    return [(copy.deepcopy(doc), *zip_map(folder)) for doc, folder in zip(docs, v2_map_folders()[:n])]


# ---- the mock BeatSaver ----

class MockBeatSaver:
    """An http.server on 127.0.0.1 serving /maps/latest and /search/text/0 pages of its docs (newest first, cursor
    before / to), and /cdn/<hash>.zip. Faults: {("page", page index) or ("zip", map id): [fault, ...]}, each
    request to that page or zip consumes the next one: "429" (Retry-After: 1), "500", "timeout" (stalls, then
    closes), "truncate" (half the body, full Content-Length)."""

    def __init__(self, pairs, faults=None, extra_docs=(), zip_chunk_delay_s=0.0):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), MockHandler)
        self.server.daemon_threads = True
        self.server.mock = self
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.faults = {key: list(queue) for key, queue in (faults or {}).items()}
        self.zip_chunk_delay_s = zip_chunk_delay_s
        self.lock = threading.Lock()
        # zips = {hash: zip bytes}; zip_ids = {hash: map id}
        self.zips, self.zip_ids = {}, {}
        # docs = [MapDetail dict] newest first, uploaded one minute apart, hashes/URLs pointing at this mock
        self.docs = []
        start = datetime(2024, 6, 1, tzinfo=timezone.utc)
        all_docs = [(doc, data, h) for doc, data, h in pairs] + [(doc, None, None) for doc in extra_docs]
        for i, (doc, data, map_hash) in enumerate(all_docs):
            doc = copy.deepcopy(doc)
            doc["uploaded"] = (start - timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            if data is not None:
                version = doc["versions"][-1]
                version["hash"] = map_hash
                version["downloadURL"] = f"{self.base}/cdn/{map_hash}.zip"
                self.zips.setdefault(map_hash, data)
                self.zip_ids[map_hash] = doc["id"]
            self.docs.append(doc)
        self.requests = []              # [(path with query, User-Agent, time.monotonic() when received)]
        self.zips_completed = Counter()  # {map id: zip bodies sent in full}
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def next_fault(self, key):
        with self.lock:
            queue = self.faults.get(key)
            return queue.pop(0) if queue else None

    def page(self, query, page_size):
        """(page index, [MapDetail]) of the docs uploaded before query's cursor and after its lower bound."""
        before = (query.get("before") or query.get("to") or [None])[0]
        after = (query.get("after") or query.get("from") or [None])[0]
        docs = [d for d in self.docs if "uploaded" in d]
        newer = [d for d in docs if before and d["uploaded"] >= before]
        docs = [d for d in docs if not before or d["uploaded"] < before]
        if after:
            docs = [d for d in docs if datetime.fromisoformat(d["uploaded"]) >= datetime.fromisoformat(after)]
        return len(newer) // page_size, docs[:page_size]


class MockHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status, body, content_type="application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        return body

    def do_GET(self):
        mock = self.server.mock
        url = urlparse(self.path)
        query = parse_qs(url.query)
        with mock.lock:
            mock.requests.append((self.path, self.headers.get("User-Agent"), time.monotonic()))
        try:
            if url.path in ("/maps/latest", "/search/text/0"):
                page_size = int(query.get("pageSize", ["20"])[0])
                index, docs = mock.page(query, page_size)
                self.answer(mock.next_fault(("page", index)), json.dumps({"docs": docs}).encode(), None)
            elif url.path.startswith("/cdn/") and url.path.endswith(".zip"):
                map_hash = url.path[len("/cdn/"):-len(".zip")]
                if map_hash not in mock.zips:
                    self.wfile.write(self.send(404, b'{"success":false,"errors":["Not Found"]}'))
                    return
                map_id = mock.zip_ids[map_hash]
                self.answer(mock.next_fault(("zip", map_id)), mock.zips[map_hash], map_id)
            else:
                self.wfile.write(self.send(404, b'{"success":false,"errors":["Not Found"]}'))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def answer(self, fault, body, map_id):
        mock = self.server.mock
        if fault == "429":
            self.wfile.write(self.send(429, b'{"error":"slow down"}', headers=[("Retry-After", "1")]))
        elif fault == "500":
            self.wfile.write(self.send(500, b'{"error":"boom"}'))
        elif fault == "timeout":
            time.sleep(TIMEOUT_STALL_S)
        elif fault == "truncate":
            self.send(200, body, "application/zip")
            self.wfile.write(body[:len(body) // 2])
        elif map_id is None:
            self.wfile.write(self.send(200, body))
        else:
            self.send(200, body, "application/zip")
            chunk_bytes = max(1, len(body) // 4)
            for start in range(0, len(body), chunk_bytes):
                self.wfile.write(body[start:start + chunk_bytes])
                self.wfile.flush()
                time.sleep(mock.zip_chunk_delay_s)
            with mock.lock:
                mock.zips_completed[map_id] += 1


def download_args(out_dir, mock, *extra):
    return scrape.parse_args(["download", str(out_dir), "--api_url", mock.base, *FAST, *extra])


def stored(out_dir):
    """{map id: (hash, rejected)} from the metadata store."""
    with sqlite3.connect(Path(out_dir) / scrape.DB_NAME) as db:
        return {row[0]: row[1:] for row in db.execute("SELECT id, hash, rejected FROM maps")}


def assert_zips_intact(out_dir, expected):
    """Every top-level zip is one of expected {map id: (zip bytes, hash)}, byte for byte."""
    for path in Path(out_dir).glob("*.zip"):
        data, map_hash = expected[path.stem]
        assert path.read_bytes() == data, path
        scrape.check_zip(path, map_hash)


def corrupt_zip(zip_bytes, method, member="cover.jpg"):
    """zip_bytes rewritten with every member compressed by method (zipfile.ZIP_LZMA or ZIP_BZIP2), plus a 20 kB
    random cover.jpg, with 16 bytes in the middle of member's compressed data inverted: reading member fails in the
    decompressor itself (lzma.LZMAError, OSError), before zipfile's CRC check. Corrupting cover.jpg keeps the
    level hash of zip_bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as src, zipfile.ZipFile(buffer, "w", method) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr("cover.jpg", random.Random(0).randbytes(20000))
    data = bytearray(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo(member)
    name_bytes, extra_bytes = struct.unpack_from("<HH", data, info.header_offset + 26)    # local header lengths
    middle = info.header_offset + 30 + name_bytes + extra_bytes + info.compress_size // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf, pytest.raises((lzma.LZMAError, OSError)):
        zf.read(member)
    return bytes(data)


def run_scrape(cwd, *args):
    """scrape.py run as a user runs it, from the folder cwd → CompletedProcess with text stdout and stderr."""
    return subprocess.run([sys.executable, str(ROOT / "scrape.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def summary(stdout):
    """The table scrape.py printed → {row: maps}."""
    rows = [line.split() for line in stdout.splitlines()]
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit()}


def zip_rows(out_dir):
    """Table zips → {path: (map id, level hash, reason)}."""
    with sqlite3.connect(Path(out_dir) / scrape.DB_NAME) as db:
        return {row[0]: row[1:] for row in db.execute("SELECT path, id, hash, reason FROM zips")}


def zips_on_disk(out_dir):
    """{path relative to out_dir: bytes} of every zip under out_dir except downloads in flight in .tmp/."""
    out_dir = Path(out_dir)
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in out_dir.rglob("*.zip")
            if p.is_file() and p.parent.name != ".tmp"}


# ---- download ----

@needs_shared
def test_download_survives_faults_and_resumes(tmp_path):
    pairs = map_pairs(10)
    good = {doc["id"]: (data, h) for doc, data, h in pairs[:9]}
    bad_hash_doc = pairs[9][0]
    malformed = {"id": "bad", "name": "no versions", "metadata": {}}
    faults = {("page", 0): ["429"], ("page", 1): ["500"], ("zip", pairs[0][0]["id"]): ["500", "500"],
              ("zip", pairs[1][0]["id"]): ["timeout"], ("zip", pairs[2][0]["id"]): ["truncate"]}
    with MockBeatSaver(pairs, faults, extra_docs=[malformed]) as mock:
        mock.zips["0" * 40] = mock.zips.pop(pairs[9][2])     # served under a hash its content does not have
        mock.zip_ids["0" * 40] = bad_hash_doc["id"]
        mock.docs[9]["versions"][-1]["hash"] = "0" * 40
        mock.docs[9]["versions"][-1]["downloadURL"] = f"{mock.base}/cdn/{'0' * 40}.zip"
        counts = scrape.download(download_args(tmp_path, mock, "--count", "0", "--page_size", "4", *ACCEPT_ALL))

        assert counts["downloaded"] == 9 and counts["malformed"] == 1
        assert counts["failed:hash_mismatch"] == 1 and counts["fault:hash_mismatch"] == 1
        assert counts["fault:status_429"] == 1 and counts["fault:status_500"] == 3
        assert counts["fault:timeout"] == 1 and counts["fault:truncated"] == 1
        assert sorted(p.stem for p in tmp_path.glob("*.zip")) == sorted(good)
        assert_zips_intact(tmp_path, good)
        assert {k: v[0] for k, v in stored(tmp_path).items()} == {k: h for k, (_, h) in good.items()}
        assert list((tmp_path / ".tmp").iterdir()) == []
        assert all(mock.zips_completed[map_id] == 1 for map_id in good)
        assert all(agent.startswith("beatgen-scrape/") for _, agent, _ in mock.requests)

        zip_requests = sum("/cdn/" in path for path, *_ in mock.requests)
        again = scrape.download(download_args(tmp_path, mock, "--count", "0", "--page_size", "4", *ACCEPT_ALL))
        assert again["skipped"] == 9 and again["downloaded"] == 0
        assert sum("/cdn/" in path for path, *_ in mock.requests) == zip_requests + 1   # only the bad-hash map again


@needs_shared
def test_count_stops_and_extends(tmp_path):
    pairs = map_pairs(6)
    with MockBeatSaver(pairs) as mock:
        first = scrape.download(download_args(tmp_path, mock, "--count", "2", "--page_size", "3", *ACCEPT_ALL))
        assert first["downloaded"] == 2
        second = scrape.download(download_args(tmp_path, mock, "--count", "5", "--page_size", "3", *ACCEPT_ALL))
        assert second["skipped"] == 2 and second["downloaded"] == 3
        assert sorted(p.stem for p in tmp_path.glob("*.zip")) == sorted(doc["id"] for doc, _, _ in pairs[:5])


@needs_shared
def test_since_and_search_paging(tmp_path):
    pairs = map_pairs(6)
    with MockBeatSaver(pairs) as mock:
        since = mock.docs[3]["uploaded"]
        counts = scrape.download(download_args(tmp_path / "a", mock, "--count", "0", "--page_size", "2",
                                               "--since", since, *ACCEPT_ALL))
        assert counts["downloaded"] == 4
        assert any("after=" in path for path, *_ in mock.requests)
        counts = scrape.download(download_args(tmp_path / "b", mock, "--count", "0", "--page_size", "2", "--search",
                                               "--min_upvotes", "0", "--min_score", "0.3", "--allow_ai"))
        search_paths = [path for path, *_ in mock.requests if path.startswith("/search/text/0")]
        assert search_paths and all("minRating=0.3" in p and "order=Latest" in p for p in search_paths)
        assert any("to=" in p for p in search_paths)


@needs_shared
@needs_read_map
def test_download_applies_criteria(tmp_path):
    docs = {doc["id"]: doc for doc in fixture_docs()}
    good_doc, bpm_doc, ai_doc = docs["33321"], docs["40298"], copy.deepcopy(docs["926a"])
    ai_doc["declaredAi"] = "Uploader"
    folders = {f.name: f for f in v2_map_folders()}
    good_data, good_hash = zip_map(folders["21287 (Lose You Now - TheCzar1994)"])
    bpm_data, bpm_hash = zip_map(MAP_FIXTURES / "Lekrkoekj__the-big-goodbye" / "the-big-goodbye")
    ai_data, ai_hash = zip_map(folders["Die For You - Dabin Remix"])
    with MockBeatSaver([(good_doc, good_data, good_hash), (bpm_doc, bpm_data, bpm_hash),
                        (ai_doc, ai_data, ai_hash)]) as mock:
        counts = scrape.download(download_args(tmp_path, mock, "--count", "0", *RELAXED))
        assert counts["downloaded"] == 1, counts
        assert counts["rejected:bpm_changes"] == 1 and counts["rejected:ai_made"] == 1
        assert [p.name for p in tmp_path.glob("*.zip")] == ["33321.zip"]
        assert (tmp_path / "rejected" / "bpm_changes" / "40298.zip").is_file()
        assert stored(tmp_path) == {"33321": (good_hash, None), "40298": (bpm_hash, "bpm_changes")}
        assert not any(ai_hash in path for path, *_ in mock.requests)      # rejected on metadata: never fetched


@needs_shared
def test_sigkill_mid_run_then_resume(tmp_path):
    pairs = map_pairs(8)
    expected = {doc["id"]: (data, h) for doc, data, h in pairs}
    with MockBeatSaver(pairs, zip_chunk_delay_s=0.08) as mock:
        command = [sys.executable, str(ROOT / "scrape.py"), "download", str(tmp_path), "--api_url", mock.base,
                   "--count", "0", "--page_size", "3", *FAST, *ACCEPT_ALL]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            in_flight = list((tmp_path / ".tmp").glob("*.zip")) if (tmp_path / ".tmp").is_dir() else []
            if len(list(tmp_path.glob("*.zip"))) >= 2 and in_flight:
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, "scraper finished before it could be killed"

        on_disk = {p.stem for p in tmp_path.glob("*.zip")}
        assert 2 <= len(on_disk) < len(expected)
        assert_zips_intact(tmp_path, expected)
        assert set(stored(tmp_path)) <= on_disk

        resumed = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert resumed.returncode == 0, resumed.stderr
        assert sorted(p.stem for p in tmp_path.glob("*.zip")) == sorted(expected)
        assert_zips_intact(tmp_path, expected)
        assert set(stored(tmp_path)) == set(expected)
        assert list((tmp_path / ".tmp").iterdir()) == []


def test_polite_session_spaces_requests_and_names_itself():
    with MockBeatSaver([]) as mock:
        session = scrape.PoliteSession(interval_s=0.2, timeout_s=2, retries=0)
        start_s = time.monotonic()
        for _ in range(3):
            assert session.get(f"{mock.base}/maps/latest").status_code == 200
        assert time.monotonic() - start_s >= 0.4
        assert all(agent == scrape.USER_AGENT.format(contact="") for _, agent, _ in mock.requests)


# ---- the commands as users run them ----

@needs_shared
def test_download_command_counts_hostile_zips_and_goes_on(tmp_path):
    pairs = map_pairs(5)
    lzma_doc, bzip2_doc, blocked_doc = (doc for doc, _, _ in pairs[:3])
    pairs[0] = (lzma_doc, corrupt_zip(pairs[0][1], zipfile.ZIP_LZMA), pairs[0][2])
    pairs[1] = (bzip2_doc, corrupt_zip(pairs[1][1], zipfile.ZIP_BZIP2), pairs[1][2])
    good = {doc["id"]: (data, h) for doc, data, h in pairs[3:]}       # the oldest two maps, after the bad ones
    out = tmp_path / "maps"
    (out / f"{blocked_doc['id']}.zip").mkdir(parents=True)            # a folder where that map's zip would go
    with MockBeatSaver(pairs) as mock:
        result = run_scrape(tmp_path, "download", "maps", "--api_url", mock.base, "--count", "0", "--page_size", "2",
                            *FAST, *ACCEPT_ALL)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    counts = summary(result.stdout)
    assert counts["failed:bad_zip"] == 2 and counts["failed:file_error"] == 1 and counts["downloaded"] == 2, counts
    for doc in (lzma_doc, bzip2_doc, blocked_doc):
        assert f"map {doc['id']}: maps/" in result.stderr        # one warning naming the map and its file
    assert zips_on_disk(out) == {f"{map_id}.zip": data for map_id, (data, _) in good.items()}
    assert zip_rows(out) == {f"{map_id}.zip": (map_id, h, None) for map_id, (_, h) in good.items()}
    assert stored(out) == {map_id: (h, None) for map_id, (_, h) in good.items()}
    assert (out / f"{blocked_doc['id']}.zip").is_dir()


@needs_shared
def test_download_command_spaces_every_request_retries_included(tmp_path):
    interval_s, backoff_s, slack_s = 0.3, 0.15, 0.1      # slack_s: the mock's timestamps jitter under load
    pairs = map_pairs(2)
    faults = {("page", 0): ["500", "500", "500"], ("zip", pairs[0][0]["id"]): ["429"]}
    with MockBeatSaver(pairs, faults) as mock:
        result = run_scrape(tmp_path, "download", "maps", "--api_url", mock.base, "--count", "0", "--page_size", "2",
                            "--request_interval_s", str(interval_s), "--backoff_s", str(backoff_s), "--retries", "4",
                            "--timeout_s", "5", *ACCEPT_ALL)
        paths = [path.split("?")[0] for path, *_ in mock.requests]
        times_s = [received_s for *_, received_s in mock.requests]
    assert result.returncode == 0, result.stderr
    counts = summary(result.stdout)
    assert counts["fault:status_500"] == 3 and counts["fault:status_429"] == 1 and counts["downloaded"] == 2, counts
    # requests: the first page 4 times (500, 500, 500, 200), the first zip twice (429 with Retry-After: 1, 200),
    # the second zip, the empty second page
    zip_paths = [f"/cdn/{h}.zip" for _, _, h in pairs]
    assert paths == ["/maps/latest"] * 4 + zip_paths[:1] * 2 + zip_paths[1:] + ["/maps/latest"]
    gaps_s = [b - a for a, b in zip(times_s, times_s[1:])]
    assert min(gaps_s) >= interval_s - slack_s, gaps_s
    assert gaps_s[2] >= 4 * backoff_s - slack_s, gaps_s      # third retry: back-off 4 x backoff_s, past the interval
    assert gaps_s[4] >= 1.0 - slack_s, gaps_s                # Retry-After: 1


@needs_shared
@needs_read_map
def test_download_command_moves_old_versions_out(tmp_path):
    docs = {doc["id"]: doc for doc in fixture_docs()}
    folders = {f.name: f for f in v2_map_folders()}
    a_v1 = zip_map(folders["21287 (Lose You Now - TheCzar1994)"])
    a_v2 = zip_map(MAP_FIXTURES / "Lekrkoekj__the-big-goodbye" / "the-big-goodbye")      # changes BPM: rejected
    b_v1 = zip_map(folders["Die For You - Dabin Remix"])
    b_v2 = zip_map(folders["Die For You - Dabin Remix"], lambda info: info.update(_songSubName="v2"))
    command = ["download", "maps", "--count", "0", *FAST, *RELAXED]
    with MockBeatSaver([(docs["33321"], *a_v1), (docs["40298"], *b_v1)]) as mock:
        first = run_scrape(tmp_path, *command, "--api_url", mock.base)
    assert first.returncode == 0 and summary(first.stdout)["downloaded"] == 2, first.stderr
    with MockBeatSaver([(docs["33321"], *a_v2), (docs["40298"], *b_v2)]) as mock:
        second = run_scrape(tmp_path, *command, "--api_url", mock.base)
    assert second.returncode == 0, second.stderr
    counts = summary(second.stdout)
    assert counts["downloaded"] == 1 and counts["rejected:bpm_changes"] == 1, counts
    out = tmp_path / "maps"
    assert zips_on_disk(out) == {"40298.zip": b_v2[0], "rejected/bpm_changes/33321.zip": a_v2[0],
                                 "old_versions/33321.zip": a_v1[0], "old_versions/40298.zip": b_v1[0]}
    assert zip_rows(out) == {"40298.zip": ("40298", b_v2[1], None),
                             "rejected/bpm_changes/33321.zip": ("33321", a_v2[1], "bpm_changes"),
                             "old_versions/33321.zip": ("33321", a_v1[1], "old_version"),
                             "old_versions/40298.zip": ("40298", b_v1[1], "old_version")}
    assert stored(out) == {"33321": (a_v2[1], "bpm_changes"), "40298": (b_v2[1], None)}
    # a third version whose metadata now fails (declared AI): the accepted zip leaves the training set too
    b_v3 = zip_map(folders["Die For You - Dabin Remix"], lambda info: info.update(_songSubName="v3"))
    ai_doc = {**docs["40298"], "declaredAi": "Admin"}
    with MockBeatSaver([(docs["33321"], *a_v2), (ai_doc, *b_v3)]) as mock:
        third = run_scrape(tmp_path, "download", "maps", "--count", "0", *FAST, *RELAXED, "--api_url", mock.base)
    assert third.returncode == 0 and summary(third.stdout)["rejected:ai_made"] == 1, third.stderr
    assert "40298.zip" not in zips_on_disk(out) and zips_on_disk(out)["old_versions/40298.1.zip"] == b_v2[0]
    assert zip_rows(out)["old_versions/40298.1.zip"] == ("40298", b_v2[1], "old_version")
    assert stored(out)["40298"] == (b_v3[1], "ai_made")
    assert not mock.zips_completed["40298"]                       # rejected on its record: never downloaded


# ---- zips and records ----

def make_zip(files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_check_zip_rejects_bad_files(tmp_path):
    info = json.dumps({"_difficultyBeatmapSets": []}).encode()
    info_hash = hashlib.sha1(info).hexdigest()
    good = make_zip({"Info.dat": info, "song.egg": b"\0" * 1000})
    path = tmp_path / "m.zip"
    # cases = [(fault kind, zip bytes, expected hash, max_unzipped_bytes)]
    cases = [("bad_zip", b"not a zip at all", info_hash, 0), ("too_large", good, info_hash, 500),
             ("hash_mismatch", good, "f" * 40, 0),
             ("bad_zip", good.replace(b"\0" * 1000, b"\1" * 1000), info_hash, 0),        # stored member, CRC wrong
             ("bad_zip", corrupt_zip(good, zipfile.ZIP_LZMA), info_hash, 0),
             ("bad_zip", corrupt_zip(good, zipfile.ZIP_BZIP2), info_hash, 0)]
    for kind, data, expected_hash, max_unzipped_bytes in cases:
        path.write_bytes(data)
        with pytest.raises(scrape.MapFault) as fault:
            scrape.check_zip(path, expected_hash, max_unzipped_bytes)
        assert fault.value.kind == kind
        assert str(path) in str(fault.value)
    path.write_bytes(good)
    scrape.check_zip(path, info_hash)


@needs_shared
def test_records_from_recorded_payloads():
    docs = fixture_docs()
    records = [scrape.make_record(doc) for doc in docs]
    assert len({r["id"] for r in records}) == 30
    focus = next(r for r in records if r["id"] == "4b6f1")
    assert focus["hash"] == "e5c654bfaf385feda0df68a406dfadda471df62e" and focus["curated"]
    assert focus["diffs"][-1]["difficulty"] == "ExpertPlus" and focus["diffs"][-1]["parity_errors"] == 0
    for broken in ({"id": "abc"}, {**docs[0], "versions": []}, {**docs[0], "versions": ["x"]},
                   {**docs[0], "id": "../x"}, "text", None):
        with pytest.raises(ValueError):
            scrape.make_record(broken)


@needs_shared
def test_record_criteria():
    record = scrape.make_record(next(d for d in fixture_docs() if d["id"] == "4b6f1"))
    c = scrape.Criteria()
    assert scrape.record_reason(record, c) is None
    cases = [({"declared_ai": "Uploader"}, "ai_made"), ({"automapper": True}, "ai_made"),
             ({"score": 0.3}, "low_score"), ({"upvotes": 1}, "few_upvotes"), ({"duration_s": 10}, "duration"),
             ({"duration_s": 5000}, "duration")]
    for change, reason in cases:
        assert scrape.record_reason({**record, **change}, c) == reason
    diffs = copy.deepcopy(record["diffs"])
    diffs[-1]["ne"] = True
    assert scrape.record_reason({**record, "diffs": diffs}, c) == "mods"
    assert scrape.record_reason({**record, "diffs": diffs}, scrape.Criteria(allow_mods=True)) is None
    diffs[-1].update(ne=False, parity_errors=99)
    assert scrape.record_reason({**record, "diffs": diffs}, c) == "parity_errors"
    assert scrape.record_reason({**record, "diffs": diffs}, scrape.Criteria(max_parity_errors=-1)) is None
    diffs[-1].update(parity_errors=0, nps=30.0)
    assert scrape.record_reason({**record, "diffs": diffs}, c) == "nps"
    only_easy = [d for d in record["diffs"] if d["difficulty"] == "Easy"]
    assert scrape.record_reason({**record, "diffs": only_easy}, c) == "no_wanted_difficulty"
    assert scrape.record_reason({**record, "diffs": only_easy}, scrape.Criteria(difficulties=(), min_nps=0)) is None


# ---- filter on fixture maps ----

FILTER_CASES = {     # fixture folder → first criterion it fails under the defaults
    "Lekrkoekj__the-big-goodbye/the-big-goodbye": "bpm_changes",
    "benzhenwen__Cascade/Cascade": "bpm_changes",
    "ScuffedItalian__ScuffedNoodleMaps/Pure": "mods",
    "RHKasper__BeatSaberMaps/Approaching Nirvana - Alone - 6bfa": "mods",
    "RHKasper__BeatSaberMaps/1161 (The Princess Bride Sword Fight - jenmacallister)": "no_wanted_difficulty",
    "RHKasper__BeatSaberMaps/21287 (Lose You Now - TheCzar1994)": None,      # editor-only _BPMChanges: no change
    "newember__bs_maps/Die For You - Dabin Remix": None,
}


@needs_shared
@needs_read_map
def test_filter_decisions_on_fixture_maps(tmp_path, capsys):
    names = {}
    for i, folder in enumerate(FILTER_CASES):
        (tmp_path / f"{i:x}.zip").write_bytes(zip_map(MAP_FIXTURES / folder)[0])
        names[f"{i:x}.zip"] = FILTER_CASES[folder]
    offset_folder = MAP_FIXTURES / "newember__bs_maps" / "Die For You - Dabin Remix"
    (tmp_path / "ff.zip").write_bytes(zip_map(offset_folder, lambda info: info.update(_songTimeOffset=1.5))[0])
    names["ff.zip"] = "song_offset"
    (tmp_path / "fe.zip").write_bytes(b"not a zip")
    names["fe.zip"] = "unreadable"
    for name, method in [("fd.zip", zipfile.ZIP_LZMA), ("fc.zip", zipfile.ZIP_BZIP2)]:
        (tmp_path / name).write_bytes(corrupt_zip(zip_map(offset_folder)[0], method, "Info.dat"))
        names[name] = "unreadable"

    assert scrape.filter_folder(tmp_path, scrape.Criteria()) == dict(sorted(names.items()))
    assert (tmp_path / "accepted.txt").read_text().split() == sorted(n for n, r in names.items() if r is None)

    assert scrape.main(["filter", str(tmp_path), "--move_rejects"]) == 0
    table = capsys.readouterr().out
    assert "bpm_changes" in table and "accepted" in table
    assert sorted(p.name for p in tmp_path.glob("*.zip")) == sorted(n for n, r in names.items() if r is None)
    for name, reason in names.items():
        if reason:
            assert (tmp_path / "rejected" / reason / name).is_file()

    decisions = scrape.filter_folder(tmp_path, scrape.Criteria(allow_bpm_changes=True), move_rejects=True)
    assert decisions["0.zip"] is None and (tmp_path / "0.zip").is_file()    # moved back, nothing lost
    assert len(list(tmp_path.rglob("*.zip"))) == len(names)


@needs_shared
def test_filter_command_keeps_every_copy_and_records_it(tmp_path):
    folders = v2_map_folders()[:3]
    pairs = map_pairs(3)
    for i, (doc, _, _) in enumerate(pairs):
        doc["stats"]["upvotes"] = 0 if i == 2 else 100
    a, b, c = (doc["id"] for doc, _, _ in pairs)
    current = {doc["id"]: (data, h) for doc, data, h in pairs}
    old = {doc["id"]: zip_map(folder, lambda info: info.update(_songSubName="old"))
           for (doc, _, _), folder in zip(pairs, folders)}
    out = tmp_path / "maps"
    with MockBeatSaver(pairs) as mock:
        assert scrape.download(download_args(out, mock, "--count", "0", *ACCEPT_ALL))["downloaded"] == 3
    # as older versions of scrape.py left them: an old copy of a in rejected/ beside a.zip; b's map in rejected/
    # with its old version in the training set
    (out / "rejected" / "bpm_changes").mkdir(parents=True)
    (out / "rejected" / "bpm_changes" / f"{a}.zip").write_bytes(old[a][0])
    (out / f"{b}.zip").rename(out / "rejected" / "bpm_changes" / f"{b}.zip")
    (out / f"{b}.zip").write_bytes(old[b][0])

    expected = {f"{a}.zip": (a, *current[a], None), f"{b}.zip": (b, *current[b], None),
                f"old_versions/{a}.zip": (a, *old[a], "old_version"),
                f"old_versions/{b}.zip": (b, *old[b], "old_version"),
                f"rejected/few_upvotes/{c}.zip": (c, *current[c], "few_upvotes")}
    for _ in range(2):          # the second run finds everything in place
        result = run_scrape(tmp_path, "filter", "maps", "--move_rejects", *ACCEPT_ALL, "--min_upvotes", "5")
        assert result.returncode == 0, result.stderr
        assert zips_on_disk(out) == {path: data for path, (_, data, _, _) in expected.items()}
        assert zip_rows(out) == {path: (i, h, reason) for path, (i, _, h, reason) in expected.items()}
        assert stored(out)[c] == (current[c][1], "few_upvotes") and stored(out)[a] == (current[a][1], None)
        counts = summary(result.stdout)
        assert (counts["old_version"], counts["few_upvotes"], counts["accepted"], counts["total"]) == (2, 1, 2, 5)
        assert f"wrote {Path('maps') / 'accepted.txt'}" in result.stdout
        assert (out / "accepted.txt").read_text().split() == sorted([f"{a}.zip", f"{b}.zip"])
        assert sorted((out / "rejected.tsv").read_text().splitlines()) == sorted(
            f"{path}\t{reason}" for path, (_, _, _, reason) in expected.items() if reason)


# ---- maps.sqlite and the command line ----

def test_corrupt_database_is_one_error_line(tmp_path):
    out = tmp_path / "maps"
    out.mkdir()
    garbage = b"this is not an SQLite database\n" * 100
    (out / "maps.sqlite").write_bytes(garbage)
    with MockBeatSaver([]) as mock:
        for command in (["download", "maps", "--api_url", mock.base, *FAST], ["filter", "maps", "--move_rejects"]):
            result = run_scrape(tmp_path, *command)
            assert result.returncode == 1 and result.stdout == "", result
            assert result.stderr.startswith("error: maps/maps.sqlite: not a usable metadata database (")
            assert "move it aside" in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
        assert mock.requests == []
    assert (out / "maps.sqlite").read_bytes() == garbage
    result = run_scrape(tmp_path, "filter", "missing")
    assert (result.returncode, result.stderr) == (1, "error: missing: not a folder\n")


def test_format_1_database_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / scrape.DB_NAME)        # as scrape.py wrote DB_FORMAT 1
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("CREATE TABLE maps (id TEXT PRIMARY KEY, hash TEXT NOT NULL, uploaded TEXT, rejected TEXT, "
               "record TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('format', '1')")
    rows = [("a1", "1" * 40, "2024-01-01", None, '{"id": "a1"}'), ("b2", "2" * 40, None, "bpm_changes", "{}"),
            ("c3", "3" * 40, None, None, "{}")]
    db.executemany("INSERT INTO maps VALUES (?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    (tmp_path / "a1.zip").write_bytes(b"a1")
    (tmp_path / "rejected" / "bpm_changes").mkdir(parents=True)
    (tmp_path / "rejected" / "bpm_changes" / "b2.zip").write_bytes(b"b2")         # c3's zip is gone

    db = scrape.open_db(tmp_path / scrape.DB_NAME)
    assert db.execute("SELECT * FROM maps ORDER BY id").fetchall() == rows
    assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() == (str(scrape.DB_FORMAT),)
    db.execute("UPDATE meta SET value = '9' WHERE key = 'format'")
    db.commit()
    db.close()
    assert zip_rows(tmp_path) == {"a1.zip": ("a1", "1" * 40, None),
                                  "rejected/bpm_changes/b2.zip": ("b2", "2" * 40, "bpm_changes")}
    with pytest.raises(ValueError, match="metadata format 9"):
        scrape.open_db(tmp_path / scrape.DB_NAME)


def test_absurd_values_are_usage_errors(capsys):
    for flag, value in [("--retries", "-1"), ("--request_interval_s", "nan"), ("--timeout_s", "0"),
                        ("--backoff_s", "inf"), ("--page_size", "101"), ("--attempts", "0"), ("--count", "-5"),
                        ("--min_score", "2"), ("--max_parity_errors", "-2"), ("--max_zip_mb", "-1")]:
        with pytest.raises(SystemExit) as exit_:
            scrape.parse_args(["download", "x", flag, value])
        assert exit_.value.code == 2 and f"error: argument {flag}: must be" in capsys.readouterr().err, flag


def test_every_flag_has_help_and_criteria_say_how_to_turn_off():
    assert scrape.criteria_from_args(scrape.parse_args(["filter", "x"])) == scrape.Criteria()
    criteria = {field.name for field in dataclasses.fields(scrape.Criteria)}
    commands = next(a for a in scrape.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in commands.choices.values():
        for action in command._actions:
            assert action.help, action.dest
            if action.dest in criteria:
                assert any(w in action.help for w in ("turns it off", "= any", "default: dropped")), action.help
