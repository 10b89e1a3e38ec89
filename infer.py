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
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import utils
from audio import create_audio_tokenizer, load_audio
from maps import Note, read_map

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
                 top_p=1.0, min_p=0.0, max_seq_length=32767, batch_size=0, constrained=True, progress=True):
    """audio = (samples,) float32 at the tokenizer's rate, beat 0 at sample 0 → {difficulty: [Note, ...]}.

    The song is encoded once; every (difficulty, chunk) is one row of the generate calls: batch_size rows a call,
    or with batch_size 0 all of them on a CPU and as many as the free GPU memory holds (chunks_per_call) on a GPU.
    constrained: each row carries a utils.PlayState for its difficulty (playable by construction, seams included:
    spec.md); else only the token grammar applies. Notes are sorted, without duplicates, none past the song's end.
    """
    duration_s = len(audio) / audio_tokenizer.sample_rate
    # codes = (frames, n_codebooks) for the whole song
    codes = audio_tokenizer.encode(torch.from_numpy(audio)[None]).numpy()
    plan = data.chunk_plan(duration_s, bpm, chunk_duration, audio_tokenizer.frame_rate)
    tick_s = 60 / bpm / data.PPQ
    # last_ticks[k] = chunk k's last tick that starts inside the song
    last_ticks = [min((end_beat - start_beat) * data.PPQ, math.ceil((duration_s - start_beat * 60 / bpm) / tick_s)) - 1
                  for start_beat, end_beat, _, _ in plan]
    prompts = [data.prompt_tokens(codes[start_frame:end_frame]) for _, _, start_frame, end_frame in plan]
    budget = 2 * math.ceil(MAX_NOTES_PER_SECOND * chunk_duration) + 1
    max_new_tokens = min(budget, max_seq_length - max(len(p) for p in prompts))
    # rows = [(difficulty, chunk index), ...]
    rows = [(difficulty, k) for difficulty in difficulties for k in range(len(plan))]
    states = None
    if constrained:
        onsets_s = utils.audio_onsets(audio, audio_tokenizer.sample_rate)
        states = [play_state(difficulty, plan, k, last_ticks[k], bpm, onsets_s) for difficulty, k in rows]
    disable_compile = False
    if batch_size <= 0 and model.device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(model.device)
        batch_size = chunks_per_call(model.config, max(len(p) for p in prompts) + max_new_tokens, free_bytes,
                                     model.dtype.itemsize)
    if model.device.type == "cuda" and compile_problem():
        print(f"torch.compile needs {compile_problem()}: generating without it (slower; see README, GPU set-up)")
        disable_compile = True
    step = batch_size if batch_size > 0 else len(rows)
    chunks = []
    start_s = time.perf_counter()
    for first in range(0, len(rows), step):
        batch = rows[first:first + step]
        chunks += generate_chunks(model, [prompts[k] for _, k in batch], [last_ticks[k] for _, k in batch],
                                  max_new_tokens, temperature, top_p, min_p, disable_compile=disable_compile,
                                  states=states[first:first + step] if states else None, progress=progress)
    if progress:
        elapsed_s = time.perf_counter() - start_s
        # tokens = 2 per note + the EOS of each chunk
        tokens = sum(2 * len(chunk) + 1 for chunk in chunks)
        print(f"generated {len(chunks)} chunks: {tokens} tokens in {elapsed_s:.1f} s ({tokens / elapsed_s:.0f} tokens/s)")
    if states and sum(state.dead_ends for state in states):
        print(f"warning: the play constraint was cornered {sum(state.dead_ends for state in states)} times")
    notes = {difficulty: set() for difficulty in difficulties}
    for (difficulty, k), chunk in zip(rows, chunks):
        start_beat = plan[k][0]
        for tick, type_ in chunk:
            notes[difficulty].add(Note(start_beat + tick / data.PPQ, *data.note_fields(type_)))
    return {difficulty: sorted(chunk_notes) for difficulty, chunk_notes in notes.items()}


def play_state(difficulty, plan, k, last_tick, bpm, onsets_s):
    """The utils.PlayState of chunk k of plan for a difficulty: ticks 0..last_tick in seconds; seams to the chunks
    before and after bounded as SegmentStart.seam / SegmentEnd.seam say, the song's start and end exact."""
    rules = utils.DIFFICULTIES[difficulty]
    start_beat, end_beat = plan[k][:2]
    start_s, end_s = start_beat * 60 / bpm, end_beat * 60 / bpm
    times_s = start_s + np.arange(last_tick + 1) * 60 / bpm / data.PPQ
    start = utils.SegmentStart.seam(start_s, rules) if k > 0 else utils.SegmentStart.song_start()
    end = utils.SegmentEnd.seam(end_s, rules) if k < len(plan) - 1 else utils.SegmentEnd.song_end()
    return utils.PlayState(rules, times_s, data.NOTE_TYPE_FIELDS, onsets_s, start, end)


