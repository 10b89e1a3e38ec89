"""Benchmark: difficulty files parsed per second by maps.read_map on one CPU core, over the shared fixture maps.

    .venv/bin/python tests/bench_maps.py [--seconds 5]

Each real fixture map (not BeatSaver's validator cases) is zipped into a temporary folder once; then read_map runs over
all zips, round after round, until --seconds have passed. Target: at least 100 difficulty files per second.
"""

import argparse
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from maps import read_map  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "maps"


def fixture_zips(out_dir) -> list[Path]:
    """Zip every real fixture map folder into out_dir → [zip path, ...]."""
    folders = sorted({path.parent for path in FIXTURES.rglob("*") if path.name.lower() == "info.dat"})
    zips = []
    for i, folder in enumerate(f for f in folders if "beatsaver-common-mp" not in str(f)):
        zip_path = Path(out_dir) / f"{i}.zip"
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in folder.iterdir():
                if path.is_file():
                    archive.write(path, path.name)
        zips.append(zip_path)
    return zips


def main(args):
    if not FIXTURES.is_dir():
        sys.exit(f"shared fixtures not found at {FIXTURES}")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with tempfile.TemporaryDirectory() as out_dir:
        zips = fixture_zips(out_dir)
        dat_bytes = sum(info.file_size for path in zips for info in zipfile.ZipFile(path).infolist())
        files, rounds = 0, 0
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        while time.perf_counter() - start_s < args.seconds:
            files += sum(len(read_map(path).difficulties) for path in zips)
            rounds += 1
        wall_s, cpu_s = time.perf_counter() - start_s, time.process_time() - start_cpu_s
    print(f"{len(zips)} map zips ({dat_bytes / 2**20:.1f} MiB of JSON), {rounds} rounds, {files} difficulty files, "
          f"one core: {wall_s:.1f} s wall, {cpu_s:.1f} s CPU")
    print(f"{files / cpu_s:.0f} difficulty files per CPU second ({files / wall_s:.0f}/s wall; the gap is other "
          f"processes sharing the core), target ≥ 100")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to keep reading (default 5)")
    main(parser.parse_args())
