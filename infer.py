"""Generate a Beat Saber map for a song with a model trained by train.py.

    python infer.py runs/first song.mp3                         # tempo estimated → song_beatgen.zip
    python infer.py runs/first song.ogg --bpm 137.5 --output ExpertPlusStandard.dat
    python infer.py runs/first "https://youtu.be/…" --preview    # download with yt-dlp, plus a PNG and a click track
    python infer.py runs/first song.egg --bpm 120 --reference human_map.zip   # print a score card against a human map

Every chunk of the song is generated in one batched `generate` call; a grammar keeps each chunk's output a valid
(tick, note type) list.
"""

import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import utils
from audio import create_audio_tokenizer, load_audio
from maps import Note, map_files, mark_generated, read_map, replace_notes

MAX_NOTES_PER_SECOND = 40     # generation budget per chunk; human Expert+ maps stay under ~20


def pick_device(name=None) -> torch.device:
    """--device value (None: the first GPU if any, else the CPU) → torch.device; ValueError for a GPU this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a device name ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU on this machine (torch {torch.__version__}); use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 … "
                             f"cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda[:N] are supported")
    return device


def model_dtype(device):
    """bf16 where the GPU computes it natively; float32 elsewhere (CPUs, and GPUs that only emulate bf16 such as
    T4/V100, where fp16 could give NaN logits on left-padded rows)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def load_model(model_dir, device):
    """The causal LM train.py saved in model_dir, on device, in model_dtype(device); ValueError if it cannot load."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    device = torch.device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=model_dtype(device))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        raise ValueError(f"{model_dir}: the model cannot be loaded ({type(e).__name__}: {e})") from None
    return model.to(device).eval()


def compile_problem():
    """Why torch.compile (Triton) cannot build kernels here — no C compiler, or no Python headers — or None."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    missing = [what for what, ok in (("a C compiler (gcc or clang, or $CC)", compiler),
                                     (f"the Python headers ({headers})", os.path.exists(headers))) if not ok]
    return " and ".join(missing) or None


KV_BYTES_HEADROOM = 0.8           # share of the free GPU memory the static KV caches of one generate call may use


def chunks_per_call(model_config, tokens_per_chunk, free_bytes, dtype_bytes):
    """How many chunks one generate call can hold: the static KV cache of one chunk is 2 (keys, values) ×
    layers × KV heads × head size × dtype_bytes × tokens_per_chunk (prompt + generation budget), and all chunks'
    caches must fit in KV_BYTES_HEADROOM of free_bytes. Qwen3-0.6B in bf16, a 30 s chunk: 114,688 bytes a token,
    ≈ 0.8 GB a chunk. At least 1."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    cache_bytes = (2 * model_config.num_hidden_layers * model_config.num_key_value_heads * head_dim * dtype_bytes
                   * tokens_per_chunk)
    return max(1, int(KV_BYTES_HEADROOM * free_bytes // cache_bytes))


class Progress:
    """LogitsProcessor that only advances a progress bar by one generated token per step."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


def generate_chunks(model, prompts, max_ticks, max_new_tokens, temperature=0.8, top_p=1.0, min_p=0.0,
                    cache_implementation="static", disable_compile=False, states=None, progress=True):
    """prompts = [[prompt ids], ...] one per chunk; max_ticks = [last tick allowed per chunk] → [[(tick, type), ...], ...].
    states: one utils.PlayState per chunk (the playability constraint), or None for the token grammar alone.

    All prompts go through one `generate` call, left-padded with PAD. Sampling warpers run after the grammar,
    so they only ever choose among allowed tokens; temperature 0 decodes greedily.
    """
    from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopPLogitsWarper)
    device = model.device
    prompt_length = max(len(p) for p in prompts)
    # input_ids, attention_mask = (chunks, prompt_length), left-padded
    input_ids = torch.full((len(prompts), prompt_length), data.PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, prompt_length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, prompt_length - len(prompt):] = 1
    processors = [data.NoteGrammar(prompt_length, max_ticks, states, max_new_tokens)]
    sample = temperature > 0
    if sample:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        if min_p > 0.0:
            processors.append(MinPLogitsWarper(min_p))
    bar = tqdm(total=max_new_tokens, desc=f"generating {len(prompts)} chunks", unit="tok", disable=not progress)
    processors.append(Progress(bar))
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            logits_processor=LogitsProcessorList(processors), do_sample=sample, temperature=1.0, top_p=1.0,
            top_k=None, max_new_tokens=max_new_tokens, eos_token_id=data.EOS, pad_token_id=data.PAD,
            bos_token_id=data.BOS, cache_implementation=cache_implementation, disable_compile=disable_compile)
    bar.close()
    chunks = []
    for row in output[:, prompt_length:].tolist():
        # a row that ran out of budget ends with a tick and no type: drop that tick
        end = row.index(data.EOS) if data.EOS in row else len(row) - len(row) % 2
        chunks.append(data.decode_note_tokens(row[:end]))
    return chunks


