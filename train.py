"""Fine-tune Qwen3-0.6B-Base (all weights, Unsloth + TRL) to write note tokens after audio tokens.

    python train.py maps/ --output_dir runs/first
    python train.py maps/ --output_dir runs/first --resume            # continue from the last checkpoint
    torchrun --nproc_per_node 4 train.py maps/ --output_dir runs/ddp  # several GPUs (DDP, one process per GPU)

MAPS_DIR holds map zips (see scrape.py). The output folder receives checkpoints, the final model, the tokenizer
and beatgen.json (what infer.py needs to rebuild the token space and the audio tokenizer).
"""

import argparse
import math
import os
import sys


def load_model(model_name, max_seq_length, pure_bf16=False):
    """Unsloth full fine-tune, as the original spec shows. Returns (model, tokenizer).

    Weights stay in fp32 with bf16 compute (float32_mixed_precision on GPUs with bf16), which is what the original
    spec's bf16=True means; Unsloth's own default where bf16 exists (pure_bf16) stores the weights in bf16."""
    import torch
    try:
        from unsloth import FastLanguageModel
    except ImportError as e:
        sys.exit(f"train.py needs Unsloth ({e}). Install the project with: pip install -e .  (or: pip install unsloth)")
    # on a GPU Unsloth loads bf16 weights where the GPU has bf16; its CPU backend does too where the CPU has bf16
    # (AMX, AVX512-BF16) and takes no float32_mixed_precision, so there the weights' dtype is chosen directly
    precision = ({"float32_mixed_precision": not pure_bf16} if torch.cuda.is_available()
                 else {"dtype": torch.bfloat16 if pure_bf16 else torch.float32})
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_name,
        max_seq_length=max_seq_length,
        load_in_4bit=True,          # as the original spec; Unsloth turns 4-bit off for full fine-tuning
        full_finetuning=True,
        trust_remote_code=True,
        **precision,
    )
    model.gradient_checkpointing_enable()
    return model, tokenizer


def training_dataset(beat_dataset, seed):
    """BeatDataset → datasets.IterableDataset of {"input_ids"}: data.training_stream, one shard, endless epochs.

    Under several processes accelerate gives rank r every world_size-th item of this one stream (dispatch_batches
    off), so the ranks train on disjoint chunks that together cover each epoch once."""
    import datasets

    from data import training_stream
    return datasets.IterableDataset.from_generator(training_stream, gen_kwargs={"dataset": beat_dataset, "seed": seed})


def main(args):
    import utils
    from maps import ZippedBeatSaberDataset
    maps = ZippedBeatSaberDataset(args.maps_dir, difficulties=args.difficulties,
                                  chain_notes=utils.chains_to_notes if args.chain_notes else None)
    # Unsloth patches transformers and TRL, so it is imported (inside load_model) before them
    model, tokenizer = load_model(args.model, args.max_seq_length + 1, args.pure_bf16)
    import torch
    from accelerate import PartialState
    from trl import SFTConfig, SFTTrainer

    from audio import create_audio_tokenizer
    from data import BOS, EOS, PAD, BeatDataset, audio_masking_collator, save_metadata

    native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=1,                # long sequences need a small batch
        gradient_accumulation_steps=args.gradient_accumulation_steps,   # simulates a larger batch
        max_steps=max(args.max_steps, 1),             # set below once the dataset's size is known
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
    )
    # state = this process among state.num_processes (torchrun / accelerate launch start one per GPU)
    state = PartialState()
    main_process = state.is_main_process
    audio_tokenizer = create_audio_tokenizer(bandwidth=args.bandwidth, model=args.audio_model, device=state.device)
    beat_dataset = BeatDataset(maps, chunk_duration=args.chunk_duration, max_seq_length=args.max_seq_length,
                               cache_dir=args.cache_dir, audio_tokenizer=audio_tokenizer)
    if args.max_samples:
        beat_dataset.chunks = beat_dataset.chunks[:args.max_samples]
    if len(beat_dataset) == 0:
        raise ValueError(f"{args.maps_dir}: no usable training chunks "
                         f"(skipped: {dict(maps.skipped + beat_dataset.skipped)})")
    # each process encodes its share of the songs into the shared cache, then every process has them all
    beat_dataset.encode_songs(part=(state.process_index, state.num_processes), progress=main_process)
    state.wait_for_everyone()
    beat_dataset.encode_songs(progress=main_process)

    # sequences per optimizer step, all processes together
    sequences_per_step = config.gradient_accumulation_steps * state.num_processes
    steps_per_epoch = math.ceil(len(beat_dataset) / sequences_per_step)
    config.max_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    if main_process:
        print(f"{len(maps)} difficulties, {len(beat_dataset)} chunks; skipped: "
              f"{dict(maps.skipped + beat_dataset.skipped) or 'none'}")
        print(f"{config.max_steps} steps of {sequences_per_step} sequences ({state.num_processes} "
              f"process{'es' if state.num_processes > 1 else ''}): "
              f"{config.max_steps * sequences_per_step / len(beat_dataset):.2f} epochs")
        # a local Encodec folder is recorded as an absolute path, so infer.py finds it from any working directory
        audio_model = os.path.abspath(args.audio_model) if os.path.isdir(args.audio_model) else args.audio_model
        save_metadata(args.output_dir, audio_tokenizer, audio_model, args.chunk_duration, args.max_seq_length)

    trainer = SFTTrainer(
        model=model,
        train_dataset=training_dataset(beat_dataset, seed=config.seed),
        processing_class=tokenizer,       # only saved next to the model; the data is already token ids
        data_collator=audio_masking_collator,
        args=config,
    )
    resume = args.resume and os.path.isdir(args.output_dir) and any(
        name.startswith("checkpoint-") for name in os.listdir(args.output_dir))
    if args.resume and not resume and main_process:
        print(f"no checkpoint in {args.output_dir}: starting from {args.model}")
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    # TRL aligned these ids with the text tokenizer; the saved model's own generate() should use ours
    for model_config in (model.config, model.generation_config):
        model_config.bos_token_id, model_config.eos_token_id, model_config.pad_token_id = BOS, EOS, PAD
    trainer.save_model(args.output_dir)
    if main_process:
        tokenizer.save_pretrained(args.output_dir)
        tokens_per_s = trainer.state.num_input_tokens_seen / max(result.metrics["train_runtime"], 1e-9)
        peak = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                if torch.cuda.is_available() else "")
        print(f"trained {trainer.state.global_step} steps, {trainer.state.num_input_tokens_seen} tokens "
              f"({tokens_per_s:.0f} tokens/s this run{peak}); model written to {args.output_dir}")
    return trainer


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
    parser.add_argument("--chunk_duration", type=float, default=30.0, help="seconds of audio per training sequence")
    parser.add_argument("--max_seq_length", type=int, default=32767, help="longer chunks are skipped, never cut")
    parser.add_argument("--cache_dir", default=None, help="audio-code cache (default ~/.cache/beatgen/audio_codes)")
    parser.add_argument("--max_samples", type=int, default=0, help="train on the first N chunks only; 0: all")
    parser.add_argument("--difficulties", nargs="+", default=["Expert", "ExpertPlus"],
                        help="Standard difficulties to train on")
    parser.add_argument("--chain_notes", action="store_true", help="also train on the notes v3 chains stand for")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    parser.add_argument("--report_to", default="none", help="'none', 'tensorboard', 'wandb', ...")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
