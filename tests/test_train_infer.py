"""train.py and infer.py on tiny random models: the real Unsloth/TRL path on CPU, batched constrained generation."""

import json
import math
import os

import numpy as np
import pytest
import soundfile
import torch

import data
from conftest import click_song, make_map_zip, ogg_bytes, tiny_encodec_model, tiny_qwen

BPM = 137.5


def click_maps(directory, n_songs, n_beats=27, seed=0):
    """n_songs map zips at BPM with clicks (and notes) on a random third of the quarter beats."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(n_songs):
        grid = np.arange(0, n_beats, 0.25)
        beats = np.sort(rng.choice(grid, len(grid) // 3, replace=False))
        song = click_song(n_beats * 60 / BPM, beats * 60 / BPM, seed=s)
        make_map_zip(os.path.join(directory, f"song{s}.zip"), BPM,
                     {"Expert": [(float(b), 1, 0, 0, 1) for b in beats]}, ogg_bytes(song))
    return str(directory)


def train_args(tmp, maps_dir, model, encodec_dir, *extra):
    import train
    return train.parse_args([maps_dir, "--output_dir", str(tmp / "out"), "--model", model, "--audio_model", encodec_dir,
                             "--chunk_duration", "4", "--cache_dir", str(tmp / "cache"), "--learning_rate", "1e-3",
                             "--gradient_accumulation_steps", "2", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps through train.main, with the lengths every forward pass received."""
    import train
    tmp = tmp_path_factory.mktemp("train")
    encodec_dir = str(tmp / "encodec")
    tiny_encodec_model().save_pretrained(encodec_dir)
    maps_dir = click_maps(tmp / "maps", 2)
    model_dir = tiny_qwen(tmp / "qwen")
    seen_lengths = []
    args = train_args(tmp, maps_dir, model_dir, encodec_dir, "--max_steps", "4", "--save_steps", "2")

    real_load_model = train.load_model

    def load_and_watch(*a, **k):
        model, tokenizer = real_load_model(*a, **k)
        model.register_forward_pre_hook(lambda module, args, kwargs: seen_lengths.append(kwargs["input_ids"].shape[1]),
                                        with_kwargs=True)
        return model, tokenizer

    train.load_model = load_and_watch
    try:
        trainer = train.main(args)
    finally:
        train.load_model = real_load_model
    return {"tmp": tmp, "args": args, "trainer": trainer, "lengths": seen_lengths, "encodec_dir": encodec_dir,
            "maps_dir": maps_dir, "model_dir": str(tmp / "out")}


@pytest.mark.slow
def test_training_sees_full_sequences(trained):
    from audio import create_audio_tokenizer
    from data import BeatDataset
    from maps import ZippedBeatSaberDataset
    dataset = BeatDataset(ZippedBeatSaberDataset(trained["maps_dir"]), chunk_duration=4.0,
                          cache_dir=trained["tmp"] / "cache",
                          audio_tokenizer=create_audio_tokenizer(model=trained["encodec_dir"], device="cpu"))
    lengths = {len(x["input_ids"]) for x in dataset}
    assert min(lengths) > 500                      # ~294 frames → ~590 audio tokens per 4 s chunk
    # every forward pass got a whole sequence (batch size 1: no padding), never one cut to TRL's 1,024 default
    assert trained["lengths"] and set(trained["lengths"]) <= lengths
    assert trained["trainer"].state.global_step == 4


@pytest.mark.slow
def test_output_folder_has_model_tokenizer_metadata(trained):
    out = trained["model_dir"]
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "beatgen.json"):
        assert os.path.exists(os.path.join(out, name)), name
    metadata = data.load_metadata(out)
    assert metadata["frame_rate"] == 75.0 and metadata["chunk_duration"] == 4.0 and metadata["ppq"] == 48
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)              # plain transformers loads it
    assert model.config.vocab_size >= data.VOCAB_USED
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (data.EOS, data.PAD)


@pytest.mark.slow
def test_resume_continues_from_checkpoint(trained):
    import train
    args = train_args(trained["tmp"], trained["maps_dir"], trained["args"].model, trained["encodec_dir"],
                      "--max_steps", "6", "--save_steps", "2", "--resume")
    trainer = train.main(args)
    history_steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 6
    assert min(history_steps) == 1 and max(history_steps) == 6   # log history carried over from the checkpoint
    assert os.path.isdir(os.path.join(trained["model_dir"], "checkpoint-6"))


