"""Benchmark (not part of the test run): generation speed on CPU with a tiny random Qwen3.

    .venv/bin/python tests/bench_infer.py [--hidden 256 --layers 4] [--qwen3_06b]

1. all chunks of a song in one batched generate call vs one call per chunk (target ≥ 3× faster);
2. the cost of the note grammar, and of the play constraint on top of it, all 18 chunks batched (target ≤ 10 % of
   generation time), and the grammar's cost per step for a batch of 16 with Qwen's full 151,936-token vocabulary;
3. static vs dynamic KV cache per token at a long (30 s chunk, ~4.5k token) prompt;
4. training tokens/s through train.py's Unsloth/TRL path.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import utils  # noqa: E402


def tiny_model(hidden, layers):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=14592, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=8192, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config).eval()


def qwen3_06b():
    """The Qwen3-0.6B-Base architecture (its config.json values) with random weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from conftest import QWEN3_06B
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**QWEN3_06B)).eval()


def cache_comparison(model, prompt, new_tokens, repeat):
    """Per-token decode time with the dynamic and the static KV cache after one long prompt."""
    for cache in ("dynamic", "static"):
        elapsed = timed(lambda: generate(model, prompt, new_tokens, cache=cache), repeat)
        short = timed(lambda: generate(model, prompt, 1, cache=cache), repeat)
        per_token_ms = (elapsed - short) / (new_tokens - 1) * 1000
        print(f"{cache} cache, {len(prompt[0])}-token prompt: {per_token_ms:.1f} ms per generated token "
              f"(prefill {short:.2f} s)")


def timed(fn, repeat=2):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def play_states(n, seconds=10.0, bpm=120.0):
    """n utils.PlayStates (ExpertPlus) for chunks of `seconds` at bpm, the audio with an onset every 0.25 s."""
    times_s = np.arange(int(seconds * bpm / 60 * data.PPQ)) * 60 / bpm / data.PPQ
    return [utils.PlayState(utils.DIFFICULTIES["ExpertPlus"], times_s, data.NOTE_TYPE_FIELDS,
                            np.arange(0.1, seconds, 0.25)) for _ in range(n)]


def generate(model, prompts, new_tokens, grammar=True, cache="static", play=False):
    """new_tokens ids for every prompt (EOS held back by min_new_tokens so every run does the same work); play: the
    play constraint too (10 s chunks at 120 BPM, longer than new_tokens can fill, so EOS is never needed)."""
    from transformers import LogitsProcessorList
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), data.PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    states = play_states(len(prompts)) if play else None
    processors = LogitsProcessorList([data.NoteGrammar(length, [12287] * len(prompts), states)] if grammar else [])
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, logits_processor=processors, do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=data.EOS,
                       pad_token_id=data.PAD, cache_implementation=cache)


def grammar_step_ms(batch, vocab, steps, play):
    """Mean ms of one NoteGrammar call for a (batch, vocab) score matrix over `steps` generated tokens."""
    grammar = data.NoteGrammar(1, [959] * batch, play_states(batch) if play else None, max_new_tokens=steps + 10)
    rows = torch.zeros(batch, 1, dtype=torch.long)
    elapsed_s = 0.0
    for _ in range(steps):
        scores = torch.randn(batch, vocab)
        start = time.perf_counter()
        masked = grammar(rows, scores)
        elapsed_s += time.perf_counter() - start
        rows = torch.cat([rows, masked.argmax(dim=1, keepdim=True)], dim=1)
    return elapsed_s / steps * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--qwen3_06b", action="store_true", help="also compare KV caches on the real 0.6B architecture")
    args = parser.parse_args(argv)
    model = tiny_model(args.hidden, args.layers)
    rng = np.random.default_rng(0)
    print(f"tiny Qwen3 hidden {args.hidden}, {args.layers} layers, {torch.get_num_threads()} threads")

    # a 3-minute song in 10 s chunks: 18 prompts of 750 frames
    prompts = [data.prompt_tokens(rng.integers(0, 1024, (750, 2))) for _ in range(18)]
    batched = timed(lambda: generate(model, prompts, args.new_tokens), repeat=1)
    one_by_one = timed(lambda: [generate(model, [p], args.new_tokens) for p in prompts], repeat=1)
    print(f"18 chunks × {len(prompts[0])} prompt tokens, {args.new_tokens} new each: batched {batched:.1f} s, "
          f"chunk by chunk {one_by_one:.1f} s → {one_by_one / batched:.1f}× faster "
          f"({18 * args.new_tokens / batched:.0f} generated tokens/s batched)")

    with_grammar = timed(lambda: generate(model, prompts[:6], args.new_tokens))
    without = timed(lambda: generate(model, prompts[:6], args.new_tokens, grammar=False))
    print(f"grammar: {with_grammar:.2f} s with, {without:.2f} s without → {(with_grammar / without - 1) * 100:+.1f} %")
    token_grammar = timed(lambda: generate(model, prompts, args.new_tokens), repeat=2)
    constrained = timed(lambda: generate(model, prompts, args.new_tokens, play=True), repeat=2)
    print(f"play constraint, 18 chunks batched: {constrained:.2f} s with, {token_grammar:.2f} s with the token grammar "
          f"alone → {(constrained / token_grammar - 1) * 100:+.1f} %")
    for play in (False, True):
        print(f"grammar step, batch 16, Qwen's 151,936-token vocabulary, {'with' if play else 'without'} the play "
              f"constraint: {grammar_step_ms(16, 151936, 64, play):.2f} ms")

    long_prompt = [data.prompt_tokens(rng.integers(0, 1024, (2250, 2)))]
    cache_comparison(model, long_prompt, args.new_tokens, repeat=2)
    if args.qwen3_06b:
        print("Qwen3-0.6B architecture, random weights:")
        cache_comparison(qwen3_06b(), long_prompt, 17, repeat=1)

    training_speed(args.hidden, args.layers)


def training_speed(hidden, layers):
    """Tokens/s of train.main on 30 s chunks (~4.5k tokens) of click songs."""
    from conftest import click_song, make_map_zip, ogg_bytes, tiny_encodec_model
    import train
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(2):
            beats = np.arange(0, 120, 0.5)
            make_map_zip(f"{tmp}/s{s}.zip", 120.0, {"Expert": [(float(b), 1, 0, 0, 1) for b in beats]},
                         ogg_bytes(click_song(60.0, beats * 0.5, seed=s)))
        tiny_model(hidden, layers).save_pretrained(f"{tmp}/qwen")
        tiny_encodec_model().save_pretrained(f"{tmp}/enc")
        trainer = train.main(train.parse_args([tmp, "--output_dir", f"{tmp}/out", "--model", f"{tmp}/qwen",
                                               "--audio_model", f"{tmp}/enc", "--cache_dir", f"{tmp}/cache",
                                               "--max_steps", "3", "--gradient_accumulation_steps", "2"]))
        logs = [h for h in trainer.state.log_history if "num_tokens" in h]
        summary = trainer.state.log_history[-1]
        print(f"training: {logs[-1]['num_tokens'] / summary['train_runtime']:.0f} tokens/s "
              f"({logs[-1]['num_tokens']:.0f} tokens in {summary['train_runtime']:.1f} s, batch 1, gradient checkpointing)")


if __name__ == "__main__":
    main()
