"""Generate a Beat Saber map for a song with a model trained by train.py.

    python infer.py runs/first song.mp3                         # tempo estimated → song_beatgen.zip
    python infer.py runs/first song.ogg --bpm 137.5 --output ExpertPlusStandard.dat
    python infer.py runs/first "https://youtu.be/…" --preview    # download with yt-dlp, plus a PNG and a click track
    python infer.py runs/first song.egg --bpm 120 --reference human_map.zip   # print a score card against a human map
    python infer.py runs/first --base mymap.zip --regenerate 30-60             # redo 30–60 s of a map, keep the rest
    python infer.py runs/first --serve                          # the web page

Per song: decode → tempo (unless --bpm) → Encodec codes → one prompt per (difficulty, chunk) → generate calls of as
many rows as fit, masked by a grammar (and the play constraint) → (tick, note type) per chunk → notes → map files.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import utils
from audio import create_audio_tokenizer, load_audio, load_failure
from maps import Note, read_map, write_atomic

# ---- device and model ----

def load_model(model_dir, device):
    """The causal LM train.py saved in model_dir, on device, in utils.model_dtype(device); ValueError if it cannot load."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    device = torch.device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=utils.model_dtype(device))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        raise load_failure("the model", model_dir, e, "MODEL_DIR") from None
    return model.to(device).eval()


# ---- generation ----

@dataclass
class Options:
    """How maps are generated: the command line's and the web page's choices."""
    difficulties: tuple = ("ExpertPlus",)
    sampling: data.Sampling = field(default_factory=data.Sampling)
    constrained: bool = True        # playable by construction (utils.PlayState); False: the token grammar alone
    easier: str = "thin"            # maps easier than ExpertPlus: "thin" its notes, or "generate" each under its rules
    snap: bool = False              # utils.snap_notes on the result
    lights: bool = True             # a light show (else the stage simply lit)
    preview: bool = False           # also a PNG and a click track of the hardest difficulty
    batch_size: int = 0             # rows per generate call; 0: all on a CPU, what the free memory holds on a GPU
    max_seq_length: int = 32767     # the model's (beatgen.json)


def generate_map(model, audio_tokenizer, song, options=Options(), kept=None):
    """Song → {difficulty: [Note, ...]} for options.difficulties, sorted, without duplicates, inside the song.

    Every (difficulty, chunk) is one row of the generate calls. Constrained, each row carries a utils.PlayState for
    its difficulty (playable by construction, seams included: spec.md). kept = {difficulty: utils.KeptNotes}:
    regenerate only the range kept.span_s of those maps — the chunks that cover it, cut to it — and keep every other
    note; the rows at its edges start and end as the kept notes need. A fresh map's difficulties easier than
    ExpertPlus are thinned from it (options.easier "thin") or generated under their own rules ("generate").
    """
    thin = options.constrained and options.easier == "thin" and kept is None
    generated = ["ExpertPlus"] if thin else list(options.difficulties)
    span_s = next(iter(kept.values())).span_s if kept else (0.0, song.duration_s)
    ticks = data.chunk_ticks(song, span_s)
    prompts = {k: data.prompt_tokens(data.chunk_codes(song.codes, *song.plan[k][2:], audio_tokenizer.silence))
               for k in ticks}
    max_new_tokens = data.generation_budget(song, len(next(iter(prompts.values()))), options.max_seq_length)
    # rows = [(difficulty, chunk index), ...]
    rows = [(difficulty, k) for difficulty in generated for k in ticks]
    onsets_s = utils.audio_onsets(song.audio, song.sample_rate) if options.constrained else None
    states = [play_state(song, k, ticks[k], utils.DIFFICULTIES[difficulty], onsets_s, (kept or {}).get(difficulty))
              for difficulty, k in rows] if options.constrained else None
    chunks = data.generate_rows(model, [prompts[k] for _, k in rows], [ticks[k][1] for _, k in rows], max_new_tokens,
                                options.sampling, options.batch_size, states, utils.compile_problem())
    # notes = {difficulty: {Note, ...}}: the kept notes outside the range, then the generated ones
    notes = {difficulty: set(kept[difficulty].before + kept[difficulty].after) if kept else set()
             for difficulty in generated}
    for (difficulty, k), chunk in zip(rows, chunks):
        notes[difficulty].update(Note(*note) for note in data.chunk_note_beats(song, k, chunk, ticks[k][0]))
    notes = {difficulty: sorted(chunk_notes) for difficulty, chunk_notes in notes.items()}
    if thin:
        strength = utils.onset_strength(song.audio, song.sample_rate)
        for difficulty in options.difficulties:
            if difficulty not in notes:
                notes[difficulty] = utils.thin_notes(notes["ExpertPlus"], song.bpm, utils.DIFFICULTIES[difficulty],
                                                     onsets_s, strength)
    return {difficulty: notes[difficulty] for difficulty in options.difficulties}


