"""Fine-tune Qwen3-0.6B-Base (all weights, Unsloth + TRL) to write note tokens after audio tokens.

    python train.py maps/ --output_dir runs/first
    python train.py maps/ --output_dir runs/first --resume            # continue from the last checkpoint
    torchrun --nproc_per_node 4 train.py maps/ --output_dir runs/ddp  # several GPUs (DDP, one process per GPU)

MAPS_DIR holds map zips (see scrape.py). The output folder receives checkpoints, the final model, the tokenizer
and beatgen.json (what infer.py needs to rebuild the token space and the audio tokenizer). With enough songs a few
are held out (heldout.txt): their loss is logged during training, and at the end the model maps some of them and
scores them against their human maps (evaluation/).
"""

import argparse
import math
import os
import sys

import numpy as np
import torch

import infer
import utils
from audio import create_audio_tokenizer, load_failure
from data import (BOS, EOS, PAD, BeatDataset, audio_masking_collator, held_out_stream, save_metadata, split_by_song,
                  training_stream)
from maps import ZippedBeatSaberDataset, write_atomic

CHUNK_BEATS = 64            # default whole beats per chunk: 16 bars of 4/4, 30 s at 128 BPM
EVAL_FRACTION = 0.05        # share of the songs held out by default ...
EVAL_MIN_SONGS = 40         # ... when there are at least this many (2 held out)
HELD_OUT_FILE = "heldout.txt"   # the held-out map files, one path a line (infer.py --evaluate reads it)


def load_model(model_name, max_seq_length, pure_bf16=False):
    """Unsloth full fine-tune, as the original spec shows. Returns (model, tokenizer); ValueError when the model
    cannot be loaded (a hub id with no internet, a folder that is not a model).

    Weights stay in fp32 with bf16 compute (float32_mixed_precision on GPUs with bf16), which is what the original
    spec's bf16=True means; Unsloth's own default where bf16 exists (pure_bf16) stores the weights in bf16."""
    try:
        from unsloth import FastLanguageModel       # it patches transformers and TRL, so it is imported before them
    except ImportError as e:
        sys.exit(f"train.py needs Unsloth ({e}). Install the project with: pip install -e .  (or: pip install unsloth)")
    # on a GPU Unsloth loads bf16 weights where the GPU has bf16; its CPU backend does too where the CPU has bf16
    # (AMX, AVX512-BF16) and takes no float32_mixed_precision, so there the weights' dtype is chosen directly
    precision = ({"float32_mixed_precision": not pure_bf16} if torch.cuda.is_available()
                 else {"dtype": torch.bfloat16 if pure_bf16 else torch.float32})
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=model_name,
            max_seq_length=max_seq_length,
            load_in_4bit=True,          # as the original spec; Unsloth turns 4-bit off for full fine-tuning
            full_finetuning=True,
            trust_remote_code=True,
            **precision,
        )
    except (OSError, ValueError) as e:
        raise load_failure("the base model", model_name, e, "--model") from None
    model.gradient_checkpointing_enable()
    return model, tokenizer


def gpu_ready(device_type):
    """ValueError unless training on device_type can start: on CUDA, Unsloth's kernels and block compile are built
    by Triton, which needs a C compiler and the Python headers (utils.compile_problem)."""
    problem = utils.compile_problem() if device_type == "cuda" else None
    if problem:
        raise ValueError(f"training on the GPU builds Unsloth's kernels with Triton, which needs {problem} "
                         "(Debian/Ubuntu: sudo apt install build-essential python3-dev)")


def training_dataset(beat_dataset, seed):
    """BeatDataset → datasets.IterableDataset of {"input_ids"}: data.training_stream, one shard, endless epochs.

    Under several processes accelerate gives rank r every world_size-th item of this one stream (dispatch_batches
    off), so the ranks train on disjoint chunks that together cover each epoch once."""
    import datasets         # after Unsloth (load_model): it imports transformers
    return datasets.IterableDataset.from_generator(training_stream, gen_kwargs={"dataset": beat_dataset, "seed": seed})


def held_out_dataset(beat_dataset):
    """The held-out BeatDataset → datasets.IterableDataset of its chunks, each once (data.held_out_stream); the
    processes of a multi-GPU run each evaluate a share and the trainer combines the losses."""
    import datasets
    return datasets.IterableDataset.from_generator(held_out_stream, gen_kwargs={"dataset": beat_dataset})


