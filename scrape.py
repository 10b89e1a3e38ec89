"""Build a training set from BeatSaver: download map zips with their metadata, and filter them.

    python scrape.py download maps/ --count 500                      # newest 500 maps that pass the filters
    python scrape.py download maps/ --count 5000 --since 2022-01-01 --contact you@example.com
    python scrape.py download maps/ --count 500 --search             # let /search/text pre-filter on the server
    python scrape.py filter maps/                                    # print the table, write maps/accepted.txt
    python scrape.py filter maps/ --allow_bpm_changes --move_rejects # re-decide, move rejects to maps/rejected/<reason>/
    python scrape.py download --help

OUT_DIR after a download:
    <id>.zip                    accepted maps (what ZippedBeatSaberDataset reads)
    rejected/<reason>/<id>.zip  maps the zip criteria rejected (kept, never deleted)
    maps.sqlite                 one metadata record per stored map (table `maps`, see make_record)
    .tmp/                       downloads in flight; emptied at the start of every run
A run stops once OUT_DIR holds --count accepted maps, so rerunning the same command resumes a killed run.
"""
import argparse
import json
import logging
import math
import os
import re
import sqlite3
import sys
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError
from urllib3.util.retry import Retry

import maps

log = logging.getLogger("scrape")

API_URL = "https://api.beatsaver.com"
USER_AGENT = "beatgen-scrape/0.1.0 (Beat Saber map dataset builder{contact})"
DB_NAME = "maps.sqlite"
DB_FORMAT = 1                   # bumped when the `maps` table or the record layout changes
RETRY_STATUS = (429, 500, 502, 503, 504)
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
    """The metadata store: table maps(id, hash, uploaded, rejected = zip criterion or NULL, record = JSON)."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("CREATE TABLE IF NOT EXISTS maps (id TEXT PRIMARY KEY, hash TEXT NOT NULL, uploaded TEXT, "
               "rejected TEXT, record TEXT NOT NULL)")
    db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(DB_FORMAT),))
    db.commit()
    found = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0]
    if found != str(DB_FORMAT):
        raise ValueError(f"{path}: metadata format {found}, this scrape.py writes {DB_FORMAT}; use a new OUT_DIR")
    return db


def load_records(maps_dir):
    """{id: record} from maps_dir's metadata store; {} when the folder has none."""
    path = Path(maps_dir) / DB_NAME
    if not path.exists():
        return {}
    db = open_db(path)
    records = {map_id: json.loads(text) for map_id, text in db.execute("SELECT id, record FROM maps")}
    db.close()
    return records


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
    """Decide every zip in maps_dir and maps_dir/rejected/*/; writes accepted.txt and rejected.tsv.

    Returns {zip path relative to maps_dir: first failed criterion or None}. Metadata criteria apply where
    maps.sqlite has the map's record (by file stem = map id); zip criteria apply to every zip."""
    maps_dir = Path(maps_dir)
    records = load_records(maps_dir)
    decisions = {}
    for path in sorted(maps_dir.glob("*.zip")) + sorted(maps_dir.glob("rejected/*/*.zip")):
        record = records.get(path.stem)
        reason = record_reason(record, c) if record else None
        if reason is None and c.uses_zip():
            reason = zip_reason(path, c)
        if move_rejects:
            dest = maps_dir / path.name if reason is None else maps_dir / "rejected" / reason / path.name
            if dest != path:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
                path = dest
        decisions[path.relative_to(maps_dir).as_posix()] = reason
    write_atomic(maps_dir / "accepted.txt", "".join(f"{p}\n" for p, r in decisions.items() if r is None))
    write_atomic(maps_dir / "rejected.tsv", "".join(f"{p}\t{r}\n" for p, r in decisions.items() if r))
    return decisions


def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- zips ----