def play_state(song, k, ticks, rules, onsets_s, kept=None):
    """The utils.PlayState of chunk k of song for a difficulty's rules, over its ticks = (first, last) in seconds;
    its edges as utils.segment_edges says (kept: the utils.KeptNotes around a regenerated range)."""
    start_s, end_s = song.start_s(k), song.plan[k][1] * 60 / song.bpm
    times_s = start_s + np.arange(ticks[1] + 1) * 60 / song.bpm / data.PPQ
    start, end = utils.segment_edges(rules, start_s, end_s, song.duration_s, kept)
    return utils.PlayState(rules, times_s, data.NOTE_TYPE_FIELDS, onsets_s, start, end, ticks[0])


# ---- one song ----

@dataclass
class MapResult:
    written: str                # the map written (zip, folder or .dat)
    bpm: float
    lead_in_s: float            # silence put before the song (beat 0 = lead_in_s into song.egg)
    notes: dict                 # {difficulty: [Note, ...]} as written
    lines: list                 # what to tell the user: tempo, the file, one score line per difficulty, timings
    preview_png: str = None     # with preview: the picture and the click track of the hardest difficulty
    clicks: str = None


class Mapper:
    """A model written by train.py, loaded once (on first use), mapping songs: the command line and the web page use
    the same object. ValueError for a folder that is not such a model, or a device this machine lacks."""

    def __init__(self, model_dir, device=None, audio_model=None, chunk_duration=None, chunk_beats=None):
        self.model_dir = model_dir
        self.device = utils.pick_device(device)
        self.metadata = data.load_metadata(model_dir)
        self.audio_model = audio_model or self.metadata["audio_model"]
        # chunks as trained unless overridden: chunk_beats whole beats, or as many as fit in chunk_duration seconds
        if chunk_beats or chunk_duration:
            self.chunk_beats, self.chunk_duration = chunk_beats, chunk_duration
        else:
            self.chunk_beats, self.chunk_duration = self.metadata.get("chunk_beats"), self.metadata.get("chunk_duration")
        self.model = self.audio_tokenizer = None

    def identity(self):
        """The model folder and its weights' time stamp: what an evaluation's cached results were made with."""
        weights = Path(self.model_dir) / "model.safetensors"
        return f"{Path(self.model_dir).resolve()}|{weights.stat().st_mtime_ns if weights.exists() else 0}"

    def load(self):
        if self.model is None:
            self.model = load_model(self.model_dir, self.device)
            self.audio_tokenizer = create_audio_tokenizer(self.metadata["bandwidth"], self.audio_model, self.device)
        return self

    def map_song(self, song_path, output, options=Options(), bpm=None, base=None, span_s=None) -> MapResult:
        """Map the song file at song_path into output (.zip, .dat or a new folder) → MapResult.

        bpm None: estimated (and the song gets a lead-in so beat 0 falls on a beat). base (a map zip or folder) and
        span_s = (start_s, end_s): regenerate only that range of base's difficulties, keep everything else of base,
        write base's files with those notes replaced (the tempo is base's; no lead-in)."""
        times, lines, lead_in_s = utils.StageTimes(), [], 0.0
        options = replace(options, max_seq_length=self.metadata["max_seq_length"])
        with times("decode"):
            # audio = (samples,) float32 at the model's rate, as the song file starts
            audio = load_audio(song_path, self.metadata["sample_rate"])
        if base is not None and options.snap:
            raise ValueError("--snap would move the notes kept from --base; leave it out")
        base_map, kept = utils.KeptNotes.read(base, options.difficulties, bpm, span_s) if base else (None, None)
        if base_map is not None:
            bpm = base_map.bpm
        elif bpm is None:
            with times("tempo"):
                estimate = utils.estimate_beat(audio, self.metadata["sample_rate"])
            bpm, lead_in_s = estimate.bpm, utils.lead_in_for_beat(estimate.bpm, estimate.first_beat_s)
            lines.append(f"estimated tempo {bpm:.2f} BPM, first beat at {estimate.first_beat_s:.3f} s")
            lines += [estimate.warning()] if estimate.warning() else []
            if options.sampling.progress:
                print(lines[0])
        if not 10 <= bpm <= 1000:
            raise ValueError(f"BPM {bpm} outside 10..1000")
        self.load()
        # padded = (samples,) the song after lead_in_s of silence: beat 0 of the map = its sample 0
        padded = np.concatenate([np.zeros(round(lead_in_s * self.metadata["sample_rate"]), np.float32), audio])
        with times("Encodec"):
            song = data.encode_song(padded, bpm, self.audio_tokenizer, self.chunk_duration, self.chunk_beats)
        with times("generation"):
            notes = generate_map(self.model, self.audio_tokenizer, song, options, kept)
        notes = {name: utils.snap_notes(chunk) for name, chunk in notes.items()} if options.snap else notes
        if not any(notes.values()):
            raise ValueError(f"{song_path}: no notes were generated for {song.duration_s:.2f} s of audio at {bpm:g} "
                             "BPM (too short, or silent); nothing written")
        with times("writing"):
            result = write_result(output, song_path, song, notes, options, (base_map, span_s, lead_in_s))
        result.lines[:0] = lines[1:]        # the tempo warning, if any, with the result
        result.lines.append(times.line(self.device))
        return result