def test_metadata_errors(tmp_path):
    with pytest.raises(ValueError, match="beatgen.json"):
        data.load_metadata(tmp_path)
    (tmp_path / "beatgen.json").write_text(json.dumps({"token_space_version": 99, "ppq": 48}))
    with pytest.raises(ValueError, match="token space"):
        data.load_metadata(tmp_path)
    (tmp_path / "beatgen.json").write_text("{broken")
    with pytest.raises(ValueError, match="unreadable"):
        data.load_metadata(tmp_path)
    good = {"token_space_version": 1, "vocab_used": 14582, "ppq": 48, "audio_model": "facebook/encodec_24khz",
            "bandwidth": 1.5, "sample_rate": 24000, "frame_rate": 75.0, "n_codebooks": 2, "chunk_duration": 30.0,
            "max_seq_length": 32767}
    (tmp_path / "beatgen.json").write_text(json.dumps(good))
    assert data.load_metadata(tmp_path) == good
    for key, bad in [("audio_model", None), ("audio_model", 3), ("bandwidth", "1.5"), ("chunk_duration", float("nan")),
                     ("chunk_duration", -4), ("sample_rate", 24000.5), ("max_seq_length", True), ("frame_rate", None)]:
        (tmp_path / "beatgen.json").write_text(json.dumps({**good, key: bad}))
        with pytest.raises(ValueError, match=f"{key} is"):
            data.load_metadata(tmp_path)
    (tmp_path / "beatgen.json").write_text(json.dumps({k: v for k, v in good.items() if k != "bandwidth"}))
    with pytest.raises(ValueError, match="bandwidth is None"):
        data.load_metadata(tmp_path)


@pytest.fixture(scope="module")
def model_and_encodec(trained):
    import infer
    from audio import create_audio_tokenizer
    return infer.load_model(trained["model_dir"], "cpu"), create_audio_tokenizer(model=trained["encodec_dir"],
                                                                                 device="cpu")


def map_song(model, encodec, audio, temperature=0.8, batch_size=0):
    """infer.generate_map on audio at BPM in 4 s chunks → {"ExpertPlus": [Note, ...]}."""
    import infer
    options = infer.Options(sampling=data.Sampling(temperature, progress=False), batch_size=batch_size)
    return infer.generate_map(model, encodec, data.encode_song(audio, BPM, encodec, 4.0), options)


@pytest.mark.slow
def test_grammar_every_generated_chunk_decodes(model_and_encodec):
    model, encodec = model_and_encodec
    torch.manual_seed(0)
    prompts = [data.prompt_tokens(np.random.randint(0, 1024, (n, 2))) for n in (40, 25, 33)]
    max_ticks = [95, 47, 200]
    chunks = data.generate_notes(model, prompts, max_ticks, 61, data.Sampling(1.5, progress=False))
    assert len(chunks) == 3 and sum(len(c) for c in chunks) > 0
    for notes, max_tick in zip(chunks, max_ticks):
        ticks = [tick for tick, _ in notes]
        assert ticks == sorted(ticks) and all(0 <= t <= max_tick for t in ticks)
        assert all(data.note_fields(type_)[3] <= 8 for _, type_ in notes)


@pytest.mark.slow
def test_batched_generation_equals_chunk_by_chunk(model_and_encodec):
    model, _ = model_and_encodec
    prompts = [data.prompt_tokens(np.random.default_rng(n).integers(0, 1024, (n, 2))) for n in (30, 18, 24)]
    greedy = data.Sampling(0, progress=False)
    batched = data.generate_notes(model, prompts, [191] * 3, 21, greedy)
    single = [data.generate_notes(model, [p], [191], 21, greedy)[0] for p in prompts]
    assert batched == single


@pytest.mark.slow
def test_generate_map_beats_inside_song(model_and_encodec):
    model, encodec = model_and_encodec
    song = click_song(9.0, np.arange(0.2, 9, 0.4))
    torch.manual_seed(1)
    notes = map_song(model, encodec, song, temperature=1.0)["ExpertPlus"]
    assert notes == sorted(set(notes))
    assert all(0 <= n.beat * 60 / BPM < 9.0 for n in notes)
    assert all(0 <= n.x <= 3 and 0 <= n.y <= 2 and n.color in (0, 1) and 0 <= n.direction <= 8 for n in notes)
    # shorter than one chunk, and silence: still a valid (maybe empty) list
    assert isinstance(map_song(model, encodec, np.zeros(24000, np.float32))["ExpertPlus"], list)


@pytest.mark.slow
def test_infer_cli_writes_dat_and_zip(trained, tmp_path):
    import infer
    from maps import read_map
    song_path = tmp_path / "song.wav"
    soundfile.write(song_path, click_song(6.0, np.arange(0.5, 6, 0.5)), 24000)
    dat = infer.main(infer.parse_args([trained["model_dir"], str(song_path), "--bpm", str(BPM), "--seed", "0",
                                       "--output", str(tmp_path / "ExpertPlusStandard.dat")]))
    difficulty = json.loads(open(dat).read())
    assert difficulty["version"] == "3.3.0" and isinstance(difficulty["colorNotes"], list)
    written = infer.main(infer.parse_args([trained["model_dir"], str(song_path), "--bpm", str(BPM), "--seed", "0",
                                           "--output", str(tmp_path / "map.zip")]))
    beatmap = read_map(written)
    assert beatmap.bpm == BPM
    notes = beatmap.difficulties[("Standard", "ExpertPlus")].notes
    assert [(n.beat, n.x, n.y, n.color, n.direction) for n in notes] == \
        [(n["b"], n["x"], n["y"], n["c"], n["d"]) for n in difficulty["colorNotes"]]