def generate_map(model, audio_tokenizer, audio, bpm, chunk_duration, difficulties=("ExpertPlus",), temperature=0.8,
                 top_p=1.0, min_p=0.0, max_seq_length=32767, batch_size=0, constrained=True, base=None, span_s=None,
                 easier="thin", progress=True):
    """audio = (samples,) float32 at the tokenizer's rate, beat 0 at sample 0 → {difficulty: [Note, ...]}.

    The song is encoded once; every (difficulty, chunk) is one row of the generate calls: batch_size rows a call,
    or with batch_size 0 all of them on a CPU and as many as the free GPU memory holds (chunks_per_call) on a GPU.
    constrained: each row carries a utils.PlayState for its difficulty (playable by construction, seams included:
    spec.md); else only the token grammar applies. Notes are sorted, without duplicates, none past the song's end.
    base = {difficulty: [Note, ...]} and span_s = (start_s, end_s): regenerate only the notes of each base map in
    [start_s, end_s) — the chunks that cover it, cut to it — and keep every other base note; the rows at the edges
    start from the exact state the notes kept before leave, and end as the notes kept after need.
    easier: how a constrained map easier than ExpertPlus is made: "thin" (a fresh map: generate ExpertPlus, then
    utils.thin_notes keeps the notes on the strongest onsets that the easier difficulty allows) or "generate" (its
    own rows under its own rules; always so for a regenerated range). README "Difficulty" compares the two.
    """
    thin = constrained and easier == "thin" and base is None
    generated = ["ExpertPlus"] if thin else list(difficulties)
    duration_s = len(audio) / audio_tokenizer.sample_rate
    # codes = (frames, n_codebooks) for the whole song
    codes = audio_tokenizer.encode(torch.from_numpy(audio)[None]).numpy()
    plan = data.chunk_plan(duration_s, bpm, chunk_duration, audio_tokenizer.frame_rate)
    tick_s = 60 / bpm / data.PPQ
    span_s = span_s or (0.0, duration_s)
    # ticks[k] = (first, last) tick of chunk k inside the song and the span; chunks = those holding any
    ticks = {}
    for k, (start_beat, end_beat, _, _) in enumerate(plan):
        chunk_start_s = start_beat * 60 / bpm
        first = max(0, math.ceil((span_s[0] - chunk_start_s) / tick_s - 1e-9))
        last = min((end_beat - start_beat) * data.PPQ, math.ceil((min(duration_s, span_s[1]) - chunk_start_s) / tick_s
                                                                 - 1e-9)) - 1
        if first <= last:
            ticks[k] = (first, last)
    prompts = {k: data.prompt_tokens(codes[plan[k][2]:plan[k][3]]) for k in ticks}
    budget = 2 * math.ceil(MAX_NOTES_PER_SECOND * chunk_duration) + 1
    max_new_tokens = min(budget, max_seq_length - max(len(p) for p in prompts.values()))
    # rows = [(difficulty, chunk index), ...]
    rows = [(difficulty, k) for difficulty in generated for k in ticks]
    states = None
    if constrained:
        onsets_s = utils.audio_onsets(audio, audio_tokenizer.sample_rate)
        states = [play_state(difficulty, plan, k, *ticks[k], bpm, onsets_s, (base or {}).get(difficulty), span_s)
                  for difficulty, k in rows]
    disable_compile = False
    if batch_size <= 0 and model.device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(model.device)
        batch_size = chunks_per_call(model.config, max(len(p) for p in prompts.values()) + max_new_tokens,
                                     free_bytes, model.dtype.itemsize)
    if model.device.type == "cuda" and compile_problem():
        print(f"torch.compile needs {compile_problem()}: generating without it (slower; see README, GPU set-up)")
        disable_compile = True
    step = batch_size if batch_size > 0 else len(rows)
    chunks = []
    start_s = time.perf_counter()
    for first in range(0, len(rows), step):
        batch = rows[first:first + step]
        chunks += generate_chunks(model, [prompts[k] for _, k in batch], [ticks[k][1] for _, k in batch],
                                  max_new_tokens, temperature, top_p, min_p, disable_compile=disable_compile,
                                  states=states[first:first + step] if states else None, progress=progress)
    if progress:
        elapsed_s = time.perf_counter() - start_s
        # tokens = 2 per note + the EOS of each chunk
        tokens = sum(2 * len(chunk) + 1 for chunk in chunks)
        print(f"generated {len(chunks)} chunks: {tokens} tokens in {elapsed_s:.1f} s ({tokens / elapsed_s:.0f} tokens/s)")
    if states and sum(state.dead_ends for state in states):
        print(f"warning: the play constraint was cornered {sum(state.dead_ends for state in states)} times")
    # notes = {difficulty: {Note, ...}}: the base notes outside the span, then the generated ones
    notes = {difficulty: {n for n in (base or {}).get(difficulty, []) if not span_s[0] <= n.beat * 60 / bpm < span_s[1]}
             for difficulty in generated}
    for (difficulty, k), chunk in zip(rows, chunks):
        start_beat = plan[k][0]
        for tick, type_ in chunk:
            if tick >= ticks[k][0]:         # unconstrained rows may start before the span
                notes[difficulty].add(Note(start_beat + tick / data.PPQ, *data.note_fields(type_)))
    notes = {difficulty: sorted(chunk_notes) for difficulty, chunk_notes in notes.items()}
    if thin:
        strength = utils.onset_strength(audio, audio_tokenizer.sample_rate)
        for difficulty in difficulties:
            if difficulty not in notes:
                notes[difficulty] = utils.thin_notes(notes["ExpertPlus"], bpm, utils.DIFFICULTIES[difficulty], onsets_s,
                                                     strength)
    return {difficulty: notes[difficulty] for difficulty in difficulties}