def sft_config(args, evaluating):
    """The original spec's training arguments as a TRL SFTConfig (corrections.md §3), with held-out evaluation every
    args.eval_steps when evaluating."""
    from trl import SFTConfig
    native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=1,                # long sequences need a small batch
        gradient_accumulation_steps=args.gradient_accumulation_steps,   # simulates a larger batch
        max_steps=max(args.max_steps, 1),             # set in main once the dataset's size is known
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        logging_steps=1,
        save_steps=args.save_steps,
        save_total_limit=4,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        bf16=native_bf16,                             # autocast over fp32 master weights (see load_model)
        fp16=torch.cuda.is_available() and not native_bf16,
        use_cpu=not torch.cuda.is_available(),        # several CPU processes (torchrun) then talk over gloo
        remove_unused_columns=False,
        dataloader_drop_last=False,
        max_length=None,                              # never truncate: a chunk is up to max_seq_length tokens
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        # each process reads its own batches: dispatching concatenates batches, and ours differ in length
        accelerator_config={"dispatch_batches": False},
        include_num_input_tokens_seen="non_padding",
        report_to=args.report_to,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=args.eval_steps,
        per_device_eval_batch_size=1,
        metric_for_best_model="eval_loss" if evaluating else None,
        greater_is_better=False,
        load_best_model_at_end=evaluating and args.load_best,
    )


def chunk_data(args, state, audio_tokenizer):
    """The maps folder → (maps, training BeatDataset, held-out BeatDataset or None), every song encoded into the
    cache (each process its share of the songs, then all of them)."""
    maps = ZippedBeatSaberDataset(args.maps_dir, difficulties=args.difficulties,
                                  chain_notes=utils.chains_to_notes if args.chain_notes else None)
    beat_dataset = BeatDataset(maps, chunk_duration=args.chunk_duration, max_seq_length=args.max_seq_length,
                               cache_dir=args.cache_dir, audio_tokenizer=audio_tokenizer, chunk_beats=args.chunk_beats)
    train_set, held_out = split_by_song(beat_dataset, eval_fraction(args, beat_dataset))
    if args.max_samples:
        train_set.chunks = train_set.chunks[:args.max_samples]
    if len(train_set) == 0:
        raise ValueError(f"{args.maps_dir}: no usable training chunks "
                         f"(skipped: {dict(maps.skipped + beat_dataset.skipped)})")
    beat_dataset.encode_songs(part=(state.process_index, state.num_processes), progress=state.is_main_process)
    state.wait_for_everyone()
    beat_dataset.encode_songs(progress=state.is_main_process)
    return maps, train_set, held_out if len(held_out) else None


def eval_fraction(args, beat_dataset):
    """--eval_fraction, or by default EVAL_FRACTION of the songs when there are at least EVAL_MIN_SONGS, else 0."""
    if args.eval_fraction is not None:
        return args.eval_fraction
    return EVAL_FRACTION if beat_dataset.n_songs() >= EVAL_MIN_SONGS else 0.0