def write_result(output, song_path, song, notes, options, regeneration) -> MapResult:
    """Write the notes = {difficulty: [Note, ...]} of song as a map (regeneration = (base map, span_s, lead-in s):
    base map None for a fresh map) → MapResult with the lines to show."""
    base_map, span_s, lead_in_s = regeneration
    result = MapResult(None, song.bpm, lead_in_s, notes, [])
    if base_map is not None:
        result.written = utils.write_regenerated(output, base_map, notes, span_s)
        what = f"{', '.join(notes)} of {base_map.source}, {span_s[0]:g}–{span_s[1]:g} s regenerated"
    else:
        show = {name: utils.light_show(chunk, song.bpm, song.audio, song.sample_rate)
                for name, chunk in notes.items()} if options.lights else None
        result.written = utils.write_map(output, notes, song.bpm, song_path, lead_in_s=lead_in_s, lights=show)
        what = f"{', '.join(notes)} over {song.duration_s:.1f} s at {song.bpm:g} BPM"
    result.lines = [f"wrote {result.written}: {what}"] + [f"  {name}: {utils.score_line(chunk, song.bpm)}"
                                                           for name, chunk in notes.items()]
    if options.preview and base_map is None:
        hardest = max(notes, key=lambda name: utils.DIFFICULTIES[name].rank)
        stem = os.path.splitext(result.written)[0]
        result.preview_png, result.clicks = stem + "_preview.png", stem + "_clicks.wav"
        utils.write_preview(notes[hardest], song.bpm, song_path, result.preview_png, result.clicks, lead_in_s)
        result.lines.append(f"preview ({hardest}): {result.preview_png}, {result.clicks}")
    return result


# ---- evaluation on held-out songs ----

