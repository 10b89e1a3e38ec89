"""One-command check of the real training and generation path on a GPU (not collected by pytest).

    python tests/gpu_check.py                    # one GPU: Qwen3-0.6B architecture + full Encodec 24 kHz, ≈ 6 min
    python tests/gpu_check.py --cpu --tiny       # the same steps on tiny models on the CPU (tests run this)

No hub and no internet: Qwen3-0.6B is built from its config with random weights and the full-size Encodec 24 kHz
with random codebooks, into a temporary folder, with synthetic click songs. Then, as a user runs them:
  1. `python train.py` for STEPS optimizer steps at 30 s chunks (fp32 master weights, bf16 compute), with a
     checkpoint before the last step: tokens/s, peak GPU memory, the loss trend, and the fraction of weights the
     last step changed (that checkpoint vs the final model);
  2. the same last step again, `--resume`d from that checkpoint with --pure_bf16 (weights in bf16, no fp32 copy):
     the fraction of weights it changed;
  3. `python infer.py` on a three-minute song: wall time, generated tokens/s, and the greedy map of one batched
     generate call against the greedy map generated chunk by chunk (--batch_size 1).
Prints a report and writes it as JSON (--report).
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


def run(args, cwd, log, cpu, required=True):
    """One command of the check as a subprocess (a .py runs with this Python) → (stdout, wall seconds); a failure
    ends the check, or returns (None, seconds) when not required."""
    command = [sys.executable, *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    log.write(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}\n")
    log.flush()
    if result.returncode != 0:
        message = f"{' '.join(command[1:3])} … failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
        if required:
            sys.exit(f"gpu_check: {message}")
        print(f"gpu_check: {message}")
        return None, time.perf_counter() - start
    return result.stdout, time.perf_counter() - start


def build_models(work, tiny):
    """Random Qwen3 (tiny or the 0.6B architecture) with a small tokenizer, and a random Encodec → (qwen, encodec)."""
    from tokenizers import Tokenizer, models
    from transformers import EncodecConfig, PreTrainedTokenizerFast

    from conftest import QWEN3_06B, random_encodec_model, random_qwen, tiny_encodec_model, tiny_qwen
    qwen, encodec = work / "qwen", work / "encodec"
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


def click_maps(folder, n_songs, song_s):
    """n_songs map zips of song_s-second click songs at BPM, a note on every click (a random half of the 1/2 beats)."""
    from conftest import click_song, make_map_zip, ogg_bytes
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(n_songs):
        grid = np.arange(0, song_s * BPM / 60 - 1, 0.5)
        beats = np.sort(rng.choice(grid, len(grid) // 2, replace=False))
        audio = click_song(song_s, beats * 60 / BPM, seed=s)
        notes = [(float(b), int(b * 2) % 4, 0, int(b * 2) % 2, 1 - int(b) % 2) for b in beats]
        make_map_zip(folder / f"song{s}.zip", BPM, {"Expert": notes}, ogg_bytes(audio))


def weights(folder):
    """{name: tensor} of a saved model folder's (or checkpoint's) model.safetensors."""
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


def fraction_changed(before, after):
    """Share of all weight values that differ between two {name: tensor}; before is first cast to after's dtype (a
    step on bf16 weights starts from the bf16 copy of the checkpoint) → float."""
    changed = sum(int((before[name].to(after[name].dtype) != after[name]).sum()) for name in after)
    return changed / sum(after[name].numel() for name in after)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (default: the GPU; exits without one)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and short songs instead of the real sizes")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; tiny 3)")
    parser.add_argument("--workdir", default=None, help="folder for models, maps and runs (default: a temp folder)")
    parser.add_argument("--report", default=None, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here (run with --cpu --tiny for the CPU version)")
    steps = args.steps or (3 if args.tiny else 30)
    song_s, chunk_s, accumulate = (16.0, 4.0, 2) if args.tiny else (180.0, 30.0, 4)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="beatgen-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "tiny": args.tiny, "steps": steps,
              "torch": torch.__version__}
    with open(work / "gpu_check.log", "w") as log:
        print(f"building models and songs in {work} …", flush=True)
        qwen, encodec = build_models(work, args.tiny)
        click_maps(work / "maps", 3, song_s)

        train = [ROOT / "train.py", "maps", "--model", qwen, "--audio_model", encodec, "--cache_dir", "cache",
                 "--chunk_duration", chunk_s, "--gradient_accumulation_steps", accumulate, "--learning_rate", "2e-5"]
        out, train_s = run([*train, "--output_dir", "run", "--max_steps", steps, "--save_steps", steps - 1],
                           work, log, args.cpu)
        # "trained N steps, T tokens (X tokens/s this run, peak GPU memory Y GiB)"
        line = next(line for line in out.splitlines() if line.startswith("trained "))
        report["train_tokens_per_s"] = float(re.search(r"\((\d+) tokens/s", line).group(1))
        peak = re.search(r"peak GPU memory ([\d.]+) GiB", line)
        report["train_peak_gpu_gib"] = float(peak.group(1)) if peak else None
        report["train_wall_s"] = round(train_s, 1)
        before_last = work / "run" / f"checkpoint-{steps - 1}"
        state = json.loads((before_last / "trainer_state.json").read_text())
        report["loss"] = [round(h["loss"], 4) for h in state["log_history"] if "loss" in h]
        report["last_step_learning_rate"] = 2e-5 / steps          # the linear schedule's last value
        report["last_step_changed_fp32_master"] = fraction_changed(weights(before_last), weights(work / "run"))
        # the same last step with bf16 weights: resume from that checkpoint with --pure_bf16
        (work / "bf16").mkdir()
        os.symlink(before_last, work / "bf16" / before_last.name)
        out, _ = run([*train, "--output_dir", "bf16", "--max_steps", steps, "--save_steps", steps, "--resume",
                      "--pure_bf16"], work, log, args.cpu, required=False)
        report["last_step_changed_pure_bf16"] = (None if out is None else
                                                 fraction_changed(weights(before_last), weights(work / "bf16")))

        from conftest import click_song
        import soundfile
        soundfile.write(work / "song.wav", click_song(song_s, np.arange(0.25, song_s, 0.45)), 24000)
        infer = [ROOT / "infer.py", "run", "song.wav", "--bpm", BPM, "--temperature", "0"]
        out, infer_s = run([*infer, "--output", "batched.dat"], work, log, args.cpu)
        report["infer_wall_s"] = round(infer_s, 1)
        # "generated C chunks: T tokens in S s (X tokens/s)"
        generated = re.search(r"generated (\d+) chunks: (\d+) tokens in ([\d.]+) s \((\d+) tokens/s\)", out)
        report["infer_chunks"], report["infer_tokens"] = int(generated.group(1)), int(generated.group(2))
        report["infer_generate_s"], report["infer_tokens_per_s"] = float(generated.group(3)), int(generated.group(4))
        run([*infer, "--output", "single.dat", "--batch_size", "1"], work, log, args.cpu)
        batched, single = (json.loads((work / name).read_text())["colorNotes"] for name in ("batched.dat", "single.dat"))
        report["batched_equals_chunk_by_chunk"] = batched == single
        report["notes_batched"], report["notes_chunk_by_chunk"] = len(batched), len(single)

    print("\n".join(f"{key:32s} {value}" for key, value in report.items()))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
