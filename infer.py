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
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

import data
import utils
from audio import create_audio_tokenizer, load_audio
from maps import Note, read_map

MAX_NOTES_PER_SECOND = 40     # generation budget per chunk; human Expert+ maps stay under ~20


def load_model(model_dir, device):
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


class Progress:
    """LogitsProcessor that only advances a progress bar by one generated token per step."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


def generate_chunks(model, prompts, max_ticks, max_new_tokens, temperature=0.8, top_p=1.0, min_p=0.0,
                    cache_implementation="static", progress=True):
    """prompts = [[prompt ids], ...] one per chunk; max_ticks = [last tick allowed per chunk] → [[(tick, type), ...], ...].

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
    processors = [data.NoteGrammar(prompt_length, max_ticks)]
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
            bos_token_id=data.BOS, cache_implementation=cache_implementation)
    bar.close()
    chunks = []
    for row in output[:, prompt_length:].tolist():
        # a row that ran out of budget ends with a tick and no type: drop that tick
        end = row.index(data.EOS) if data.EOS in row else len(row) - len(row) % 2
        chunks.append(data.decode_note_tokens(row[:end]))
    return chunks


def generate_map(model, audio_tokenizer, audio, bpm, chunk_duration, temperature=0.8, top_p=1.0, min_p=0.0,
                 max_seq_length=32767, batch_size=0, progress=True):
    """audio = (samples,) float32 at the tokenizer's rate, beat 0 at sample 0 → [Note(beat, x, y, color, direction), ...].

    Notes from all chunks, sorted, without duplicates, none past the end of the song. All chunks go into one
    generate call, or calls of batch_size chunks when batch_size > 0 (to bound GPU memory on long songs).
    """
    duration_s = len(audio) / audio_tokenizer.sample_rate
    # codes = (frames, n_codebooks) for the whole song
    codes = audio_tokenizer.encode(torch.from_numpy(audio)[None]).numpy()
    plan = data.chunk_plan(duration_s, bpm, chunk_duration, audio_tokenizer.frame_rate)
    prompts = [data.prompt_tokens(codes[start_frame:end_frame]) for _, _, start_frame, end_frame in plan]
    max_ticks = [(end_beat - start_beat) * data.PPQ - 1 for start_beat, end_beat, _, _ in plan]
    budget = 2 * math.ceil(MAX_NOTES_PER_SECOND * chunk_duration) + 1
    max_new_tokens = min(budget, max_seq_length - max(len(p) for p in prompts))
    step = batch_size if batch_size > 0 else len(prompts)
    chunks = []
    for first in range(0, len(prompts), step):
        chunks += generate_chunks(model, prompts[first:first + step], max_ticks[first:first + step], max_new_tokens,
                                  temperature, top_p, min_p, progress=progress)
    notes = set()
    for (start_beat, _, _, _), chunk in zip(plan, chunks):
        for tick, type_ in chunk:
            beat = start_beat + tick / data.PPQ
            if beat * 60 / bpm < duration_s:
                notes.add(Note(beat, *data.note_fields(type_)))
    return sorted(notes)