@pytest.mark.slow
def test_infer_cli_bad_inputs(trained, tmp_path):
    import infer
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        infer.main(infer.parse_args([trained["model_dir"], str(not_audio), "--bpm", "120"]))
    with pytest.raises(ValueError, match="no such file"):
        infer.main(infer.parse_args([trained["model_dir"], str(tmp_path / "missing.ogg"), "--bpm", "120"]))
    with pytest.raises(ValueError, match="beatgen.json"):
        infer.main(infer.parse_args([str(tmp_path), str(not_audio), "--bpm", "120"]))


@pytest.mark.slow
def test_generate_map_batch_size_keeps_greedy_result(model_and_encodec):
    model, encodec = model_and_encodec
    song = click_song(9.0, np.arange(0.3, 9, 0.35))
    whole = map_song(model, encodec, song, temperature=0)
    in_pairs = map_song(model, encodec, song, temperature=0, batch_size=2)
    assert whole == in_pairs


@pytest.mark.slow
def test_infer_from_url_without_bpm_with_preview_and_reference(trained, tmp_path, capsys, http_folder):
    """No --bpm: tempo estimated, lead-in added; the song comes over HTTP (yt-dlp); a score card against a map."""
    import infer
    from maps import read_map
    served, base_url = http_folder
    click_times_s = 0.3 + np.arange(16) * 0.5                     # 120 BPM, first beat at 0.3 s
    soundfile.write(served / "song.wav", click_song(8.5, click_times_s), 24000)
    # the human map: a note on every click (beat = 2 · t at 120 BPM)
    reference = make_map_zip(tmp_path / "human.zip", 120.0, {"ExpertPlus": [(2 * t, 1, 0, 0, 1) for t in click_times_s]},
                             ogg_bytes(click_song(8.5, click_times_s)))
    url = f"{base_url}/song.wav"
    written = infer.main(infer.parse_args([trained["model_dir"], url, "--seed", "0", "--preview", "--snap",
                                           "--output", str(tmp_path / "map.zip")]))
    beatmap = read_map(written)
    assert abs(beatmap.bpm / 120 - 1) < 0.01 or abs(beatmap.bpm / 240 - 1) < 0.01 or abs(beatmap.bpm / 60 - 1) < 0.01
    assert os.path.getsize(tmp_path / "map_preview.png") > 0 and os.path.getsize(tmp_path / "map_clicks.wav") > 0
    capsys.readouterr()
    infer.main(infer.parse_args([trained["model_dir"], url, "--seed", "0", "--reference", str(reference),
                                 "--json", "--output", str(tmp_path / "scored.zip")]))
    out = capsys.readouterr().out
    card = json.loads(out[out.index("\n{") + 1:])          # the card is printed last, after the progress lines
    assert card["reference"]["notes"] == 16 and "f1" in card["onset_20ms"]


def test_missing_unsloth_says_how_to_install(monkeypatch):
    import sys

    import train
    monkeypatch.setitem(sys.modules, "unsloth", None)      # makes `import unsloth` raise ImportError
    with pytest.raises(SystemExit, match="pip install"):
        train.load_model("unused", 128)


def test_chunks_per_call_follows_free_gpu_memory():
    """The batch rule with fake free-memory figures: Qwen3-0.6B in bf16, one 30 s chunk = 4,505 prompt tokens plus
    a 2,401-token budget → 114,688 bytes a token, ≈ 0.79 GB a chunk."""
    from transformers import Qwen3Config

    from conftest import QWEN3_06B
    config = Qwen3Config(**QWEN3_06B)
    tokens = 4505 + 2401
    per_chunk = 2 * 28 * 8 * 128 * 2 * tokens
    assert 0.75e9 < per_chunk < 0.85e9
    assert data.chunks_per_call(config, tokens, 10.5 * 2**30, 2) == int(0.8 * 10.5 * 2**30 // per_chunk) == 11
    assert data.chunks_per_call(config, tokens, 2 * 2**30, 2) == 2
    assert data.chunks_per_call(config, tokens, 0.1 * 2**30, 2) == 1          # never 0
    assert data.chunks_per_call(config, tokens, 10.5 * 2**30, 4) == 5         # float32 caches are twice as big
    # a 10-minute song is 20 chunks: on a 12 GB card with the model loaded (~10.5 GB free) two calls, not one
    assert math.ceil(20 / data.chunks_per_call(config, tokens, 10.5 * 2**30, 2)) == 2


def test_device_and_compiler_checks(monkeypatch, tmp_path):
    import utils
    assert utils.pick_device("cpu") == torch.device("cpu") and utils.model_dtype(torch.device("cpu")) == torch.float32
    for bad in ("cuda:7", "tpu", "gpu!"):
        with pytest.raises(ValueError, match="--device"):
            utils.pick_device(bad)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))                 # no gcc or clang on PATH
    assert "C compiler" in utils.compile_problem()
    (tmp_path / "gcc").write_text("#!/bin/sh\n")
    (tmp_path / "gcc").chmod(0o755)
    assert utils.compile_problem() is None or "Python headers" in utils.compile_problem()