def play_state(difficulty, plan, k, first_tick, last_tick, bpm, onsets_s, base=None, span_s=None):
    """The utils.PlayState of chunk k of plan for a difficulty: ticks first_tick..last_tick in seconds. Seams to
    chunks generated with it are bounded as SegmentStart.seam / SegmentEnd.seam say; the song's start and end, and
    the notes of a base map kept around span_s, are exact."""
    rules = utils.DIFFICULTIES[difficulty]
    start_beat, end_beat = plan[k][:2]
    start_s, end_s = start_beat * 60 / bpm, end_beat * 60 / bpm
    times_s = start_s + np.arange(last_tick + 1) * 60 / bpm / data.PPQ
    span_s = span_s or (0.0, math.inf)
    # before, inside, after = the base notes before, in and after the span
    before = [n for n in base or [] if n.beat * 60 / bpm < span_s[0]]
    inside = [n for n in base or [] if span_s[0] <= n.beat * 60 / bpm < span_s[1]]
    after = [n for n in base or [] if n.beat * 60 / bpm >= span_s[1]]
    if base is not None and start_s <= span_s[0]:
        start = utils.SegmentStart.after_notes(before, bpm)
    elif k == 0:
        start = utils.SegmentStart.song_start()
    else:
        start = utils.SegmentStart.seam(start_s, rules)
    if base is not None and end_s >= span_s[1]:
        end = utils.SegmentEnd.before_notes(after, bpm, before, inside, rules)
    elif k == len(plan) - 1:
        end = utils.SegmentEnd.song_end()
    else:
        end = utils.SegmentEnd.seam(end_s, rules)
    return utils.PlayState(rules, times_s, data.NOTE_TYPE_FIELDS, onsets_s, start, end, first_tick)


