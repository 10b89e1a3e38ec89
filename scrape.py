"""Build a training set from BeatSaver: download map zips with their metadata, and filter them.

    python scrape.py download maps/ --count 500                      # newest 500 maps that pass the filters
    python scrape.py download maps/ --count 5000 --since 2022-01-01 --contact you@example.com
    python scrape.py download maps/ --count 500 --search             # let /search/text pre-filter on the server
    python scrape.py filter maps/                                    # print the table, write maps/accepted.txt
    python scrape.py filter maps/ --allow_bpm_changes --move_rejects # re-decide, move rejects to maps/rejected/<reason>/
    python scrape.py download --help

OUT_DIR after a download:
    <id>.zip                    accepted maps, the training data (ZippedBeatSaberDataset reads only top-level zips)
    rejected/<reason>/<id>.zip  maps the criteria rejected (kept, never deleted)
    old_versions/<id>.zip       copies superseded by a newer version of the map, or a second copy of an id;
    old_versions/<id>.<n>.zip   n = 1, 2, ... when that name is taken (kept, never deleted)
    maps.sqlite                 table `maps`: one metadata record per stored map (see make_record);
                                table `zips`: one row per zip above (path, map id, level hash, reason)
    .tmp/                       downloads in flight; emptied at the start of every run
A zip is never moved onto an existing file. A new version of a map moves the map's older copies to old_versions/
before it takes their place. Where one id has several copies (left by older versions of this script), the one
whose level hash is the record's hash is the map; `filter --move_rejects` moves the others to old_versions/.
A run stops once OUT_DIR holds --count accepted maps, so rerunning the same command resumes a killed run.
"""
import argparse
import itertools
import json
import logging
import math
import os
import re
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests
from tqdm import tqdm

import maps

log = logging.getLogger("scrape")

API_URL = "https://api.beatsaver.com"
USER_AGENT = "beatgen-scrape/0.1.0 (Beat Saber map dataset builder{contact})"
DB_NAME = "maps.sqlite"
DB_FORMAT = 2                   # bumped when the tables or the record layout change; 1 (no `zips`) is migrated
OLD_DIR = "old_versions"
OLD_VERSION = "old_version"     # table zips' reason for a superseded copy of a map (in OLD_DIR once moved)
RETRY_STATUS = (429, 500, 502, 503, 504)
MAX_RETRY_WAIT_S = 120.0        # longest back-off or Retry-After wait before one retry
# criteria as checked: the metadata record's, then the zip's; a rejected map counts under the first it fails
REASONS = ("ai_made", "low_score", "few_upvotes", "no_wanted_difficulty", "mods", "duration", "nps",
           "parity_errors", "unreadable", "bpm_changes", "song_offset")


@dataclass
class Criteria:
    """What a training map must satisfy; every field has an off value (False → True, 0, '' or -1)."""
    allow_ai: bool = False
    min_score: float = 0.6              # BeatSaver rating 0..1
    min_upvotes: int = 5
    characteristic: str = "Standard"    # "" = any
    difficulties: tuple = ("Expert", "ExpertPlus")   # () = any
    allow_mods: bool = False
    allow_bpm_changes: bool = False
    allow_song_offset: bool = False
    min_duration_s: float = 30.0
    max_duration_s: float = 900.0
    min_nps: float = 1.0
    max_nps: float = 16.0
    max_parity_errors: int = 20         # -1 = no limit

    def wanted(self, characteristic, difficulty):
        return ((not self.characteristic or characteristic == self.characteristic)
                and (not self.difficulties or difficulty in self.difficulties))

    def uses_zip(self):
        return bool(self.characteristic or self.difficulties or not self.allow_mods
                    or not self.allow_bpm_changes or not self.allow_song_offset)


class MapFault(ValueError):
    """A map whose zip could not be stored; kind names the fault (hash_mismatch, truncated, http_404, ...)."""
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


# ---- metadata records ----