def main(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    metadata = data.load_metadata(args.model_dir)
    chunk_duration = args.chunk_duration or metadata["chunk_duration"]
    with tempfile.TemporaryDirectory() as download_dir:
        song_path = utils.download_audio(args.audio, download_dir) if utils.is_url(args.audio) else args.audio
        if not os.path.isfile(song_path):
            raise ValueError(f"{song_path}: no such file")
        audio_tokenizer = create_audio_tokenizer(metadata["bandwidth"], args.audio_model or metadata["audio_model"],
                                                 device)
        # audio = (samples,) float32 at 24 kHz, as the song file starts
        audio = load_audio(song_path, audio_tokenizer.sample_rate)
        reference = read_reference(args) if args.reference else None
        bpm, lead_in_s = args.bpm, 0.0
        if bpm is None and reference is not None:
            bpm = reference[1]
        if bpm is None:
            bpm, first_beat_s = utils.estimate_beat(audio, audio_tokenizer.sample_rate)
            lead_in_s = utils.lead_in_for_beat(bpm, first_beat_s)
            print(f"estimated tempo {bpm:.2f} BPM, first beat at {first_beat_s:.3f} s")
        if not 10 <= bpm <= 1000:
            raise ValueError(f"BPM {bpm} outside 10..1000")
        # beat 0 of the map = sample 0 of the (padded) song
        padded = torch.cat([torch.zeros(round(lead_in_s * audio_tokenizer.sample_rate)), torch.from_numpy(audio)])
        model = load_model(args.model_dir, device)
        notes = generate_map(model, audio_tokenizer, padded.numpy(), bpm, chunk_duration, args.temperature,
                             args.top_p, args.min_p, metadata.get("max_seq_length", 32767), args.batch_size)
        if args.snap:
            notes = utils.snap_notes(notes)
        output = args.output or f"{Path(song_path).stem}_beatgen.zip"
        written = utils.write_map(output, notes, bpm, song_path, difficulty=args.difficulty, lead_in_s=lead_in_s)
        duration_s = len(padded) / audio_tokenizer.sample_rate
        print(f"wrote {written}: {len(notes)} notes, {len(notes) / duration_s:.2f} notes/s over {duration_s:.1f} s "
              f"at {bpm:g} BPM")
        if args.preview:
            stem = os.path.splitext(written)[0]
            utils.write_preview(notes, bpm, song_path, stem + "_preview.png", stem + "_clicks.wav", lead_in_s)
            print(f"preview: {stem}_preview.png, {stem}_clicks.wav")
        if reference is not None:
            ref_notes, ref_bpm = reference
            # generated beats count from the padded song's start; the reference's from the original song's start
            shifted = [n._replace(beat=n.beat - lead_in_s * bpm / 60) for n in notes]
            card = utils.score_card(shifted, ref_notes, bpm, ref_bpm)
            print(json.dumps(card, indent=2) if args.json else utils.format_score_card(card))
    return written


def read_reference(args):
    """(notes, bpm) of the reference map's --characteristic/--difficulty."""
    beatmap = read_map(args.reference)
    key = ("Standard", args.difficulty)
    if key not in beatmap.difficulties:
        raise ValueError(f"{args.reference}: no {key[0]} {key[1]} difficulty "
                         f"(has {sorted(beatmap.difficulties)})")
    return beatmap.difficulties[key].notes, beatmap.bpm


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="folder written by train.py (model, tokenizer, beatgen.json)")
    parser.add_argument("audio", help="song file (.ogg/.egg/.mp3/.wav/.flac) or a URL yt-dlp can download")
    parser.add_argument("--bpm", type=float, default=None, help="song tempo; estimated from the audio when omitted")
    parser.add_argument("--output", default=None,
                        help="'.zip' ready-to-play map (default <song>_beatgen.zip), '.dat' difficulty only, "
                             "else a map folder")
    parser.add_argument("--difficulty", default="ExpertPlus", choices=["Easy", "Normal", "Hard", "Expert", "ExpertPlus"],
                        help="difficulty name written into the map (and read from --reference)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; 1.0: off")
    parser.add_argument("--min_p", type=float, default=0.0, help="min-p sampling; 0: off")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible maps")
    parser.add_argument("--chunk_duration", type=float, default=None, help="seconds per chunk (default: as trained)")
    parser.add_argument("--audio_model", default=None, help="Encodec hub id or folder (default: as trained)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="chunks per generate call; 0: the whole song in one call (lower it if GPU memory runs out)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--snap", action="store_true",
                        help="move notes within 1/32 beat of a 1/1…1/8 grid onto it (off: ticks as generated)")
    parser.add_argument("--preview", action="store_true", help="also write a PNG of the map and a click track")
    parser.add_argument("--reference", default=None, help="human map (zip/folder) to score the result against")
    parser.add_argument("--json", action="store_true", help="print the score card as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