def output_path(args, song_path, default=None):
    """--output (or default, or <song stem>_beatgen.zip) → the path to write, checked before any work: ValueError
    when it is a folder but a file is asked for (or the reverse), lies under a file, or its folder cannot be
    created."""
    output = args.output or default or f"{Path(song_path).stem}_beatgen.zip"
    target = Path(output)
    wants_file = output.lower().endswith((".zip", ".dat"))
    if wants_file and target.is_dir():
        raise ValueError(f"--output {output}: is a folder; give a file name ending in .zip or .dat")
    if not wants_file and target.exists() and not target.is_dir():
        raise ValueError(f"--output {output}: exists and is not a folder (a map folder is written there)")
    if not wants_file and target.is_dir() and any(target.iterdir()):
        raise ValueError(f"--output {output}: folder exists and is not empty; give a new folder name")
    folder = target.parent if wants_file else target
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--output {output}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"--output {output}: cannot write in {parent}")
            break
    return output


@dataclass
class MapResult:
    written: str                # the map written (zip, folder or .dat)
    bpm: float
    lead_in_s: float            # silence put before the song (beat 0 = lead_in_s into song.egg)
    notes: dict                 # {difficulty: [Note, ...]} as written
    lines: list                 # what to tell the user: the file, then one score line per difficulty
    preview_png: str = None     # with preview: the picture and the click track of the hardest difficulty
    clicks: str = None


class Mapper:
    """A model written by train.py, loaded once (on first use), mapping songs: the command line and the web page use
    the same object. ValueError for a folder that is not such a model, or a device this machine lacks."""

    def __init__(self, model_dir, device=None, audio_model=None, chunk_duration=None, batch_size=0):
        self.model_dir = model_dir
        self.device = pick_device(device)
        self.metadata = data.load_metadata(model_dir)
        self.audio_model = audio_model or self.metadata["audio_model"]
        self.chunk_duration = chunk_duration or self.metadata["chunk_duration"]
        self.batch_size = batch_size
        self.model = self.audio_tokenizer = None

    def load(self):
        if self.model is None:
            self.model = load_model(self.model_dir, self.device)
            self.audio_tokenizer = create_audio_tokenizer(self.metadata["bandwidth"], self.audio_model, self.device)
        return self

    def map_song(self, song_path, output, difficulties=("ExpertPlus",), bpm=None, temperature=0.8, top_p=1.0,
                 min_p=0.0, constrained=True, snap=False, lights=True, preview=False, base=None, span_s=None,
                 easier="thin", progress=True) -> MapResult:
        """Map the song file at song_path into output (.zip, .dat or a new folder) → MapResult.

        bpm None: estimated (and the song gets a lead-in so beat 0 falls on a beat). base (a map zip or folder) and
        span_s = (start_s, end_s): regenerate only that range of base's difficulties, keep everything else of base,
        write base's files with those notes replaced (the tempo is base's; no lead-in)."""
        sample_rate = self.metadata["sample_rate"]
        # audio = (samples,) float32 at the model's rate, as the song file starts
        audio = load_audio(song_path, sample_rate)
        lead_in_s, base_map, base_notes, tempo_warning = 0.0, None, None, []
        if base is not None:
            base_map, base_notes = read_base(base, difficulties, bpm)
            bpm = base_map.bpm
            if snap:
                raise ValueError("--snap would move the notes kept from --base; leave it out")
        elif bpm is None:
            estimate = utils.estimate_beat(audio, sample_rate)
            bpm, lead_in_s = estimate.bpm, utils.lead_in_for_beat(estimate.bpm, estimate.first_beat_s)
            tempo_warning = [estimate.warning()] if estimate.warning() else []
            if progress:
                print(f"estimated tempo {bpm:.2f} BPM, first beat at {estimate.first_beat_s:.3f} s")
        if not 10 <= bpm <= 1000:
            raise ValueError(f"BPM {bpm} outside 10..1000")
        self.load()
        # padded = (samples,) the song after lead_in_s of silence: beat 0 of the map = its sample 0
        padded = np.concatenate([np.zeros(round(lead_in_s * sample_rate), np.float32), audio])
        duration_s = len(padded) / sample_rate
        maps_notes = generate_map(self.model, self.audio_tokenizer, padded, bpm, self.chunk_duration, difficulties,
                                  temperature, top_p, min_p, self.metadata["max_seq_length"], self.batch_size,
                                  constrained=constrained, base=base_notes, span_s=span_s, easier=easier,
                                  progress=progress)
        if snap:
            maps_notes = {name: utils.snap_notes(notes) for name, notes in maps_notes.items()}
        if not any(maps_notes.values()):
            raise ValueError(f"{song_path}: no notes were generated for {duration_s:.2f} s of audio at {bpm:g} BPM "
                             "(too short, or silent); nothing written")
        if base_map is not None:
            written = write_regenerated(output, base_map, maps_notes, span_s)
            what = f"{', '.join(maps_notes)} of {base}, {span_s[0]:g}–{span_s[1]:g} s regenerated"
        else:
            show = {name: utils.light_show(notes, bpm, padded, sample_rate)
                    for name, notes in maps_notes.items()} if lights else None
            written = utils.write_map(output, maps_notes, bpm, song_path, lead_in_s=lead_in_s, lights=show)
            what = f"{', '.join(maps_notes)} over {duration_s:.1f} s at {bpm:g} BPM"
        result = MapResult(written, bpm, lead_in_s, maps_notes, tempo_warning + [f"wrote {written}: {what}"] + [
            f"  {name}: {score_line(notes, bpm)}" for name, notes in maps_notes.items()])
        if preview:
            hardest = max(maps_notes, key=lambda name: utils.DIFFICULTIES[name].rank)
            stem = os.path.splitext(written)[0]
            result.preview_png, result.clicks = stem + "_preview.png", stem + "_clicks.wav"
            utils.write_preview(maps_notes[hardest], bpm, song_path, result.preview_png, result.clicks, lead_in_s)
            result.lines.append(f"preview ({hardest}): {result.preview_png}, {result.clicks}")
        return result