def check_zip(path, expected_hash, max_unzipped_bytes=0):
    """Raise MapFault unless path is an intact zip whose level hash is expected_hash."""
    try:
        with zipfile.ZipFile(path) as zf:
            unzipped_bytes = sum(i.file_size for i in zf.infolist())
            if max_unzipped_bytes and unzipped_bytes > max_unzipped_bytes:
                raise MapFault("too_large", f"unzips to {unzipped_bytes} bytes (limit {max_unzipped_bytes})")
            bad_member = zf.testzip()
            if bad_member:
                raise MapFault("bad_zip", f"CRC error in {bad_member}")
        found_hash = maps.level_hash(path)
    except MapFault:
        raise
    except (zipfile.BadZipFile, ValueError, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        raise MapFault("bad_zip", f"not a valid map zip ({type(e).__name__}: {e})") from None
    if found_hash != expected_hash:
        raise MapFault("hash_mismatch", f"level hash {found_hash} != version hash {expected_hash}")


# ---- HTTP ----

class PoliteSession(requests.Session):
    """A requests Session with a descriptive User-Agent, at most one request per interval_s, a default timeout,
    and urllib3 Retry: exponential back-off on 429/5xx and timeouts, honouring Retry-After."""

    def __init__(self, user_agent=USER_AGENT.format(contact=""), interval_s=1.0, timeout_s=30.0, retries=5, backoff_s=2.0):
        super().__init__()
        self.headers["User-Agent"] = user_agent
        retry = Retry(total=retries, backoff_factor=backoff_s, status_forcelist=RETRY_STATUS,
                      allowed_methods=("GET",), respect_retry_after_header=True, raise_on_status=False)
        self.mount("http://", HTTPAdapter(max_retries=retry))
        self.mount("https://", HTTPAdapter(max_retries=retry))
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.next_request_s = 0.0       # time.monotonic() before which no new request starts

    def request(self, method, url, **kwargs):
        time.sleep(max(0.0, self.next_request_s - time.monotonic()))
        self.next_request_s = time.monotonic() + self.interval_s
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(method, url, **kwargs)


def error_kind(e):
    """A requests exception → fault kind."""
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "truncated"
    if isinstance(e, requests.exceptions.Timeout) or "timed out" in str(e).lower():
        return "timeout"
    return "connection"


def count_retries(response, counts):
    """Add the faults urllib3 retried before this response (429, 5xx, timeouts) to counts as fault:<kind>."""
    retries = getattr(response.raw, "retries", None)
    for attempt in retries.history if retries else ():
        if attempt.status:
            counts[f"fault:status_{attempt.status}"] += 1
        elif isinstance(attempt.error, (ReadTimeoutError, ConnectTimeoutError)):
            counts["fault:timeout"] += 1
        else:
            counts["fault:connection"] += 1


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
        self.tmp_dir = self.out_dir / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():     # partial downloads of a killed run, never renamed into place
            leftover.unlink()
        self.db = open_db(self.out_dir / DB_NAME)
        # have = {id: hash} of every stored map, accepted or rejected by the zip criteria
        self.have = dict(self.db.execute("SELECT id, hash FROM maps"))
        self.n_accepted = self.db.execute("SELECT COUNT(*) FROM maps WHERE rejected IS NULL").fetchone()[0]
        user_agent = USER_AGENT.format(contact=f"; +{args.contact}" if args.contact else "")
        self.session = PoliteSession(user_agent, args.request_interval_s, args.timeout_s, args.retries, args.backoff_s)
        # counts = {outcome or fault: maps/events}; see run()
        self.counts = Counter()

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
            if self.take(doc, final_attempt=self.args.attempts <= 1) == "deferred":
                deferred.append(doc)
            self.show(bar)
        for attempt in range(2, self.args.attempts + 1):
            retry_docs, deferred = deferred, []
            for doc in retry_docs:
                if not self.done() and self.take(doc, final_attempt=attempt == self.args.attempts) == "deferred":
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
                count_retries(response, self.counts)
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
        reason = record_reason(record, self.criteria)
        if reason:
            return self.count(f"rejected:{reason}")
        final_path = self.out_dir / f"{map_id}.zip"
        if final_path.exists():         # renamed into place by a run killed before it wrote the record
            try:
                check_zip(final_path, record["hash"])
                self.store(record, None)
                return self.count("skipped")
            except MapFault:
                pass
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
        dest = final_path if reason is None else self.out_dir / "rejected" / reason / f"{map_id}.zip"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, dest)
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
                count_retries(response, self.counts)
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

    def store(self, record, rejected):
        """Write the record (one committed transaction), after its zip is in place."""
        self.db.execute("INSERT OR REPLACE INTO maps VALUES (?, ?, ?, ?, ?)",
                        (record["id"], record["hash"], record["uploaded"], rejected, json.dumps(record)))
        self.db.commit()
        self.have[record["id"]] = record["hash"]
        self.n_accepted += rejected is None


