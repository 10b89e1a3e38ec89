"""The real training and generation path on a GPU, in two stages that each fit one short command (not collected by
pytest; `--cpu --tiny` runs both stages on tiny models, and the test suite does that).

    python tests/gpu_check.py --stage train      # Qwen3-0.6B architecture + full-size Encodec, train.py
    python tests/gpu_check.py --stage infer      # the same models, generation
    python tests/gpu_check.py --cpu --tiny --stage train      # tiny models on the CPU (the tests)

No hub and no internet: Qwen3-0.6B is built from its config with random weights and the full-size Encodec 24 kHz with
random codebooks, into --workdir, with synthetic click songs. Each stage prints one JSON line of figures at the end
(`gpu_check {...}`), and --report writes it to a file.

train: `python train.py` for STEPS optimizer steps on 30 s chunks (fp32 master weights, bf16 compute), a checkpoint
  before the last step; the same last step `--resume`d with --pure_bf16; the share of weights each last step changed;
  the first step's time (warm-up, compilation) apart from the median later step; peak GPU memory allocated and
  reserved; then one step on one chunk near 32,768 tokens (256 beats at 72 BPM) for the memory at the longest
  sequence.
infer: a song whose last chunk is shorter than the others: the prompts of one generate call are checked to have one
  length (no padded rows), the model's raw logits at every generated step to be finite; greedy maps of two chunks
  batched and one by one (in fp32: bf16 kernels differ by batch shape); the decode step compiled and not (time per
  step after the first call, the first call's extra time = compilation, and the grammar's share of a step); then
  `python infer.py` on the song as a user runs it (wall time and the stage times it prints).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

BPM = 128.0


def run(args, cwd, log, cpu):
    """One command of the check as a subprocess (a .py runs with this Python) → (stdout, wall seconds); a failure
    ends the check with its error."""
    command = [sys.executable, *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    start_s = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    log.write(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}\n")
    log.flush()
    if result.returncode != 0:
        sys.exit(f"gpu_check: {' '.join(command[1:3])} … failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout, time.perf_counter() - start_s


def build_models(work, tiny):
    """Random Qwen3 (tiny or the 0.6B architecture) with a small tokenizer, and a random Encodec → (qwen, encodec),
    reused when work already holds them."""
    from tokenizers import Tokenizer, models
    from transformers import EncodecConfig, PreTrainedTokenizerFast

    from conftest import QWEN3_06B, random_encodec_model, random_qwen, tiny_encodec_model, tiny_qwen
    qwen, encodec = work / "qwen", work / "encodec"
    if not (qwen / "config.json").exists():
        if tiny:
            tiny_qwen(qwen)
            tiny_encodec_model().save_pretrained(encodec)
        else:
            random_qwen(qwen, QWEN3_06B)
            random_encodec_model(EncodecConfig()).save_pretrained(encodec)     # the 24 kHz model's architecture
        # a word-level tokenizer with Qwen's special tokens: the data is token ids already, the trainer only saves it
        vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")),
                                eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(qwen)
    return qwen, encodec


def click_maps(folder, n_songs, song_s, bpm=BPM):
    """n_songs map zips of song_s-second click songs at bpm, a note on every click (a random half of the 1/2 beats)."""
    from conftest import click_song, make_map_zip, ogg_bytes
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(n_songs):
        grid = np.arange(0, song_s * bpm / 60 - 1, 0.5)
        beats = np.sort(rng.choice(grid, len(grid) // 2, replace=False))
        audio = click_song(song_s, beats * 60 / bpm, seed=s)
        notes = [(float(b), int(b * 2) % 4, 0, int(b * 2) % 2, 1 - int(b) % 2) for b in beats]
        make_map_zip(folder / f"song{s}.zip", bpm, {"Expert": notes}, ogg_bytes(audio))


def fraction_changed(before, after):
    """Share of all weight values that differ between two saved models (folders with model.safetensors); before is
    first cast to after's dtype (a step on bf16 weights starts from the bf16 copy of the checkpoint)."""
    from safetensors.torch import load_file
    before, after = (load_file(str(Path(folder) / "model.safetensors")) for folder in (before, after))
    changed = sum(int((before[name].to(after[name].dtype) != after[name]).sum()) for name in after)
    return changed / sum(after[name].numel() for name in after)


def train_figures(stdout):
    """train.py's summary line → {tokens_per_s, first_step_s, step_s, peak_allocated_gib, peak_reserved_gib}."""
    line = next(line for line in stdout.splitlines() if line.startswith("trained "))
    figures = {"tokens_per_s": float(re.search(r"\((\d+) tokens/s", line).group(1))}
    steps = re.search(r"first step ([\d.]+) s .*?then ([\d.]+) s a step", line)
    figures["first_step_s"], figures["step_s"] = (float(v) for v in steps.groups()) if steps else (None, None)
    peak = re.search(r"peak GPU memory ([\d.]+) GiB allocated, ([\d.]+) GiB reserved", line)
    figures["peak_allocated_gib"], figures["peak_reserved_gib"] = (float(v) for v in peak.groups()) if peak else (
        None, None)
    return figures