def read_base(path, difficulties, bpm):
    """The map to regenerate part of → (BeatMap, {difficulty: [Note, ...]}); ValueError when it lacks a difficulty,
    changes tempo, has a song offset, or --bpm disagrees with its BPM."""
    base_map = read_map(path)
    if base_map.song_time_offset_s:
        raise ValueError(f"{path}: song time offset {base_map.song_time_offset_s} s (bake it into the audio first)")
    if bpm is not None and abs(bpm - base_map.bpm) > 1e-6:
        raise ValueError(f"--bpm {bpm:g} differs from {path}'s {base_map.bpm:g} BPM (leave --bpm out)")
    notes = {}
    for name in difficulties:
        difficulty = base_map.difficulties.get(("Standard", name))
        if difficulty is None:
            raise ValueError(f"{path}: no Standard {name} difficulty (has "
                             f"{', '.join('/'.join(key) for key in base_map.difficulties) or 'none'})")
        if difficulty.bpm_changes:
            raise ValueError(f"{path}: {name} changes tempo; regeneration needs one tempo")
        notes[name] = difficulty.notes
    return base_map, notes


def write_regenerated(output, base_map, maps_notes, span_s):
    """base_map's files, each regenerated difficulty's colour notes in span_s replaced by the new ones, Info.dat
    naming the generator → written to output (zip or new folder); returns output."""
    files = map_files(base_map.source)
    lower = {name.lower(): name for name in files}
    start_beat, end_beat = (t * base_map.bpm / 60 for t in span_s)
    for name, notes in maps_notes.items():
        file_name = lower[base_map.difficulties[("Standard", name)].filename.lower()]
        new = [n for n in notes if start_beat <= n.beat < end_beat]
        try:
            files[file_name] = replace_notes(files[file_name], start_beat, end_beat, new)
        except ValueError as error:
            raise ValueError(f"{base_map.source}: {file_name}: {error}") from None
    info_name = lower["info.dat"]
    files[info_name] = mark_generated(files[info_name], utils.LEVEL_AUTHOR, utils.GENERATOR_VERSION)
    return utils.write_files(output, files)