def make_record(doc):
    """One API MapDetail dict → the flat record stored per map (ValueError naming the map when malformed)."""
    map_id = doc.get("id") if isinstance(doc, dict) else None
    try:
        # versions = [MapVersion]; once published only Published ones are listed, the newest is the map
        version = max((v for v in doc["versions"] if v.get("state", "Published") == "Published"),
                      key=lambda v: v.get("createdAt", ""))
        meta, stats, uploader = doc["metadata"], doc["stats"], doc["uploader"]
        record = {
            "id": map_id, "hash": version["hash"], "download_url": version["downloadURL"],
            "name": doc["name"], "uploader": uploader["name"], "uploader_id": uploader["id"],
            "uploaded": doc.get("uploaded"), "curated": "curatedAt" in doc, "tags": list(doc.get("tags", [])),
            "song_name": meta["songName"], "song_sub_name": meta.get("songSubName", ""),
            "song_author": meta.get("songAuthorName", ""), "level_author": meta.get("levelAuthorName", ""),
            "bpm": float(meta["bpm"]), "duration_s": float(meta["duration"]),
            "score": float(stats["score"]), "upvotes": int(stats["upvotes"]), "downvotes": int(stats["downvotes"]),
            "automapper": bool(doc["automapper"]), "declared_ai": doc.get("declaredAi", "None"),
            "ranked": bool(doc.get("ranked")), "qualified": bool(doc.get("qualified")),
            "bl_ranked": bool(doc.get("blRanked")), "bl_qualified": bool(doc.get("blQualified")),
            "sage_score": version.get("sageScore"),
            # diffs = one dict per difficulty: counts, NJS, notes/s, parity summary, star ratings, mod flags
            "diffs": [{
                "characteristic": d["characteristic"], "difficulty": d["difficulty"], "label": d.get("label"),
                "njs": float(d["njs"]), "nps": float(d["nps"]), "seconds": float(d.get("seconds", 0.0)),
                "notes": int(d["notes"]), "bombs": int(d["bombs"]), "obstacles": int(d["obstacles"]),
                "parity_errors": int(d["paritySummary"]["errors"]), "parity_warns": int(d["paritySummary"]["warns"]),
                "parity_resets": int(d["paritySummary"]["resets"]),
                "stars": d.get("stars"), "bl_stars": d.get("blStars"),
                "chroma": bool(d.get("chroma")), "ne": bool(d.get("ne")), "me": bool(d.get("me")),
                "cinema": bool(d.get("cinema")), "vivify": bool(d.get("vivify")),
            } for d in version["diffs"]],
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"map {map_id!r}: malformed MapDetail ({type(e).__name__}: {e})") from None
    if not isinstance(map_id, str) or not re.fullmatch(r"[0-9a-f]{1,12}", map_id):
        raise ValueError(f"map {map_id!r}: id is not a BeatSaver hex key")
    if not re.fullmatch(r"[0-9a-f]{40}", str(record["hash"])):
        raise ValueError(f"map {map_id}: version hash {record['hash']!r} is not 40 lowercase hex digits")
    if not str(record["download_url"]).startswith(("http://", "https://")):
        raise ValueError(f"map {map_id}: downloadURL {record['download_url']!r} is not an http(s) URL")
    return record


def open_db(path):
    """The metadata store at path, created if missing, format 1 migrated. Tables:
    maps(id, hash, uploaded, rejected = its zip's reason or NULL, record = JSON) and
    zips(path relative to the store's folder, id, hash = level hash or NULL, reason = criterion, old_version or
    NULL = accepted). ValueError naming the file when it is not a usable metadata store."""
    try:
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS maps (id TEXT PRIMARY KEY, hash TEXT NOT NULL, uploaded TEXT, "
                   "rejected TEXT, record TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS zips (path TEXT PRIMARY KEY, id TEXT NOT NULL, hash TEXT, reason TEXT)")
        db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(DB_FORMAT),))
        found = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0]
        if found == "1":        # no table zips yet: each map's zip is where its `rejected` column says
            for map_id, map_hash, rejected in db.execute("SELECT id, hash, rejected FROM maps").fetchall():
                rel_path = f"{map_id}.zip" if rejected is None else f"rejected/{rejected}/{map_id}.zip"
                if (Path(path).parent / rel_path).is_file():
                    db.execute("INSERT OR IGNORE INTO zips VALUES (?, ?, ?, ?)", (rel_path, map_id, map_hash, rejected))
            db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(DB_FORMAT),))
            found = str(DB_FORMAT)
        db.commit()
    except sqlite3.Error as e:
        raise ValueError(f"{path}: not a usable metadata database ({e}). If it is damaged, move it aside: "
                         "`scrape.py download` into this folder rebuilds it from BeatSaver, keeping the zips here"
                         ) from None
    if found != str(DB_FORMAT):
        db.close()
        raise ValueError(f"{path}: metadata format {found}, this scrape.py reads 1 and {DB_FORMAT}; use a new OUT_DIR")
    return db


def relative(folder, path):
    """path inside folder → 'a/b.zip', the key of table zips."""
    return Path(path).relative_to(folder).as_posix()


def record_zip(db, folder, path, map_id, map_hash, reason):
    """Set table zips' row for the zip at path inside folder (not committed)."""
    db.execute("INSERT OR REPLACE INTO zips VALUES (?, ?, ?, ?)", (relative(folder, path), map_id, map_hash, reason))