def stage_train(work, tiny, cpu, steps, log):
    qwen, encodec = build_models(work, tiny)
    song_s, chunk_beats, accumulate = (12.0, 8, 2) if tiny else (150.0, 64, 4)
    click_maps(work / "maps", 3, song_s)
    train = [ROOT / "train.py", "maps", "--model", qwen, "--audio_model", encodec, "--cache_dir", "cache",
             "--chunk_beats", chunk_beats, "--gradient_accumulation_steps", accumulate, "--learning_rate", "2e-5",
             "--eval_fraction", "0"]
    out, wall_s = run([*train, "--output_dir", "run", "--max_steps", steps, "--save_steps", steps - 1], work, log, cpu)
    report = {"stage": "train", "steps": steps, "train_wall_s": round(wall_s, 1), **train_figures(out)}
    before_last = work / "run" / f"checkpoint-{steps - 1}"
    state = json.loads((before_last / "trainer_state.json").read_text())
    report["loss"] = [round(h["loss"], 4) for h in state["log_history"] if "loss" in h]
    report["last_step_changed_fp32_master"] = fraction_changed(before_last, work / "run")
    # the same last step with bf16 weights: resume from that checkpoint with --pure_bf16
    (work / "bf16").mkdir(exist_ok=True)
    if not (work / "bf16" / before_last.name).exists():
        os.symlink(before_last, work / "bf16" / before_last.name)
    run([*train, "--output_dir", "bf16", "--max_steps", steps, "--save_steps", steps, "--resume", "--pure_bf16"],
        work, log, cpu)
    report["last_step_changed_pure_bf16"] = fraction_changed(before_last, work / "bf16")
    # one step on the longest sequence: 256 beats at 72 BPM = 213 s = 16,000 frames = 32,000 audio tokens (tiny: 16
    # beats at 144 BPM, 1,000: a tiny model's positions stop at 4,096)
    long_bpm, long_beats = (144.0, 16) if tiny else (72.0, 256)
    click_maps(work / "long", 1, long_beats * 60 / long_bpm + 0.5, bpm=long_bpm)
    out, _ = run([ROOT / "train.py", "long", "--model", qwen, "--audio_model", encodec, "--cache_dir", "cache",
                  "--chunk_beats", long_beats, "--gradient_accumulation_steps", 1, "--max_steps", 1,
                  "--output_dir", "long_run", "--save_steps", 10, "--eval_fraction", "0"], work, log, cpu)
    longest = train_figures(out)
    report["long_sequence_tokens"] = int(re.search(r"(\d+) tokens \(", out).group(1))
    report["long_sequence_peak_allocated_gib"] = longest["peak_allocated_gib"]
    report["long_sequence_peak_reserved_gib"] = longest["peak_reserved_gib"]
    return report


def stage_infer(work, tiny, cpu, log):
    import torch

    import data
    import infer
    from audio import create_audio_tokenizer
    from conftest import click_song
    import soundfile
    qwen, encodec = build_models(work, tiny)
    device = torch.device("cpu" if cpu else "cuda")
    model_dir = work / "model"
    if not (model_dir / "beatgen.json").exists():
        import shutil
        shutil.copytree(qwen, model_dir, dirs_exist_ok=True)
        data.save_metadata(model_dir, create_audio_tokenizer(model=str(encodec), device="cpu"), str(encodec), None,
                           32767, chunk_beats=8 if tiny else 64)
    mapper = infer.Mapper(str(model_dir), str(device)).load()
    # song_s: whole chunks and a short last one (tiny: 8-beat chunks of 3.75 s; else 64 beats of 30 s)
    song_s = 13.0 if tiny else 100.0
    audio = click_song(song_s, np.arange(0.25, song_s, 0.45))
    soundfile.write(work / "song.wav", audio, 24000)
    song = data.encode_song(audio, BPM, mapper.audio_tokenizer, chunk_beats=mapper.chunk_beats)
    report = {"stage": "infer", "device": str(device), "dtype": str(mapper.model.dtype), "chunks": len(song.plan),
              "last_chunk_audio_s": round(song.duration_s - song.start_s(len(song.plan) - 1), 2)}
    report.update(check_logits(mapper, song))
    report.update(batched_equals_one_by_one(mapper, song, device))
    report.update(decode_speed(mapper, song, tiny))
    out, wall_s = run([ROOT / "infer.py", model_dir, "song.wav", "--bpm", BPM, "--temperature", "0",
                       "--output", "song.zip"], work, log, cpu)
    report["infer_py_wall_s"] = round(wall_s, 1)
    report["infer_py_stages"] = next(line for line in out.splitlines() if line.startswith("time: "))
    return report


def rows_of(mapper, song):
    """The prompts and last ticks of every chunk of song, as generate_map builds them."""
    import data
    ticks = data.chunk_ticks(song, (0.0, song.duration_s))
    prompts = [data.prompt_tokens(data.chunk_codes(song.codes, *song.plan[k][2:], mapper.audio_tokenizer.silence))
               for k in ticks]
    return prompts, [ticks[k][1] for k in ticks]