def evaluate(mapper, source, out_dir, options=Options(), max_songs=None, as_json=False):
    """Map every song of source (a folder of maps, or train.py's held-out list) at its map's BPM and the Standard
    difficulties its human map has, and score each against that map (utils.score_card) → utils.evaluation_summary.
    Prints the table (as_json: the summary as JSON), writes evaluation.json and evaluation.png into out_dir. Per
    song results stay in out_dir/songs (a rerun maps only the songs not yet done with this model); a song that
    fails is one line and a count."""
    paths = utils.evaluation_maps(source)[:max_songs]
    songs_dir = Path(out_dir) / "songs"
    songs_dir.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    for path in tqdm(paths, desc="evaluating", unit="song", disable=not options.sampling.progress):
        cached = songs_dir / f"{Path(path).stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}.json"
        previous = json.loads(cached.read_text()) if cached.is_file() else None
        if previous and previous["model"] == mapper.identity():
            results.append(previous)
            continue
        try:
            results.append(score_song(mapper, path, cached.with_suffix(""), options))
        except ValueError as error:
            failed += 1
            print(f"{path}: not evaluated: {error}")
            continue
        write_atomic(cached, json.dumps(results[-1]))
    return utils.write_evaluation(results, failed, out_dir, as_json)


def score_song(mapper, path, stem, options):
    """One human map (zip or folder) → {"map", "model", "bpm", "cards": {difficulty: score card}}: its song mapped
    at the map's BPM into stem + ".zip", at the Standard difficulties the map has with notes and one tempo."""
    beatmap = read_map(path)
    human = utils.human_difficulties(beatmap)
    song = Path(f"{stem}.egg")
    song.write_bytes(beatmap.read_audio())
    try:
        difficulties = tuple(sorted(human, key=lambda name: utils.DIFFICULTIES[name].rank))
        result = mapper.map_song(str(song), f"{stem}.zip", replace(options, difficulties=difficulties), beatmap.bpm)
    finally:
        song.unlink()
    cards = {name: utils.score_card(result.notes[name], human[name], beatmap.bpm, beatmap.bpm) for name in human}
    return {"map": str(path), "model": mapper.identity(), "bpm": beatmap.bpm, "cards": cards}


# ---- the command line ----

def main(args):
    if args.seed is not None:
        torch.manual_seed(args.seed)
    mapper = Mapper(args.model_dir, args.device, args.audio_model, args.chunk_duration, args.chunk_beats)
    if args.serve:
        mapper.load()
        return utils.serve(lambda song, output, difficulties, temperature, bpm, base, span_s: mapper.map_song(
            song, output, Options(difficulties, data.Sampling(temperature), preview=base is None), bpm, base, span_s),
            args.host, args.port)
    if args.evaluate:
        options = Options(sampling=data.Sampling(args.temperature, args.top_p, args.min_p),
                          constrained=not args.unconstrained, easier=args.easier, batch_size=args.batch_size)
        return evaluate(mapper, args.evaluate, args.output or os.path.join(args.model_dir, "evaluation"), options,
                        args.eval_songs, args.json)
    if args.base and not args.regenerate:
        raise ValueError("--base needs --regenerate START-END (seconds)")
    if not args.audio and not args.base:
        raise ValueError("give a song (file or URL), or --serve")
    if args.output:
        utils.check_output(args.output)
    difficulties = tuple(args.difficulties or [args.difficulty])
    reference = utils.reference_notes(args.reference, difficulties) if args.reference else None
    options = Options(difficulties, data.Sampling(args.temperature, args.top_p, args.min_p), not args.unconstrained,
                      args.easier, args.snap, not args.no_lights, args.preview, args.batch_size)
    with tempfile.TemporaryDirectory() as download_dir:
        if args.audio:
            song_path = utils.download_audio(args.audio, download_dir) if utils.is_url(args.audio) else args.audio
        else:       # the base map's own song
            song_path = utils.base_song(args.base, download_dir)
        if not os.path.isfile(song_path):
            raise ValueError(f"{song_path}: no such file")
        output = utils.check_output(args.output or (f"{Path(args.base).stem}_regenerated.zip" if args.base else
                                                    f"{Path(song_path).stem}_beatgen.zip"))
        bpm = args.bpm if args.bpm is not None or not reference else next(iter(reference.values()))[1]
        result = mapper.map_song(song_path, output, options, bpm, args.base, args.regenerate)
        print("\n".join(result.lines))
        for name, (ref_notes, ref_bpm) in (reference or {}).items():
            # generated beats count from the padded song's start; the reference's from the original song's start
            shifted = [n._replace(beat=n.beat - result.lead_in_s * result.bpm / 60) for n in result.notes[name]]
            card = utils.score_card(shifted, ref_notes, result.bpm, ref_bpm)
            print(f"{name} against {args.reference}:\n" + (json.dumps(card, indent=2) if args.json else
                                                          utils.format_score_card(card)))
    return result.written


