"""Fine-tune Qwen3-0.6B-Base (all weights, Unsloth + TRL) to write note tokens after audio tokens.

    python train.py maps/ --output_dir runs/first
    python train.py maps/ --output_dir runs/first --resume            # continue from the last checkpoint
    accelerate launch train.py maps/ --output_dir runs/ddp           # several GPUs (DDP, one process per GPU)

MAPS_DIR holds map zips (see scrape.py). The output folder receives checkpoints, the final model, the tokenizer
and beatgen.json (what infer.py needs to rebuild the token space and the audio tokenizer).
"""

import argparse
import math
import os
import sys


def load_model(model_name, max_seq_length):
    """Unsloth full fine-tune, as the original spec shows. Returns (model, tokenizer)."""
    try:
        from unsloth import FastLanguageModel
    except ImportError as e:
        sys.exit(f"train.py needs Unsloth ({e}). Install the project with: pip install -e .  (or: pip install unsloth)")
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_name,
        max_seq_length=max_seq_length,
        load_in_4bit=True,          # as the original spec; Unsloth turns 4-bit off for full fine-tuning
        full_finetuning=True,
        trust_remote_code=True,
    )
    model.gradient_checkpointing_enable()
    return model, tokenizer


# BeatDatasets by id(): datasets fingerprints (pickles) a generator's arguments, and the audio model inside a
# BeatDataset cannot be pickled, so the generator receives only this key
_BEAT_DATASETS = {}


def _generate(indices, key):
    for i in indices:
        yield _BEAT_DATASETS[key][i]


def training_dataset(beat_dataset, seed):
    """BeatDataset → datasets.IterableDataset of {"input_ids"}; each chunk index is a shard, so shuffle() reorders all."""
    import datasets
    _BEAT_DATASETS[id(beat_dataset)] = beat_dataset
    iterable = datasets.IterableDataset.from_generator(
        _generate, gen_kwargs={"indices": list(range(len(beat_dataset))), "key": id(beat_dataset)})
    return iterable.shuffle(seed=seed)


def main(args):
    # Unsloth patches transformers and TRL, so it is imported (inside load_model) before them
    model, tokenizer = load_model(args.model, args.max_seq_length + 1)
    import torch
    from trl import SFTConfig, SFTTrainer

    from audio import create_audio_tokenizer
    from data import BOS, EOS, PAD, BeatDataset, audio_masking_collator, save_metadata
    from maps import ZippedBeatSaberDataset

    audio_tokenizer = create_audio_tokenizer(bandwidth=args.bandwidth, model=args.audio_model)
    maps = ZippedBeatSaberDataset(args.maps_dir, difficulties=args.difficulties, chain_notes=args.chain_notes)
    beat_dataset = BeatDataset(maps, chunk_duration=args.chunk_duration, max_seq_length=args.max_seq_length,
                               cache_dir=args.cache_dir, audio_tokenizer=audio_tokenizer)
    if args.max_samples:
        beat_dataset.chunks = beat_dataset.chunks[:args.max_samples]
    if len(beat_dataset) == 0:
        sys.exit(f"{args.maps_dir}: no usable training chunks (maps skipped: {dict(maps.skipped)})")
    print(f"{len(maps)} difficulties, {len(beat_dataset)} chunks; skipped: "
          f"{dict(maps.skipped + beat_dataset.skipped) or 'none'}")

    batch_size, grad_accum = 1, args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(beat_dataset) / (batch_size * grad_accum))
    max_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    save_metadata(args.output_dir, audio_tokenizer, args.audio_model, args.chunk_duration, args.max_seq_length)

    trainer = SFTTrainer(
        model=model,
        train_dataset=training_dataset(beat_dataset, seed=3407),
        processing_class=tokenizer,       # only saved next to the model; the data is already token ids
        data_collator=audio_masking_collator,
        args=SFTConfig(
            output_dir=args.output_dir,
            per_device_train_batch_size=batch_size,   # long sequences need a small batch
            gradient_accumulation_steps=grad_accum,   # simulates a larger batch
            max_steps=max_steps,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            logging_steps=1,
            save_steps=args.save_steps,
            save_total_limit=4,
            optim="adamw_8bit",
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            remove_unused_columns=False,
            dataloader_drop_last=False,
            max_length=None,                          # never truncate: a chunk is up to max_seq_length tokens
            packing=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            report_to=args.report_to,
        ),
    )
    resume = args.resume and any(name.startswith("checkpoint-") for name in os.listdir(args.output_dir))
    trainer.train(resume_from_checkpoint=True if resume else None)
    # TRL aligned these ids with the text tokenizer; the saved model's own generate() should use ours
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS, EOS, PAD
    tokenizer.save_pretrained(args.output_dir)
    trainer.save_model(args.output_dir)
    print(f"model written to {args.output_dir}")
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
                        help="sequences per optimizer step (batch size is 1)")
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
    main(parse_args())