class RawLogits:
    """LogitsProcessor placed first: records whether the model's own scores are finite at every step."""

    def __init__(self):
        self.finite, self.steps = True, 0

    def __call__(self, input_ids, scores):
        import torch
        self.finite &= bool(torch.isfinite(scores).all())
        self.steps += 1
        return scores


def check_logits(mapper, song):
    """Generate every chunk of song in one call with the grammar: the prompts' lengths and the raw logits."""
    import torch
    from transformers import LogitsProcessorList

    import data
    prompts, max_ticks = rows_of(mapper, song)
    raw = RawLogits()
    input_ids = torch.tensor(prompts, device=mapper.model.device)         # one length: a rectangle, no padding
    with torch.no_grad():
        mapper.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              logits_processor=LogitsProcessorList([raw, data.NoteGrammar(len(prompts[0]),
                                                                                         max_ticks)]),
                              do_sample=False, max_new_tokens=64, eos_token_id=data.EOS, pad_token_id=data.PAD,
                              cache_implementation="static")
    assert raw.finite, "non-finite logits"
    return {"prompt_lengths": sorted({len(p) for p in prompts}), "logits_finite": raw.finite,
            "logit_steps_checked": raw.steps}


def batched_equals_one_by_one(mapper, song, device):
    """Greedy notes of two chunks generated together and one at a time, in fp32."""
    import data
    import infer
    model = infer.load_model(mapper.model_dir, "cpu").float().to(device)
    prompts, max_ticks = rows_of(mapper, song)
    greedy = data.Sampling(0, progress=False)
    batched = data.generate_notes(model, prompts[:2], max_ticks[:2], 48, greedy, disable_compile=True)
    single = [data.generate_notes(model, [p], [t], 48, greedy, disable_compile=True)[0]
              for p, t in zip(prompts[:2], max_ticks[:2])]
    del model
    return {"batched_equals_one_by_one_fp32": batched == single}


class GrammarTimer:
    """Wraps data.NoteGrammar.__call__ to add up its seconds."""

    def __init__(self):
        import data
        self.seconds, self.original = 0.0, data.NoteGrammar.__call__
        timer = self

        def timed(grammar, input_ids, scores):
            start_s = time.perf_counter()
            result = timer.original(grammar, input_ids, scores)
            timer.seconds += time.perf_counter() - start_s
            return result
        data.NoteGrammar.__call__ = timed


def decode_speed(mapper, song, tiny):
    """ms per decode step of all chunks in one call, compiled and not: the first compiled call's extra time is the
    compilation; the grammar's share of a step is measured inside the calls."""
    import torch

    import data
    prompts, max_ticks = rows_of(mapper, song)
    steps = 32 if tiny else 256
    figures, timer = {}, GrammarTimer()
    for name, disable_compile in (("uncompiled", True), ("compiled", False)):
        if name == "compiled" and mapper.model.device.type != "cuda":      # generate compiles on CUDA only
            continue
        times_s = []
        for _ in range(2):
            timer.seconds = 0.0
            if mapper.model.device.type == "cuda":
                torch.cuda.synchronize()
            start_s = time.perf_counter()
            data.generate_notes(mapper.model, prompts, max_ticks, steps, data.Sampling(1.0, progress=False),
                                disable_compile=disable_compile)
            if mapper.model.device.type == "cuda":
                torch.cuda.synchronize()
            times_s.append(time.perf_counter() - start_s)
        figures[f"{name}_ms_per_step"] = round(1000 * times_s[1] / steps, 2)
        figures[f"{name}_first_call_extra_s"] = round(times_s[0] - times_s[1], 2)
        figures[f"{name}_grammar_ms_per_step"] = round(1000 * timer.seconds / steps, 2)
    if mapper.model.device.type == "cuda":
        figures["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        figures["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["train", "infer"], required=True, help="which half of the check")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (default: the GPU; exits without one)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and short songs instead of the real sizes")
    parser.add_argument("--steps", type=int, default=None, help="train: optimizer steps (default 12; tiny 3)")
    parser.add_argument("--workdir", default=None, help="folder for models, maps and runs (default: a temp folder; "
                                                        "the models built by one stage are reused by the other)")
    parser.add_argument("--report", default=None, help="also write the stage's figures as JSON to this file")
    args = parser.parse_args(argv)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here (run with --cpu --tiny for the CPU version)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="beatgen-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    start_s = time.perf_counter()
    with open(work / f"gpu_check_{args.stage}.log", "w") as log:
        print(f"gpu_check --stage {args.stage} in {work} …", flush=True)
        if args.stage == "train":
            report = stage_train(work, args.tiny, args.cpu, args.steps or (3 if args.tiny else 12), log)
        else:
            report = stage_infer(work, args.tiny, args.cpu, log)
    report.update({"device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "tiny": args.tiny,
                   "torch": torch.__version__, "stage_wall_s": round(time.perf_counter() - start_s, 1)})
    print("gpu_check " + json.dumps(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