def move_zip(db, folder, src, dest, map_id, map_hash, reason):
    """Rename the zip src to dest and move its zips row along (committed); returns dest.
    Never onto an existing file: FileExistsError naming dest when it exists, and src stays where it is."""
    if dest.exists():
        raise FileExistsError(f"{dest}: already exists, not overwritten with {src}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dest)
    db.execute("DELETE FROM zips WHERE path = ?", (relative(folder, src),))
    record_zip(db, folder, dest, map_id, map_hash, reason)
    db.commit()
    return dest


def old_version_path(folder, map_id):
    """The first free name of OLD_DIR/<id>.zip, <id>.1.zip, <id>.2.zip, ... inside folder."""
    for n in itertools.count():
        path = folder / OLD_DIR / (f"{map_id}.zip" if n == 0 else f"{map_id}.{n}.zip")
        if not path.exists():
            return path


def retire_zip(db, folder, path, map_id):
    """Move a superseded copy of a map out of the training set into OLD_DIR (committed); returns its new path."""
    return move_zip(db, folder, path, old_version_path(folder, map_id), map_id, zip_hash(path), OLD_VERSION)


# ---- decisions ----

def record_reason(record, c):
    """First metadata criterion the record fails, or None."""
    # diffs = the record's difficulties that training would use
    diffs = [d for d in record["diffs"] if c.wanted(d["characteristic"], d["difficulty"])]
    if not c.allow_ai and (record["automapper"] or record["declared_ai"] != "None"):
        return "ai_made"
    if record["score"] < c.min_score:
        return "low_score"
    if record["upvotes"] < c.min_upvotes:
        return "few_upvotes"
    if not diffs:
        return "no_wanted_difficulty"
    if not c.allow_mods and any(d["ne"] or d["me"] or d["vivify"] for d in diffs):
        return "mods"
    if record["duration_s"] < c.min_duration_s or (c.max_duration_s and record["duration_s"] > c.max_duration_s):
        return "duration"
    if any(d["nps"] < c.min_nps or (c.max_nps and d["nps"] > c.max_nps) for d in diffs):
        return "nps"
    if c.max_parity_errors >= 0 and any(d["parity_errors"] > c.max_parity_errors for d in diffs):
        return "parity_errors"
    return None


def zip_reason(path, c):
    """First zip criterion the map at path fails (from maps.py's facts), or None."""
    try:
        beatmap = maps.read_map(path)
    except ValueError as e:
        log.warning("%s", e)
        return "unreadable"
    # diffs = the parsed difficulties that training would use
    diffs = [d for key, d in beatmap.difficulties.items() if c.wanted(*key)]
    if not diffs:
        return "no_wanted_difficulty"
    if not c.allow_mods and any(r in maps.UNSUPPORTED_REQUIREMENTS for d in diffs for r in d.requirements):
        return "mods"
    if not c.allow_bpm_changes and any(d.bpm_changes for d in diffs):
        return "bpm_changes"
    if not c.allow_song_offset and beatmap.song_time_offset_s != 0:
        return "song_offset"
    return None


def filter_folder(maps_dir, c, move_rejects=False):
    """Decide every zip in maps_dir and maps_dir/rejected/*/; writes accepted.txt, rejected.tsv, and in
    maps_dir/maps.sqlite (created if missing) table zips and each decided record's `rejected`.

    Zips are grouped by file stem = map id. The map's zip is the one whose level hash is the record's hash, else
    the first (top level, then rejected/ by name); its other copies are decided old_version. Metadata criteria apply
    where maps.sqlite has the map's record, zip criteria to the map's zip. move_rejects moves accepted zips to
    maps_dir, rejected ones to rejected/<reason>/ and old versions to old_versions/, never onto an existing file.
    Returns {zip path relative to maps_dir: first failed criterion, old_version, or None = accepted}; every zip
    already in old_versions/ is listed as old_version."""
    maps_dir = Path(maps_dir)
    if not maps_dir.is_dir():
        raise ValueError(f"{maps_dir}: not a folder")
    db = open_db(maps_dir / DB_NAME)
    records = {map_id: json.loads(text) for map_id, text in db.execute("SELECT id, record FROM maps")}
    # copies = {map id: [zip path]}, top level first, then rejected/<reason>/ by name
    copies = {}
    for path in sorted(maps_dir.glob("*.zip")) + sorted(maps_dir.glob("rejected/*/*.zip")):
        if path.is_file():
            copies.setdefault(path.stem, []).append(path)
    decisions = {}
    for map_id, paths in copies.items():
        record = records.get(map_id)
        hashes = [zip_hash(path) for path in paths]
        live = next((i for i, h in enumerate(hashes) if record and h == record["hash"]), 0)
        reason = record_reason(record, c) if record else None
        if reason is None and c.uses_zip():
            reason = zip_reason(paths[live], c)
        # the map's zip last: an old copy may hold the name it moves to
        for i in [*(i for i in range(len(paths)) if i != live), live]:
            path, why = paths[i], reason if i == live else OLD_VERSION
            dest = (old_version_path(maps_dir, map_id) if why == OLD_VERSION else
                    maps_dir / path.name if why is None else maps_dir / "rejected" / why / path.name)
            if move_rejects and dest.parent != path.parent:
                try:
                    path = move_zip(db, maps_dir, path, dest, map_id, hashes[i], why)
                except OSError as e:
                    log.warning("%s", e)
            record_zip(db, maps_dir, path, map_id, hashes[i], why)
            decisions[relative(maps_dir, path)] = why
        if record:
            db.execute("UPDATE maps SET rejected = ? WHERE id = ?", (reason, map_id))
        db.commit()
    # rows = {path: reason} of table zips; rows of zips no longer on disk are dropped, old versions added
    rows = dict(db.execute("SELECT path, reason FROM zips").fetchall())
    for rel_path in rows:
        if not (maps_dir / rel_path).is_file():
            db.execute("DELETE FROM zips WHERE path = ?", (rel_path,))
    for path in sorted(p for p in maps_dir.glob(f"{OLD_DIR}/*.zip") if p.is_file()):
        if relative(maps_dir, path) not in rows:
            record_zip(db, maps_dir, path, path.name.split(".")[0], zip_hash(path), OLD_VERSION)
        decisions[relative(maps_dir, path)] = OLD_VERSION
    db.commit()
    db.close()
    decisions = dict(sorted(decisions.items()))
    maps.write_atomic(maps_dir / "accepted.txt", "".join(f"{p}\n" for p, r in decisions.items() if r is None))
    maps.write_atomic(maps_dir / "rejected.tsv", "".join(f"{p}\t{r}\n" for p, r in decisions.items() if r))
    return decisions


# ---- zips ----

def check_zip(path, expected_hash, max_unzipped_bytes=0):
    """Raise MapFault unless path is an intact map zip (maps.verify_zip: every member read and CRC-checked within
    maps.py's limits and max_unzipped_bytes in all, 0 = maps.py's limits only) whose level hash is expected_hash."""
    try:
        found_hash = maps.verify_zip(path, max_unzipped_bytes or None)
    except maps.MapTooLarge as e:
        raise MapFault("too_large", str(e)) from None
    except ValueError as e:
        raise MapFault("bad_zip", str(e)) from None
    if found_hash != expected_hash:
        raise MapFault("hash_mismatch", f"{path}: level hash {found_hash} != version hash {expected_hash}")


def zip_hash(path):
    """The level hash of the map zip at path; None when maps.level_hash cannot read it."""
    try:
        return maps.level_hash(path)
    except ValueError:
        return None


# ---- HTTP ----

class PoliteSession(requests.Session):
    """A requests Session with a descriptive User-Agent, a default timeout, and at most one request per interval_s,
    retries and redirects included. A GET answered 429/5xx, timed out, cut short or refused is retried up to
    `retries` times; before retry n it waits the longest of the rate limit, the back-off (0 for n = 1, then
    backoff_s * 2**(n-1)) and the answer's Retry-After, the last two capped at MAX_RETRY_WAIT_S.
    faults counts each retried fault as fault:<kind> (status_<code>, timeout, truncated, connection)."""

    def __init__(self, user_agent=USER_AGENT.format(contact=""), interval_s=1.0, timeout_s=30.0, retries=5,
                 backoff_s=2.0, faults=None):
        super().__init__()
        self.headers["User-Agent"] = user_agent
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.faults = Counter() if faults is None else faults
        self.next_request_s = 0.0       # time.monotonic() before which no request starts

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self.timeout_s)
        retries = self.retries if method.upper() == "GET" else 0
        for retry in range(retries + 1):
            try:
                response = super().request(method, url, **kwargs)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                if retry == retries:
                    raise
                kind, asked_s = error_kind(e), 0.0
            else:
                if response.status_code not in RETRY_STATUS or retry == retries:
                    return response
                kind, asked_s = f"status_{response.status_code}", retry_after_s(response)
                response.close()
            self.faults[f"fault:{kind}"] += 1
            backoff_s = self.backoff_s * 2 ** retry if retry else 0.0
            wait_s = min(max(backoff_s, asked_s), MAX_RETRY_WAIT_S)
            self.next_request_s = max(self.next_request_s, time.monotonic() + wait_s)

    def send(self, request, **kwargs):
        time.sleep(max(0.0, self.next_request_s - time.monotonic()))
        self.next_request_s = time.monotonic() + self.interval_s
        return super().send(request, **kwargs)