def positive_number(text):
    """argparse type: a finite number > 0 (inf and nan are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="folder written by train.py (model, tokenizer, beatgen.json)")
    parser.add_argument("audio", nargs="?", default=None,
                        help="song file (.ogg/.egg/.mp3/.wav/.flac) or a URL yt-dlp can download (with --base: "
                             "default the base map's song; not with --serve)")
    parser.add_argument("--bpm", type=positive_number, default=None,
                        help="song tempo, 10..1000; estimated from the audio when omitted")
    parser.add_argument("--output", default=None,
                        help="'.zip' ready-to-play map (default <song>_beatgen.zip), '.dat' difficulty only, "
                             "else a map folder")
    parser.add_argument("--difficulty", default="ExpertPlus", choices=list(utils.DIFFICULTIES),
                        help="how hard the map is: its density and shortest gaps follow human maps of that "
                             "difficulty (README: Difficulty); also the difficulty read from --reference")
    parser.add_argument("--difficulties", nargs="+", default=None, choices=list(utils.DIFFICULTIES),
                        help="several difficulties into one map from one audio encoding (instead of --difficulty)")
    parser.add_argument("--easier", choices=["thin", "generate"], default="thin",
                        help="how maps easier than ExpertPlus are made: thin (default: generate ExpertPlus, keep the "
                             "notes on the strongest onsets the difficulty allows) or generate (each under its own "
                             "rules); README: Difficulty")
    parser.add_argument("--unconstrained", action="store_true",
                        help="research: only the token grammar, no playability or difficulty constraint "
                             "(default: every map playable by construction)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; 1.0: off")
    parser.add_argument("--min_p", type=float, default=0.0, help="min-p sampling; 0: off")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible maps")
    parser.add_argument("--chunk_beats", type=int, default=None,
                        help="whole beats per chunk (default: as trained)")
    parser.add_argument("--chunk_duration", type=positive_number, default=None,
                        help="instead of --chunk_beats: as many whole beats as fit in this many seconds (default: "
                             "as trained)")
    parser.add_argument("--audio_model", default=None, help="Encodec hub id or folder (default: as trained)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="chunks per generate call; 0: all of them on a CPU, as many as the free memory holds "
                             "on a GPU")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--snap", action="store_true",
                        help="move notes within 1/32 beat of a 1/1…1/8 grid onto it (off: ticks as generated; the "
                             "moves are tiny, but the score line shows if one undid the playability guarantee)")
    parser.add_argument("--preview", action="store_true", help="also write a PNG of the map and a click track")
    parser.add_argument("--no_lights", action="store_true",
                        help="no light show (default: one derived from the notes and the audio; without it the "
                             "stage is simply lit)")
    parser.add_argument("--reference", default=None, help="human map (zip/folder) to score the result against")
    parser.add_argument("--base", default=None,
                        help="a map (zip/folder, v2 or v3 difficulties, e.g. edited in ChroMapper) to regenerate part "
                             "of, with --regenerate; everything outside the range is kept")
    parser.add_argument("--regenerate", type=utils.parse_span, default=None, metavar="START-END",
                        help="with --base: the seconds of the song to regenerate, e.g. 30-60")
    parser.add_argument("--evaluate", default=None, metavar="MAPS",
                        help="instead of a song: map the songs of a folder of maps (or train.py's heldout.txt) at "
                             "their maps' BPM and score them against those maps; --output: the results folder "
                             "(default MODEL/evaluation; a rerun continues)")
    parser.add_argument("--eval_songs", type=int, default=None, help="with --evaluate: at most this many songs")
    parser.add_argument("--serve", action="store_true",
                        help="start the web page instead (needs: pip install -e '.[web]')")
    parser.add_argument("--host", default="127.0.0.1", help="with --serve: address to listen on (default: this "
                                                            "machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="with --serve: port (default 7860)")
    parser.add_argument("--json", action="store_true", help="print the score card (or evaluation) as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