def parse_span(text):
    """argparse type: "30-60" → (30.0, 60.0) seconds, start < end."""
    try:
        start_s, end_s = (float(part) for part in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START-END in seconds, e.g. 30-60") from None
    if not (math.isfinite(start_s) and math.isfinite(end_s) and 0 <= start_s < end_s):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END")
    return start_s, end_s


def main(args):
    if args.seed is not None:
        torch.manual_seed(args.seed)
    mapper = Mapper(args.model_dir, args.device, args.audio_model, args.chunk_duration, args.batch_size)
    if args.serve:
        return serve(mapper, args.host, args.port)
    if args.base and not args.regenerate:
        raise ValueError("--base needs --regenerate START-END (seconds)")
    if not args.audio and not args.base:
        raise ValueError("give a song (file or URL), or --serve")
    if args.output:
        output_path(args, args.audio or args.base)
    reference = read_reference(args) if args.reference else None
    difficulties = args.difficulties or [args.difficulty]
    with tempfile.TemporaryDirectory() as download_dir:
        if args.audio:
            song_path = utils.download_audio(args.audio, download_dir) if utils.is_url(args.audio) else args.audio
        else:       # the base map's own song
            song_path = _base_song(args.base, download_dir)
        if not os.path.isfile(song_path):
            raise ValueError(f"{song_path}: no such file")
        default = f"{Path(args.base).stem}_regenerated.zip" if args.base else None
        output = output_path(args, song_path, default)
        bpm = args.bpm if args.bpm is not None or not reference else next(iter(reference.values()))[1]
        result = mapper.map_song(song_path, output, difficulties, bpm, args.temperature, args.top_p, args.min_p,
                                 constrained=not args.unconstrained, snap=args.snap, lights=not args.no_lights,
                                 preview=args.preview, base=args.base, span_s=args.regenerate, easier=args.easier)
        print("\n".join(result.lines))
        for name, (ref_notes, ref_bpm) in (reference or {}).items():
            # generated beats count from the padded song's start; the reference's from the original song's start
            shifted = [n._replace(beat=n.beat - result.lead_in_s * result.bpm / 60) for n in result.notes[name]]
            card = utils.score_card(shifted, ref_notes, result.bpm, ref_bpm)
            print(f"{name} against {args.reference}:")
            print(json.dumps(card, indent=2) if args.json else utils.format_score_card(card))
    return result.written


MAX_UPLOAD = "200mb"            # the web page's largest upload (a song, or a map zip)


def serve(mapper, host="127.0.0.1", port=7860, block=True):
    """The web page (Gradio): drop a song or paste a link, pick difficulties and a BPM (or let it be estimated), get
    the zip, the preview picture, the click track over the song and the score lines; or upload a map and a time
    range to regenerate. The model is loaded once; requests run one at a time (a queue), each in its own folder, so
    two at once do not mix. Bad input is a message on the page; the server keeps running."""
    try:
        import gradio as gr
    except ImportError:
        raise ValueError("--serve needs Gradio: pip install -e '.[web]'") from None
    mapper.load()
    work = Path(tempfile.mkdtemp(prefix="beatgen-serve-"))

    def generate(song, link, difficulties, bpm, temperature, base, span, progress=gr.Progress(track_tqdm=True)):
        """One request → (zip, preview png, click track, score lines); gr.Error with the reason on bad input."""
        request = Path(tempfile.mkdtemp(dir=work))
        try:
            if not difficulties:
                raise ValueError("pick at least one difficulty")
            difficulties = sorted(difficulties, key=lambda name: utils.DIFFICULTIES[name].rank)
            if link and link.strip():
                if not utils.is_url(link.strip()):
                    raise ValueError(f"{link.strip()!r} is not an http(s) link")
                song = utils.download_audio(link.strip(), request)
            if base:
                span_s = parse_span(span or "")
                song = song or _base_song(base, request)
            elif not song:
                raise ValueError("drop a song file or paste a link")
            name = Path(base).stem + "_regenerated" if base else Path(song).stem + "_beatgen"
            result = mapper.map_song(song, str(request / f"{name}.zip"), difficulties, float(bpm) if bpm else None,
                                     float(temperature), preview=not base, base=base, span_s=span_s if base else None,
                                     progress=True)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise gr.Error(str(error)) from None
        # the score lines name files by their names (the request folder is the server's business)
        return result.written, result.preview_png, result.clicks, "\n".join(result.lines).replace(f"{request}/", "")

    with gr.Blocks(title="beatgen") as page:
        gr.Markdown("# beatgen\nA Beat Saber map for your song, from your own model. Declare maps made here as "
                    "AI-generated when you upload them to BeatSaver.")
        with gr.Row():
            with gr.Column():
                song = gr.File(label="Song (.ogg .egg .mp3 .wav .flac)", type="filepath", elem_id="song")
                link = gr.Textbox(label="…or a link (YouTube, SoundCloud, a direct file)", elem_id="link")
                difficulties = gr.CheckboxGroup(list(utils.DIFFICULTIES), value=["Expert", "ExpertPlus"],
                                                label="Difficulties", elem_id="difficulties")
                bpm = gr.Number(label="BPM (empty: estimate)", value=None, elem_id="bpm")
                temperature = gr.Slider(0.0, 1.5, value=0.8, step=0.05, label="Temperature (0: greedy)")
                with gr.Accordion("Regenerate part of a map", open=False):
                    base = gr.File(label="Map zip to keep (v2 or v3 difficulties)", type="filepath", elem_id="base")
                    span = gr.Textbox(label="Seconds to regenerate, START-END", placeholder="30-60", elem_id="span")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                zip_file = gr.File(label="Map (zip: drop into CustomLevels or upload)", elem_id="map")
                preview = gr.Image(label="Preview", type="filepath", elem_id="preview")
                clicks = gr.Audio(label="Click track over the song", type="filepath", elem_id="clicks")
                lines = gr.Textbox(label="Score", lines=6, elem_id="score")
        button.click(generate, [song, link, difficulties, bpm, temperature, base, span],
                     [zip_file, preview, clicks, lines])
    page.queue(default_concurrency_limit=1)
    print(f"beatgen page on http://{host}:{port} (Ctrl-C to stop)")
    page.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, allowed_paths=[str(work)],
                prevent_thread_lock=not block, show_error=True)
    return page