def retry_after_s(response):
    """Seconds the answer's Retry-After asks for (a number or an HTTP date); 0 when absent or unreadable."""
    text = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(text) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return 0.0


def error_kind(e):
    """A requests exception → fault kind."""
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "truncated"
    if isinstance(e, requests.exceptions.Timeout) or "timed out" in str(e).lower():
        return "timeout"
    return "connection"


def parse_instant(text):
    """'2024-09-12T13:56:26.116390Z' / '2024-09-12' → aware UTC datetime (fractions of a second dropped)."""
    t = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S") if len(text) > 10 else datetime.strptime(text, "%Y-%m-%d")
    return t.replace(tzinfo=timezone.utc)


def uploaded_at(doc):
    """A raw MapDetail's upload instant as a datetime; None when missing or malformed."""
    try:
        return parse_instant(doc["uploaded"])
    except (KeyError, TypeError, ValueError):
        return None


# ---- download ----

class Downloader:
    def __init__(self, args):
        self.args = args
        self.criteria = criteria_from_args(args)
        self.out_dir = Path(args.out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"{self.out_dir}: not a folder")
        self.tmp_dir = self.out_dir / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.db = open_db(self.out_dir / DB_NAME)
        for leftover in self.tmp_dir.glob("*.zip"):     # partial downloads of a killed run, never renamed into place
            leftover.unlink()
        # have = {id: hash} of every stored map, accepted or rejected by the zip criteria
        self.have = dict(self.db.execute("SELECT id, hash FROM maps"))
        self.n_accepted = self.count_accepted()
        # counts = {outcome or fault: maps/events}; see run()
        self.counts = Counter()
        user_agent = USER_AGENT.format(contact=f"; +{args.contact}" if args.contact else "")
        self.session = PoliteSession(user_agent, args.request_interval_s, args.timeout_s, args.retries, args.backoff_s,
                                     faults=self.counts)

    def count_accepted(self):
        return self.db.execute("SELECT COUNT(*) FROM zips WHERE reason IS NULL").fetchone()[0]

    def done(self):
        return bool(self.args.count) and self.n_accepted >= self.args.count

    def run(self):
        """Walk the pages until --count accepted maps are stored; returns counts:
        downloaded / skipped / malformed / rejected:<criterion> (maps), failed:<kind> (maps not stored this run),
        fault:<kind> (every fault seen, retried or not), pages."""
        bar = tqdm(total=self.args.count or None, initial=self.n_accepted, unit="map", desc="accepted",
                   disable=None)
        # deferred = [MapDetail dict] whose zip failed transiently; retried after the walk, --attempts in all
        deferred = []
        for doc in self.docs():
            if self.done():
                break
            if self.take_one(doc, final_attempt=self.args.attempts <= 1) == "deferred":
                deferred.append(doc)
            self.show(bar)
        for attempt in range(2, self.args.attempts + 1):
            retry_docs, deferred = deferred, []
            for doc in retry_docs:
                if not self.done() and self.take_one(doc, final_attempt=attempt == self.args.attempts) == "deferred":
                    deferred.append(doc)
                self.show(bar)
        bar.close()
        self.db.close()
        return self.counts

    def show(self, bar):
        bar.n = self.n_accepted
        rejected = sum(n for k, n in self.counts.items() if k.startswith("rejected:"))
        failed = sum(n for k, n in self.counts.items() if k.startswith("failed:"))
        bar.set_postfix(downloaded=self.counts["downloaded"], skipped=self.counts["skipped"], rejected=rejected,
                        failed=failed)

    def docs(self):
        """Raw MapDetail dicts, newest first, paging with the API's cursor: before (/maps/latest) or to (search)."""
        before = None       # `uploaded` instant of the oldest map on the last page; None = start at the newest
        while True:
            url, params = self.page_request(before)
            try:
                response = self.session.get(url, params=params)
                if response.status_code != 200:
                    raise ValueError(f"HTTP {response.status_code}")
                # page = [MapDetail dict], newest first
                page = response.json()["docs"]
                if not isinstance(page, list):
                    raise ValueError("docs is not a list")
            except (requests.RequestException, ValueError, KeyError, TypeError) as e:
                log.error("page before=%s: %s; stopping, rerun to resume", before, e)
                self.counts["failed:page"] += 1
                return
            self.counts["pages"] += 1
            if not page:
                return
            for doc in page:
                uploaded = uploaded_at(doc)
                if self.args.since and uploaded and uploaded < self.args.since:
                    return
                yield doc
            cursor = next((d["uploaded"] for d in reversed(page) if uploaded_at(d)), None)
            if cursor is None or cursor == before:
                return
            before = cursor

    def page_request(self, before):
        """(url, query params) of the page that ends just before the instant `before`."""
        a, c = self.args, self.criteria
        if not a.search:
            params = {"pageSize": a.page_size, "sort": "FIRST_PUBLISHED", "automapper": str(c.allow_ai).lower()}
            if before:
                params["before"] = before
            if a.since:
                params["after"] = a.since.isoformat()
            return f"{a.api_url}/maps/latest", params
        # search pre-filters on the server with the criteria it shares with record_reason; the record decides
        params = {"order": "Latest", "pageSize": a.page_size}
        if c.allow_ai:
            params["automapper"] = "true"
        if c.min_score > 0:
            params["minRating"] = c.min_score
        if c.min_upvotes > 0:
            params["minUpVotes"] = c.min_upvotes
        if c.min_duration_s > 0:
            params["minDuration"] = int(c.min_duration_s)
        if c.max_duration_s > 0:
            params["maxDuration"] = math.ceil(c.max_duration_s)
        if before:
            params["to"] = before
        if a.since:
            params["from"] = a.since.isoformat()
        return f"{a.api_url}/search/text/0", params

    def take_one(self, doc, final_attempt):
        """take(doc), where bad data or a file error in this one map is logged and counted as failed:bad_data,
        failed:file_error or failed:<network fault> instead of stopping the walk."""
        try:
            return self.take(doc, final_attempt)
        except (ValueError, OSError) as e:          # OSError includes requests.RequestException
            kind = (error_kind(e) if isinstance(e, requests.RequestException) else
                    "file_error" if isinstance(e, OSError) else "bad_data")
            log.warning("map %s: %s", doc.get("id") if isinstance(doc, dict) else None, e)
            return self.count(f"failed:{kind}")

    def take(self, doc, final_attempt):
        """Store one map if it is new and passes; returns its outcome, counted, or "deferred" (try it again)."""
        try:
            record = make_record(doc)
        except ValueError as e:
            log.warning("%s", e)
            return self.count("malformed")
        map_id = record["id"]
        if self.have.get(map_id) == record["hash"]:
            return self.count("skipped")
        # copies = this map's zips at the top level and in rejected/*/: older versions, or this version renamed
        # into place by a run killed before it wrote the record
        copies = [p for p in [self.out_dir / f"{map_id}.zip", *sorted(self.out_dir.glob(f"rejected/*/{map_id}.zip"))]
                  if p.is_file()]
        reason = record_reason(record, self.criteria)
        if reason:
            if map_id in self.have:     # a stored map whose new version fails: its old zips leave the training set
                for path in copies:
                    retire_zip(self.db, self.out_dir, path, map_id)
                self.store(record, reason)
            return self.count(f"rejected:{reason}")
        live = next((p for p in copies if intact(p, record["hash"])), None)
        if live:
            for path in copies:
                if path != live:
                    retire_zip(self.db, self.out_dir, path, map_id)
            reason = None if live.parent == self.out_dir else live.parent.name
            record_zip(self.db, self.out_dir, live, map_id, record["hash"], reason)
            self.store(record, reason)
            return self.count("skipped")
        tmp_path = self.tmp_dir / f"{map_id}.zip"
        try:
            self.fetch(record["download_url"], tmp_path)
            check_zip(tmp_path, record["hash"], self.args.max_unzipped_mb * 2**20)
        except MapFault as e:
            tmp_path.unlink(missing_ok=True)
            transient = e.kind in ("truncated", "timeout", "connection", "http_429") or e.kind.startswith("http_5")
            log.warning("map %s: %s%s", map_id, e, "" if final_attempt or not transient else "; will retry")
            self.counts[f"fault:{e.kind}"] += 1
            if transient and not final_attempt:
                return "deferred"
            return self.count(f"failed:{e.kind}")
        reason = zip_reason(tmp_path, self.criteria) if self.criteria.uses_zip() else None
        for path in copies:
            retire_zip(self.db, self.out_dir, path, map_id)
        dest = self.out_dir / ("" if reason is None else f"rejected/{reason}") / f"{map_id}.zip"
        move_zip(self.db, self.out_dir, tmp_path, dest, map_id, record["hash"], reason)
        self.store(record, reason)
        return self.count("downloaded" if reason is None else f"rejected:{reason}")

    def count(self, outcome):
        self.counts[outcome] += 1
        return outcome

    def fetch(self, url, tmp_path):
        """Stream url into tmp_path (fsynced); MapFault on HTTP errors, size limits, broken transfers."""
        max_bytes = self.args.max_zip_mb * 2**20
        try:
            with self.session.get(url, stream=True) as response:
                if response.status_code != 200:
                    raise MapFault(f"http_{response.status_code}", f"HTTP {response.status_code} for {url}")
                declared_bytes = int(response.headers.get("Content-Length") or 0)
                if max_bytes and declared_bytes > max_bytes:
                    raise MapFault("too_large", f"{declared_bytes} bytes (limit {max_bytes})")
                received_bytes = 0      # zip bytes written so far; urllib3 raises if fewer than Content-Length come
                with open(tmp_path, "wb") as f:
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        received_bytes += len(chunk)
                        if max_bytes and received_bytes > max_bytes:
                            raise MapFault("too_large", f"more than {max_bytes} bytes")
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
        except requests.RequestException as e:
            raise MapFault(error_kind(e), f"{type(e).__name__}: {e}") from None

    def store(self, record, reason):
        """Write the map's record (committed), after its zip is in place with its zips row."""
        self.db.execute("INSERT OR REPLACE INTO maps VALUES (?, ?, ?, ?, ?)",
                        (record["id"], record["hash"], record["uploaded"], reason, json.dumps(record)))
        self.db.commit()
        self.have[record["id"]] = record["hash"]
        self.n_accepted = self.count_accepted()