def download(args):
    """Run a download described by parsed CLI args; returns the counts (see Downloader.run)."""
    return Downloader(args).run()


# ---- CLI ----

def add_criteria_args(p):
    d = Criteria()
    p.add_argument("--allow_ai", action="store_true",
                   help="keep maps flagged automapper or with declaredAi other than None (default: dropped)")
    p.add_argument("--min_score", type=float, default=d.min_score,
                   help=f"minimum BeatSaver rating score, 0..1 (default {d.min_score}); 0 turns it off")
    p.add_argument("--min_upvotes", type=int, default=d.min_upvotes,
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
    p.add_argument("--min_duration_s", type=float, default=d.min_duration_s,
                   help=f"minimum song length in seconds (default {d.min_duration_s:g}); 0 turns it off")
    p.add_argument("--max_duration_s", type=float, default=d.max_duration_s,
                   help=f"maximum song length in seconds (default {d.max_duration_s:g}); 0 turns it off")
    p.add_argument("--min_nps", type=float, default=d.min_nps,
                   help=f"minimum notes/s of every wanted difficulty (default {d.min_nps:g}); 0 turns it off")
    p.add_argument("--max_nps", type=float, default=d.max_nps,
                   help=f"maximum notes/s of every wanted difficulty (default {d.max_nps:g}); 0 turns it off")
    p.add_argument("--max_parity_errors", type=int, default=d.max_parity_errors,
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
    p.add_argument("out_dir", help="folder for <id>.zip files, rejected/, and maps.sqlite (created if missing)")
    p.add_argument("--count", type=int, default=100,
                   help="stop once OUT_DIR holds this many accepted maps, earlier runs included (default 100); "
                        "0 = no limit")
    p.add_argument("--since", type=parse_instant, default=None,
                   help="only maps uploaded at or after this date, YYYY-MM-DD or ISO instant (default: all)")
    p.add_argument("--api_url", default=API_URL, help=f"BeatSaver API root (default {API_URL})")
    p.add_argument("--search", action="store_true",
                   help="page /search/text and send rating, upvote, duration and AI criteria to the server "
                        "(default: page /maps/latest)")
    p.add_argument("--page_size", type=int, default=100, help="maps per page, 1..100 (default 100)")
    p.add_argument("--contact", default="", help="email or URL added to the User-Agent (default: none)")
    p.add_argument("--request_interval_s", type=float, default=1.0,
                   help="minimum seconds between requests (default 1.0); 0 = no rate limit")
    p.add_argument("--timeout_s", type=float, default=30.0, help="connect/read timeout per request (default 30)")
    p.add_argument("--retries", type=int, default=5,
                   help="HTTP retries per request on 429/5xx/timeouts, exponential back-off honouring "
                        "Retry-After (default 5); 0 = none")
    p.add_argument("--backoff_s", type=float, default=2.0,
                   help="back-off factor: waits 0, 2x, 4x, ... this many seconds between retries (default 2)")
    p.add_argument("--attempts", type=int, default=3,
                   help="tries per zip in one run; truncated/timed-out downloads are retried after the page walk "
                        "(default 3); 1 = no second try")
    p.add_argument("--max_zip_mb", type=float, default=50,
                   help="largest zip to download in MiB (default 50); 0 = no limit")
    p.add_argument("--max_unzipped_mb", type=float, default=200,
                   help="largest total unzipped size in MiB (default 200); 0 = no limit")
    add_criteria_args(p)

    p = commands.add_parser("filter", help="decide the zips already in a folder; write accepted.txt")
    p.add_argument("maps_dir", help="folder of map zips (a download OUT_DIR, or any folder of zips)")
    p.add_argument("--move_rejects", action="store_true",
                   help="move rejected zips to MAPS_DIR/rejected/<reason>/ and accepted ones back to MAPS_DIR "
                        "(default: only write accepted.txt and rejected.tsv)")
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
    table = {reason: removed[reason] for reason in REASONS}
    table["accepted"] = sum(r is None for r in decisions.values())
    table["total"] = len(decisions)
    print_counts("criterion", table)
    print(f"wrote {Path(args.maps_dir) / 'accepted.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