def _base_song(base, folder):
    """The song of the map zip or folder `base`, written into folder → its path."""
    path = Path(folder) / "song.egg"
    path.write_bytes(read_map(base).read_audio())
    return str(path)


def score_line(notes, bpm):
    """One line of a map's playability card: notes, NPS, parity errors per hand, vision blocks, impossible doubles."""
    stats = utils.map_stats(notes, bpm)
    return (f"{stats['notes']} notes, {stats['nps']:.2f} NPS, parity errors {stats['parity_errors_red']} red / "
            f"{stats['parity_errors_blue']} blue, vision blocks {stats['vision_blocks']}, "
            f"impossible doubles {stats['impossible_doubles']}")


def read_reference(args):
    """{difficulty: (notes, bpm)} of the reference map's Standard difficulties among those asked for; ValueError
    when it has none of them."""
    beatmap = read_map(args.reference)
    found = {name: (beatmap.difficulties[("Standard", name)].notes, beatmap.bpm)
             for name in (args.difficulties or [args.difficulty]) if ("Standard", name) in beatmap.difficulties}
    if not found:
        raise ValueError(f"{args.reference}: no Standard {'/'.join(args.difficulties or [args.difficulty])} "
                         f"difficulty (has {sorted(beatmap.difficulties)})")
    return found


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
    parser.add_argument("--chunk_duration", type=positive_number, default=None,
                        help="seconds per chunk (default: as trained)")
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
    parser.add_argument("--regenerate", type=parse_span, default=None, metavar="START-END",
                        help="with --base: the seconds of the song to regenerate, e.g. 30-60")
    parser.add_argument("--serve", action="store_true",
                        help="start the web page instead (needs: pip install -e '.[web]')")
    parser.add_argument("--host", default="127.0.0.1", help="with --serve: address to listen on (default: this "
                                                            "machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="with --serve: port (default 7860)")
    parser.add_argument("--json", action="store_true", help="print the score card as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