def intact(path, map_hash):
    """Whether check_zip passes the zip at path as version map_hash."""
    try:
        check_zip(path, map_hash)
        return True
    except MapFault:
        return False


def download(args):
    """Run a download described by parsed CLI args; returns the counts (see Downloader.run)."""
    return Downloader(args).run()


# ---- CLI ----

def number(low, high=math.inf, kind=float):
    """An argparse type: a finite `kind` from low to high; anything else is a usage error."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and low <= value <= high):
            span = f"at least {low}" if high == math.inf else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {span}, not {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_criteria_args(p):
    d = Criteria()
    p.add_argument("--allow_ai", action="store_true",
                   help="keep maps flagged automapper or with declaredAi other than None (default: dropped)")
    p.add_argument("--min_score", type=number(0, 1), default=d.min_score,
                   help=f"minimum BeatSaver rating score, 0..1 (default {d.min_score}); 0 turns it off")
    p.add_argument("--min_upvotes", type=number(0, kind=int), default=d.min_upvotes,
                   help=f"minimum upvotes (default {d.min_upvotes}); 0 turns it off")
    p.add_argument("--characteristic", default=d.characteristic,
                   help=f"characteristic of the wanted difficulties (default {d.characteristic}); '' = any")
    p.add_argument("--difficulties", default=",".join(d.difficulties),
                   help=f"comma list, a map needs at least one (default {','.join(d.difficulties)}); '' = any")
    p.add_argument("--allow_mods", action="store_true",
                   help=f"keep wanted difficulties needing any of {', '.join(maps.UNSUPPORTED_REQUIREMENTS)} "
                        "(default: dropped)")
    p.add_argument("--allow_bpm_changes", action="store_true",
                   help="keep maps whose wanted difficulties change BPM (default: dropped; needs the zip)")
    p.add_argument("--allow_song_offset", action="store_true",
                   help="keep maps with a non-zero Info _songTimeOffset (default: dropped; needs the zip)")
    p.add_argument("--min_duration_s", type=number(0), default=d.min_duration_s,
                   help=f"minimum song length in seconds (default {d.min_duration_s:g}); 0 turns it off")
    p.add_argument("--max_duration_s", type=number(0), default=d.max_duration_s,
                   help=f"maximum song length in seconds (default {d.max_duration_s:g}); 0 turns it off")
    p.add_argument("--min_nps", type=number(0), default=d.min_nps,
                   help=f"minimum notes/s of every wanted difficulty (default {d.min_nps:g}); 0 turns it off")
    p.add_argument("--max_nps", type=number(0), default=d.max_nps,
                   help=f"maximum notes/s of every wanted difficulty (default {d.max_nps:g}); 0 turns it off")
    p.add_argument("--max_parity_errors", type=number(-1, kind=int), default=d.max_parity_errors,
                   help=f"most BeatSaver parity errors in any wanted difficulty (default {d.max_parity_errors}); "
                        "-1 turns it off")


def criteria_from_args(args):
    return Criteria(allow_ai=args.allow_ai, min_score=args.min_score, min_upvotes=args.min_upvotes,
                    characteristic=args.characteristic,
                    difficulties=tuple(x.strip() for x in args.difficulties.split(",") if x.strip()),
                    allow_mods=args.allow_mods, allow_bpm_changes=args.allow_bpm_changes,
                    allow_song_offset=args.allow_song_offset, min_duration_s=args.min_duration_s,
                    max_duration_s=args.max_duration_s, min_nps=args.min_nps, max_nps=args.max_nps,
                    max_parity_errors=args.max_parity_errors)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("download", help="download new maps that pass the criteria into OUT_DIR")
    p.add_argument("out_dir", help="folder for <id>.zip files, rejected/, old_versions/ and maps.sqlite "
                                    "(created if missing)")
    p.add_argument("--count", type=number(0, kind=int), default=100,
                   help="stop once OUT_DIR holds this many accepted maps, earlier runs included (default 100); "
                        "0 = no limit")
    p.add_argument("--since", type=parse_instant, default=None,
                   help="only maps uploaded at or after this date, YYYY-MM-DD or ISO instant (default: all)")
    p.add_argument("--api_url", default=API_URL, help=f"BeatSaver API root (default {API_URL})")
    p.add_argument("--search", action="store_true",
                   help="page /search/text and send rating, upvote, duration and AI criteria to the server "
                        "(default: page /maps/latest)")
    p.add_argument("--page_size", type=number(1, 100, int), default=100, help="maps per page, 1..100 (default 100)")
    p.add_argument("--contact", default="", help="email or URL added to the User-Agent (default: none)")
    p.add_argument("--request_interval_s", type=number(0), default=1.0,
                   help="minimum seconds between the starts of two requests, retries included (default 1.0); "
                        "0 = no rate limit")
    p.add_argument("--timeout_s", type=number(0.01), default=30.0,
                   help="connect/read timeout per request in seconds, at least 0.01 (default 30)")
    p.add_argument("--retries", type=number(0, kind=int), default=5,
                   help="HTTP retries per request on 429/5xx, timeouts and dropped connections (default 5); "
                        "0 = none. Each waits the longest of --request_interval_s, the back-off and Retry-After")
    p.add_argument("--backoff_s", type=number(0), default=2.0,
                   help="back-off factor: retries wait 0, 2x, 4x, ... this many seconds, and Retry-After, each at "
                        f"most {MAX_RETRY_WAIT_S:g} s (default 2); 0 = only Retry-After and the rate limit")
    p.add_argument("--attempts", type=number(1, kind=int), default=3,
                   help="tries per zip in one run; truncated/timed-out downloads are retried after the page walk "
                        "(default 3); 1 = no second try")
    p.add_argument("--max_zip_mb", type=number(0), default=50,
                   help="largest zip to download in MiB (default 50); 0 = no limit")
    p.add_argument("--max_unzipped_mb", type=number(0), default=200,
                   help="largest total unzipped size in MiB (default 200); 0 = no limit")
    add_criteria_args(p)

    p = commands.add_parser("filter", help="decide the zips already in a folder; write accepted.txt")
    p.add_argument("maps_dir", help="folder of map zips (a download OUT_DIR, or any folder of zips)")
    p.add_argument("--move_rejects", action="store_true",
                   help="move rejected zips to MAPS_DIR/rejected/<reason>/, accepted ones back to MAPS_DIR and "
                        "second copies of a map to MAPS_DIR/old_versions/, never onto an existing file "
                        "(default: only write accepted.txt, rejected.tsv and maps.sqlite's zips table)")
    add_criteria_args(p)
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def print_counts(title, counts):
    print(f"{title:<34}{'maps':>8}")
    for key, n in counts.items():
        print(f"{key:<34}{n:>8}")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    if args.command == "download":
        counts = download(args)
        print_counts("outcome", dict(sorted(counts.items())))
        return 1 if counts["failed:page"] else 0
    decisions = filter_folder(args.maps_dir, criteria_from_args(args), args.move_rejects)
    # removed = {criterion: maps it removed}, every criterion listed, in checking order
    removed = Counter(r for r in decisions.values() if r)
    table = {reason: removed[reason] for reason in (*REASONS, OLD_VERSION)}
    table["accepted"] = sum(r is None for r in decisions.values())
    table["total"] = len(decisions)
    print_counts("criterion", table)
    print(f"wrote {Path(args.maps_dir) / 'accepted.txt'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        sys.exit(f"error: {e}")