def output_path(args, song_path):
    """--output (or <song stem>_beatgen.zip) → the path to write, checked before any work: ValueError when it is a
    folder but a file is asked for (or the reverse), lies under a file, or its folder cannot be created."""
    output = args.output or f"{Path(song_path).stem}_beatgen.zip"
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


def main(args):
    device = pick_device(args.device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    metadata = data.load_metadata(args.model_dir)
    if args.output:
        output_path(args, args.audio)
    chunk_duration = args.chunk_duration or metadata["chunk_duration"]
    reference = read_reference(args) if args.reference else None
    with tempfile.TemporaryDirectory() as download_dir:
        song_path = utils.download_audio(args.audio, download_dir) if utils.is_url(args.audio) else args.audio
        if not os.path.isfile(song_path):
            raise ValueError(f"{song_path}: no such file")
        output = output_path(args, song_path)
        # audio = (samples,) float32 at the model's rate, as the song file starts
        audio = load_audio(song_path, metadata["sample_rate"])
        bpm, lead_in_s = args.bpm, 0.0
        if bpm is None and reference:
            bpm = next(iter(reference.values()))[1]
        if bpm is None:
            bpm, first_beat_s = utils.estimate_beat(audio, metadata["sample_rate"])
            lead_in_s = utils.lead_in_for_beat(bpm, first_beat_s)
            print(f"estimated tempo {bpm:.2f} BPM, first beat at {first_beat_s:.3f} s")
        if not 10 <= bpm <= 1000:
            raise ValueError(f"BPM {bpm} outside 10..1000")
        model = load_model(args.model_dir, device)
        audio_tokenizer = create_audio_tokenizer(metadata["bandwidth"], args.audio_model or metadata["audio_model"],
                                                 device)
        # beat 0 of the map = sample 0 of the (padded) song
        padded = torch.cat([torch.zeros(round(lead_in_s * audio_tokenizer.sample_rate)), torch.from_numpy(audio)])
        duration_s = len(padded) / audio_tokenizer.sample_rate
        difficulties = args.difficulties or [args.difficulty]
        maps_notes = generate_map(model, audio_tokenizer, padded.numpy(), bpm, chunk_duration, difficulties,
                                  args.temperature, args.top_p, args.min_p, metadata["max_seq_length"],
                                  args.batch_size, constrained=not args.unconstrained)
        if args.snap:
            maps_notes = {name: utils.snap_notes(notes) for name, notes in maps_notes.items()}
        if not any(maps_notes.values()):
            raise ValueError(f"{song_path}: no notes were generated for {duration_s:.2f} s of audio at {bpm:g} BPM "
                             "(too short, or silent); nothing written")
        written = utils.write_map(output, maps_notes, bpm, song_path, lead_in_s=lead_in_s)
        print(f"wrote {written}: {', '.join(maps_notes)} over {duration_s:.1f} s at {bpm:g} BPM")
        for name, notes in maps_notes.items():
            print(f"  {name}: {score_line(notes, bpm)}")
        hardest = max(maps_notes, key=lambda name: utils.DIFFICULTIES[name].rank)
        if args.preview:
            stem = os.path.splitext(written)[0]
            utils.write_preview(maps_notes[hardest], bpm, song_path, stem + "_preview.png", stem + "_clicks.wav",
                                lead_in_s)
            print(f"preview ({hardest}): {stem}_preview.png, {stem}_clicks.wav")
        for name, (ref_notes, ref_bpm) in (reference or {}).items():
            # generated beats count from the padded song's start; the reference's from the original song's start
            shifted = [n._replace(beat=n.beat - lead_in_s * bpm / 60) for n in maps_notes[name]]
            card = utils.score_card(shifted, ref_notes, bpm, ref_bpm)
            print(f"{name} against {args.reference}:")
            print(json.dumps(card, indent=2) if args.json else utils.format_score_card(card))
    return written


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
    parser.add_argument("audio", help="song file (.ogg/.egg/.mp3/.wav/.flac) or a URL yt-dlp can download")
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
    parser.add_argument("--reference", default=None, help="human map (zip/folder) to score the result against")
    parser.add_argument("--json", action="store_true", help="print the score card as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