def main(args):
    gpu_ready("cuda" if torch.cuda.is_available() else "cpu")
    # Unsloth patches transformers and TRL, so it is imported (inside load_model) before them
    model, tokenizer = load_model(args.model, args.max_seq_length + 1, args.pure_bf16)
    from accelerate import PartialState
    from trl import SFTTrainer
    # state = this process among state.num_processes (torchrun / accelerate launch start one per GPU)
    state = PartialState()
    audio_tokenizer = create_audio_tokenizer(bandwidth=args.bandwidth, model=args.audio_model, device=state.device)
    maps, train_set, held_out = chunk_data(args, state, audio_tokenizer)
    config = sft_config(args, held_out is not None)
    # sequences per optimizer step, all processes together
    sequences_per_step = config.gradient_accumulation_steps * state.num_processes
    config.max_steps = (args.max_steps if args.max_steps > 0
                        else math.ceil(len(train_set) / sequences_per_step) * args.num_train_epochs)
    if state.is_main_process:
        describe_data(args, maps, train_set, held_out, config.max_steps, (sequences_per_step, state.num_processes))
        # a local Encodec folder is recorded as an absolute path, so infer.py finds it from any working directory
        audio_model = os.path.abspath(args.audio_model) if os.path.isdir(args.audio_model) else args.audio_model
        save_metadata(args.output_dir, audio_tokenizer, audio_model, args.chunk_duration, args.max_seq_length,
                      args.chunk_beats)
    trainer = SFTTrainer(model=model, train_dataset=training_dataset(train_set, seed=config.seed),
                         eval_dataset=held_out_dataset(held_out) if held_out else None,
                         processing_class=tokenizer,      # only saved next to the model; the data is already token ids
                         data_collator=audio_masking_collator, args=config)
    resume = args.resume and os.path.isdir(args.output_dir) and any(
        name.startswith("checkpoint-") for name in os.listdir(args.output_dir))
    if args.resume and not resume and state.is_main_process:
        print(f"no checkpoint in {args.output_dir}: starting from {args.model}")
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    # TRL aligned these ids with the text tokenizer; the saved model's own generate() should use ours
    for model_config in (model.config, model.generation_config):
        model_config.bos_token_id, model_config.eos_token_id, model_config.pad_token_id = BOS, EOS, PAD
    trainer.save_model(args.output_dir)
    if state.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        print("\n".join(summary(trainer, result, args)))
        if held_out and args.eval_songs:
            evaluate_held_out(args, trainer)
    return trainer


def describe_data(args, maps, train_set, held_out, steps, processes):
    """Print what will be trained on: difficulties, chunks, skips, the held-out songs (written to heldout.txt),
    steps and epochs; processes = (sequences per step, number of processes)."""
    sequences_per_step, n_processes = processes
    print(f"{len(maps)} difficulties, {len(train_set)} chunks; skipped: "
          f"{dict(maps.skipped + train_set.skipped) or 'none'}")
    if held_out:
        path = os.path.join(args.output_dir, HELD_OUT_FILE)
        write_atomic(path, "".join(f"{source}\n" for source in held_out.song_sources()))
        print(f"held out: {held_out.n_songs()} songs ({len(held_out)} chunks), listed in {path}; "
              f"loss on them every {args.eval_steps} steps")
    else:
        print("held out: none (--eval_fraction 0, or fewer than "
              f"{EVAL_MIN_SONGS} songs; pass --eval_fraction to hold some out)")
    print(f"{steps} steps of {sequences_per_step} sequences ({n_processes} "
          f"process{'es' if n_processes > 1 else ''}): {steps * sequences_per_step / len(train_set):.2f} epochs")


def summary(trainer, result, args):
    """Lines on the run: steps, tokens, tokens/s, the first step (warm-up, compilation) and the median later step,
    peak GPU memory; with held-out songs, the held-out loss of each evaluation and the best checkpoint."""
    state = trainer.state
    tokens_per_s = state.num_input_tokens_seen / max(result.metrics["train_runtime"], 1e-9)
    # runtimes = [s since the start of training at each logged step]
    runtimes = [h["train_runtime"] for h in state.log_history if "loss" in h and "train_runtime" in h]
    steps = (f"; first step {runtimes[0]:.1f} s (warm-up, compilation), then {np.median(np.diff(runtimes)):.2f} s "
             "a step" if len(runtimes) > 2 else "")
    peak = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved" if torch.cuda.is_available() else "")
    lines = [f"trained {state.global_step} steps, {state.num_input_tokens_seen} tokens ({tokens_per_s:.0f} tokens/s "
             f"this run{steps}{peak}); model written to {args.output_dir}"]
    evaluations = [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h]
    if evaluations:
        lines.append("held-out loss: " + ", ".join(f"step {step} {loss:.4f}" for step, loss in evaluations))
        lines.append(f"lowest held-out loss {state.best_metric:.4f}: {state.best_model_checkpoint}"
                     + (" (loaded as the final model: --load_best)" if args.load_best else ""))
    return lines


