"""scrape.py against a mock BeatSaver on 127.0.0.1 (recorded payloads, zips built from fixture map folders, injected
faults), the filter's decisions on fixture maps, and a SIGKILL mid-run followed by a resume."""

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import signal
import sqlite3
import subprocess
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
        self.requests = []              # [(path with query, User-Agent)]
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
            mock.requests.append((self.path, self.headers.get("User-Agent")))
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
        assert all(agent.startswith("beatgen-scrape/") for _, agent in mock.requests)

        zip_requests = sum("/cdn/" in path for path, _ in mock.requests)
        again = scrape.download(download_args(tmp_path, mock, "--count", "0", "--page_size", "4", *ACCEPT_ALL))
        assert again["skipped"] == 9 and again["downloaded"] == 0
        assert sum("/cdn/" in path for path, _ in mock.requests) == zip_requests + 1   # only the bad-hash map again


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
        assert any("after=" in path for path, _ in mock.requests)
        counts = scrape.download(download_args(tmp_path / "b", mock, "--count", "0", "--page_size", "2", "--search",
                                               "--min_upvotes", "0", "--min_score", "0.3", "--allow_ai"))
        search_paths = [path for path, _ in mock.requests if path.startswith("/search/text/0")]
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
    relaxed = ["--min_score", "0", "--min_upvotes", "0", "--min_duration_s", "0", "--max_duration_s", "0",
               "--min_nps", "0", "--max_nps", "0", "--max_parity_errors", "-1", "--difficulties", ""]
    with MockBeatSaver([(good_doc, good_data, good_hash), (bpm_doc, bpm_data, bpm_hash),
                        (ai_doc, ai_data, ai_hash)]) as mock:
        counts = scrape.download(download_args(tmp_path, mock, "--count", "0", *relaxed))
        assert counts["downloaded"] == 1, counts
        assert counts["rejected:bpm_changes"] == 1 and counts["rejected:ai_made"] == 1
        assert [p.name for p in tmp_path.glob("*.zip")] == ["33321.zip"]
        assert (tmp_path / "rejected" / "bpm_changes" / "40298.zip").is_file()
        assert stored(tmp_path) == {"33321": (good_hash, None), "40298": (bpm_hash, "bpm_changes")}
        assert not any(ai_hash in path for path, _ in mock.requests)      # rejected on metadata: never fetched


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
        assert all(agent == scrape.USER_AGENT.format(contact="") for _, agent in mock.requests)


# ---- zips and records ----

def make_zip(files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_check_zip_rejects_bad_files(tmp_path):
    info = json.dumps({"_difficultyBeatmapSets": []}).encode()
    good = make_zip({"Info.dat": info, "song.egg": b"\0" * 1000})
    path = tmp_path / "m.zip"
    cases = {"bad_zip": b"not a zip at all", "too_large": good,
             "hash_mismatch": good, "bad_zip ": good.replace(b"\0" * 1000, b"\1" * 1000)}
    for kind, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(scrape.MapFault) as fault:
            expected = "f" * 40 if kind == "hash_mismatch" else hashlib.sha1(info).hexdigest()
            scrape.check_zip(path, expected, max_unzipped_bytes=500 if kind == "too_large" else 0)
        assert fault.value.kind == kind.strip()
    path.write_bytes(good)
    scrape.check_zip(path, hashlib.sha1(info).hexdigest())


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


def test_every_flag_has_help_and_criteria_say_how_to_turn_off():
    assert scrape.criteria_from_args(scrape.parse_args(["filter", "x"])) == scrape.Criteria()
    criteria = {field.name for field in dataclasses.fields(scrape.Criteria)}
    commands = next(a for a in scrape.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in commands.choices.values():
        for action in command._actions:
            assert action.help, action.dest
            if action.dest in criteria:
                assert any(w in action.help for w in ("turns it off", "= any", "default: dropped")), action.help