def evaluate_held_out(args, trainer):
    """Map up to --eval_songs held-out songs with the final model and score them against their human maps
    (infer.evaluate) into <output_dir>/evaluation."""
    trainer.model.to("cpu")
    torch.cuda.empty_cache()
    mapper = infer.Mapper(args.output_dir)
    infer.evaluate(mapper, os.path.join(args.output_dir, HELD_OUT_FILE), os.path.join(args.output_dir, "evaluation"),
                   max_songs=args.eval_songs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("maps_dir", help="folder of map zips")
    parser.add_argument("--output_dir", required=True, help="where checkpoints and the final model go")
    parser.add_argument("--model", default="unsloth/Qwen3-0.6B-Base", help="hub id or local folder of the base model")
    parser.add_argument("--audio_model", default="facebook/encodec_24khz", help="hub id or local folder of Encodec")
    parser.add_argument("--bandwidth", type=float, default=1.5, help="Encodec bandwidth in kbps (1.5 → 2 codebooks)")
    parser.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; -1: --num_train_epochs epochs")
    parser.add_argument("--num_train_epochs", type=int, default=3, help="epochs when --max_steps is -1")
    parser.add_argument("--learning_rate", type=float, default=2e-5, help="peak learning rate (linear decay to 0)")
    parser.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps; 0: none")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8,
                        help="sequences per optimizer step and process (batch size is 1)")
    parser.add_argument("--pure_bf16", action="store_true",
                        help="keep the weights in bf16 with no fp32 master copy (saves ~2.4 GB of GPU memory on "
                             "0.6B parameters, for small GPUs); but an update smaller than half a weight's bf16 "
                             "spacing rounds away, which at lr 2e-5 is most updates (README: Precision). "
                             "Default: fp32 master weights, bf16 compute")
    parser.add_argument("--save_steps", type=int, default=500, help="checkpoint every N steps (4 are kept)")
    parser.add_argument("--chunk_beats", type=int, default=None,
                        help=f"whole beats per training sequence (default {CHUNK_BEATS}: the length of the audio "
                             "tells the model how long a beat is; spec.md, Chunking)")
    parser.add_argument("--chunk_duration", type=float, default=None,
                        help="instead of --chunk_beats: as many whole beats as fit in this many seconds")
    parser.add_argument("--max_seq_length", type=int, default=32767, help="longer chunks are skipped, never cut")
    parser.add_argument("--cache_dir", default=None, help="audio-code cache (default ~/.cache/beatgen/audio_codes)")
    parser.add_argument("--max_samples", type=int, default=0, help="train on the first N chunks only; 0: all")
    parser.add_argument("--difficulties", nargs="+", default=["Expert", "ExpertPlus"],
                        help="Standard difficulties to train on")
    parser.add_argument("--chain_notes", action="store_true", help="also train on the notes v3 chains stand for")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    parser.add_argument("--report_to", default="none", help="'none', 'tensorboard', 'wandb', ...")
    parser.add_argument("--eval_fraction", type=float, default=None,
                        help=f"share of the songs held out (whole songs, by the audio's hash; listed in "
                             f"{HELD_OUT_FILE}); 0: none. Default {EVAL_FRACTION} with at least {EVAL_MIN_SONGS} "
                             "songs, else none")
    parser.add_argument("--eval_steps", type=int, default=500, help="held-out loss every N steps")
    parser.add_argument("--load_best", action="store_true",
                        help="keep the checkpoint with the lowest held-out loss as the final model (--save_steps "
                             "must be a multiple of --eval_steps)")
    parser.add_argument("--eval_songs", type=int, default=4,
                        help="after training, map this many held-out songs and score them against their human maps "
                             "(infer.py --evaluate, into <output_dir>/evaluation); 0: skip")
    args = parser.parse_args(argv)
    if args.chunk_beats is not None and args.chunk_duration is not None:
        parser.error("give --chunk_beats or --chunk_duration, not both")
    if args.chunk_beats is None and args.chunk_duration is None:
        args.chunk_beats = CHUNK_BEATS
    if not ((args.chunk_beats or 0) >= 1 or (args.chunk_duration or 0) > 0):
        parser.error("--chunk_beats must be ≥ 1 and --chunk_duration > 0")
    if args.eval_fraction is not None and not 0 <= args.eval_fraction < 1:
        parser.error("--eval_fraction must be in [0, 1)")
    if args.load_best and args.save_steps % args.eval_steps:
        parser.error("--load_best needs --save_steps a multiple of --eval_steps")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
