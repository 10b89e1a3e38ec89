"""Every command README shows, run the way users run it: `python train.py …` as a subprocess, from a working
directory outside the repo, with tiny local models (no hub). Checks exit status, files written and what the user
reads on the terminal. (scrape.py's commands: tests/test_scrape.py.)"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from conftest import ROOT, click_song, make_map_zip, ogg_bytes, tiny_encodec_model, tiny_qwen

BPM = 137.5


def run(args, cwd, env=None, timeout=600):
    """Run one command line (a list; a .py first item runs with this Python) → CompletedProcess with text output."""
    command = [sys.executable, *map(str, args)] if str(args[0]).endswith(".py") else [*map(str, args)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def click_maps(directory, n_songs, n_beats=27, seed=0):
    """n_songs map zips at BPM with a note on a random third of the quarter beats, each on a click."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(n_songs):
        beats = np.sort(rng.choice(np.arange(0, n_beats, 0.25), n_beats * 4 // 3, replace=False))
        song = click_song(n_beats * 60 / BPM, beats * 60 / BPM, seed=s)
        make_map_zip(directory / f"song{s}.zip", BPM,
                     {"Expert": [(float(b), int(b * 4) % 4, 0, int(b * 2) % 2, 1) for b in beats]}, ogg_bytes(song))
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working directory outside the repo with tiny models, 4 click-song maps and one model trained by train.py."""
    work = tmp_path_factory.mktemp("user")
    assert ROOT not in work.parents
    tiny_encodec_model().save_pretrained(work / "encodec")
    tiny_qwen(work / "qwen")
    click_maps(work / "maps", 4)
    soundfile.write(work / "song.wav", click_song(8.0, np.arange(0.3, 8, 0.4)), 24000)
    return work


def train_command(out, *extra):
    return [ROOT / "train.py", "maps", "--output_dir", out, "--model", "qwen", "--audio_model", "encodec",
            "--chunk_duration", "4", "--cache_dir", "cache", "--learning_rate", "1e-3",
            "--gradient_accumulation_steps", "2", *extra]


def trainer_state(folder):
    return json.loads((folder / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def trained(workspace):
    """`python train.py maps --output_dir runs/first …` for 4 steps, checkpoint every 2 → the output folder."""
    result = run(train_command("runs/first", "--max_steps", "4", "--save_steps", "2"), cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 difficulties, 12 chunks; skipped: none" in result.stdout
    assert "4 steps of 2 sequences (1 process): 0.67 epochs" in result.stdout
    assert "trained 4 steps" in result.stdout and "model written to runs/first" in result.stdout
    return workspace / "runs" / "first"


@pytest.mark.slow
def test_train_writes_a_model_infer_can_load(trained):
    for name in ("config.json", "model.safetensors", "beatgen.json", "tokenizer_config.json",
                 "checkpoint-2", "checkpoint-4"):
        assert (trained / name).exists(), name
    assert json.loads((trained / "beatgen.json").read_text())["frame_rate"] == 75.0
    assert trainer_state(trained / "checkpoint-4")["global_step"] == 4


@pytest.mark.slow
def test_train_resume_continues_from_the_checkpoint(trained, workspace):
    result = run(train_command("runs/first", "--max_steps", "6", "--save_steps", "2", "--resume"), cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 6 steps" in result.stdout
    state = trainer_state(trained / "checkpoint-6")
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_train_errors_are_one_line(workspace):
    result = run([ROOT / "train.py", "empty_dir_that_does_not_exist", "--output_dir", "runs/none", "--model", "qwen",
                  "--audio_model", "encodec"], cwd=workspace)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "empty_dir_that_does_not_exist" in result.stderr


@pytest.mark.slow
def test_train_holds_out_whole_songs_and_keeps_the_best_checkpoint(workspace, tmp_path):
    """`python train.py … --eval_fraction 0.4 --load_best`: whole songs held out (two maps of one song stay on one
    side), listed in heldout.txt, their loss logged at every evaluation, the lowest-loss checkpoint named and kept,
    and after training a few held-out songs mapped and scored (infer.evaluate) into the output folder."""
    maps = click_maps(tmp_path / "maps", 5, seed=3)
    shutil.copy(maps / "song0.zip", maps / "song0_again.zip")        # another map of the same song (same audio)
    result = run([ROOT / "train.py", tmp_path / "maps", "--output_dir", "runs/held", "--model", "qwen",
                  "--audio_model", "encodec", "--chunk_duration", "4", "--cache_dir", "cache", "--learning_rate",
                  "1e-3", "--gradient_accumulation_steps", "2", "--max_steps", "4", "--save_steps", "2",
                  "--eval_fraction", "0.4", "--eval_steps", "2", "--load_best", "--eval_songs", "1"], cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    out = workspace / "runs" / "held"
    held = (out / "heldout.txt").read_text().split()
    assert len({hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in held}) == 2       # 2 of 5 songs
    assert (str(maps / "song0.zip") in held) == (str(maps / "song0_again.zip") in held)
    assert "held out: 2 songs" in result.stdout and "heldout.txt" in result.stdout
    losses = re.search(r"held-out loss: step 2 ([\d.]+), step 4 ([\d.]+)", result.stdout)
    assert losses, result.stdout[-2000:]
    best_step = 2 if float(losses.group(1)) <= float(losses.group(2)) else 4
    assert f"lowest held-out loss {min(map(float, losses.groups())):.4f}: runs/held/checkpoint-{best_step}" in \
        result.stdout and "(loaded as the final model: --load_best)" in result.stdout
    state = trainer_state(out / "checkpoint-4")
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [2, 4]
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert len(evaluation["songs"]) == 1 and "Expert" in evaluation["summary"]


@pytest.mark.slow
def test_unreachable_hub_is_one_error_line(trained, workspace, tmp_path):
    """No internet and nothing cached (an empty HF_HOME, offline mode): the default hub models cannot load. Each
    command says which model, and how to point at a local folder, in one line."""
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = run([ROOT / "train.py", "maps", "--output_dir", "runs/hub"], cwd=workspace, env=offline)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: unsloth/Qwen3-0.6B-Base: the base model cannot be loaded") and "--model" in line
    result = run([ROOT / "infer.py", trained, "song.wav", "--bpm", "120", "--audio_model", "facebook/encodec_24khz",
                  "--output", tmp_path / "hub.zip"], cwd=workspace, env=offline)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: facebook/encodec_24khz: the Encodec model cannot be loaded")
    assert "--audio_model" in line and not (tmp_path / "hub.zip").exists()


def test_training_on_cuda_needs_a_compiler(monkeypatch, tmp_path):
    """Triton builds Unsloth's kernels on CUDA; with no C compiler on PATH train.py stops before any work (the
    check, called as main calls it; no GPU here)."""
    sys.path.insert(0, str(ROOT))
    import train
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="C compiler"):
        train.gpu_ready("cuda")
    train.gpu_ready("cpu")          # the CPU path compiles nothing


SEEN_RECORDER = '''
import hashlib, os
import data
_collate = data.audio_masking_collator
def _recording(batch):
    with open(os.path.join(os.environ["SEEN_DIR"], "rank%s.txt" % os.environ.get("RANK", "0")), "a") as f:
        for example in batch:
            f.write(hashlib.sha1(str(example["input_ids"]).encode()).hexdigest() + "\\n")
    return _collate(batch)
data.audio_masking_collator = _recording
'''


@pytest.mark.slow
def test_two_processes_train_disjoint_chunks_covering_one_epoch(workspace, tmp_path):
    """README's multi-GPU route (torchrun) with two CPU processes over gloo. A sitecustomize module on PYTHONPATH
    records the sequences each rank's collator receives (the command itself is exactly README's); the first
    steps × accumulation of them are what the rank trained on (accelerate fetches one batch ahead)."""
    (tmp_path / "sitecustomize.py").write_text(SEEN_RECORDER)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = run([torchrun, "--standalone", "--nproc_per_node", "2",
                  *train_command("runs/ddp", "--num_train_epochs", "1", "--save_steps", "100")], cwd=workspace,
                 env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "SEEN_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    # 12 chunks / (2 sequences a step per process × 2 processes) = 3 steps for one epoch
    assert "3 steps of 4 sequences (2 processes): 1.00 epochs" in result.stdout
    assert trainer_state(workspace / "runs" / "ddp" / "checkpoint-3")["global_step"] == 3
    seen = [(tmp_path / f"rank{rank}.txt").read_text().split()[:3 * 2] for rank in (0, 1)]
    assert all(len(s) == 6 for s in seen)
    # every chunk of the epoch, as the same BeatDataset builds it
    sys.path.insert(0, str(ROOT))
    from audio import create_audio_tokenizer
    from data import BeatDataset
    from maps import ZippedBeatSaberDataset
    dataset = BeatDataset(ZippedBeatSaberDataset(workspace / "maps"), chunk_duration=4.0,
                          cache_dir=workspace / "cache",
                          audio_tokenizer=create_audio_tokenizer(model=str(workspace / "encodec"), device="cpu"))
    epoch = {hashlib.sha1(str(item["input_ids"]).encode()).hexdigest() for item in dataset}
    assert len(epoch) == 12
    assert not set(seen[0]) & set(seen[1])                       # disjoint
    assert set(seen[0]) | set(seen[1]) == epoch                  # together: the epoch, once
    mapped = run([ROOT / "infer.py", "runs/ddp", "song.wav", "--bpm", "120", "--output", "ddp.zip"], cwd=workspace)
    assert mapped.returncode == 0 and (workspace / "ddp.zip").exists(), mapped.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_compute_the_same_held_out_loss_as_one(workspace, tmp_path):
    """The held-out loss under torchrun with two CPU processes: each evaluates a share of the held-out chunks and the
    trainer combines the losses. At learning rate 0 the model never changes, so both runs evaluate the same weights
    and must report the same loss as one process does (every held-out chunk counted once)."""
    click_maps(tmp_path / "maps", 4, seed=5)
    common = ["--eval_fraction", "0.5", "--eval_steps", "2", "--max_steps", "2", "--save_steps", "2",
              "--learning_rate", "0", "--eval_songs", "0"]
    torchrun = Path(sys.executable).parent / "torchrun"
    losses = []
    for launcher, out in (([], "runs/one"), ([torchrun, "--standalone", "--nproc_per_node", "2"], "runs/two")):
        command = train_command(out, *common)
        command[1] = tmp_path / "maps"
        result = run([*launcher, *command], cwd=workspace)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "held out: 2 songs (6 chunks)" in result.stdout, result.stdout[-2000:]
        loss = re.search(r"held-out loss: step 2 ([\d.]+)", result.stdout)
        assert loss, result.stdout[-2000:]
        losses.append(float(loss.group(1)))
        assert (workspace / out / "heldout.txt").read_text() == (workspace / "runs" / "one" / "heldout.txt").read_text()
    print(f"held-out loss, one process {losses[0]}, two processes {losses[1]}")
    assert losses[0] > 1 and abs(losses[0] - losses[1]) < 1e-3 * losses[0], losses


@pytest.mark.slow
def test_infer_zip_preview_and_dat(trained, workspace):
    model = trained.relative_to(workspace)
    result = run([ROOT / "infer.py", model, "song.wav", "--bpm", "120", "--seed", "0", "--preview"], cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote song_beatgen.zip: ExpertPlus over 8.0 s at 120 BPM" in result.stdout
    assert re.search(r"ExpertPlus: \d+ notes, [\d.]+ NPS, parity errors 0 red / 0 blue, vision blocks 0, "
                     r"impossible doubles 0", result.stdout)
    assert "preview (ExpertPlus): song_beatgen_preview.png" in result.stdout
    for name in ("song_beatgen.zip", "song_beatgen_preview.png", "song_beatgen_clicks.wav"):
        assert (workspace / name).stat().st_size > 0, name
    sys.path.insert(0, str(ROOT))
    from maps import read_map
    beatmap = read_map(workspace / "song_beatgen.zip")
    assert beatmap.bpm == 120 and beatmap.difficulties[("Standard", "ExpertPlus")].notes
    result = run([ROOT / "infer.py", model, "song.wav", "--bpm", "120", "--output", "ExpertPlusStandard.dat"],
                 cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((workspace / "ExpertPlusStandard.dat").read_text())["version"] == "3.3.0"


@pytest.mark.slow
def test_infer_several_difficulties_into_one_zip(trained, workspace):
    model = trained.relative_to(workspace)
    result = run([ROOT / "infer.py", model, "song.wav", "--bpm", "120", "--seed", "1", "--temperature", "1",
                  "--difficulties", "Normal", "Hard", "Expert", "ExpertPlus", "--output", "all.zip"], cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    sys.path.insert(0, str(ROOT))
    import utils
    from maps import read_map
    beatmap = read_map(workspace / "all.zip")
    assert sorted(beatmap.difficulties) == sorted(("Standard", name) for name in ("Normal", "Hard", "Expert",
                                                                                  "ExpertPlus"))
    info = json.loads(zipfile.ZipFile(workspace / "all.zip").read("Info.dat"))
    listed = info["_difficultyBeatmapSets"][0]["_difficultyBeatmaps"]
    assert [(e["_difficulty"], e["_difficultyRank"], e["_noteJumpMovementSpeed"]) for e in listed] == [
        (name, utils.DIFFICULTIES[name].rank, utils.DIFFICULTIES[name].njs) for name in ("Normal", "Hard", "Expert",
                                                                                          "ExpertPlus")]
    assert info["_customData"]["_editors"]["_lastEditedBy"] == "beatgen"
    for name in ("Normal", "Hard", "Expert", "ExpertPlus"):
        stats = utils.map_stats(beatmap.difficulties[("Standard", name)].notes, beatmap.bpm)
        assert (stats["parity_errors_red"], stats["parity_errors_blue"], stats["vision_blocks"],
                stats["impossible_doubles"]) == (0, 0, 0, 0), (name, stats)
        assert f"  {name}: {stats['notes']} notes" in result.stdout


@pytest.mark.slow
def test_infer_reference_prints_score_card_and_utils_score(trained, workspace):
    model = trained.relative_to(workspace)
    human = make_map_zip(workspace / "human.zip", 120.0,
                         {"ExpertPlus": [(2 * t, 1, 0, 0, 1) for t in np.arange(0.3, 8, 0.4)]},
                         ogg_bytes(click_song(8.0, np.arange(0.3, 8, 0.4))))
    result = run([ROOT / "infer.py", model, "song.wav", "--bpm", "120", "--reference", human.name,
                  "--output", "scored.zip"], cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "notes per second" in result.stdout and "±20 ms" in result.stdout
    table = run([ROOT / "utils.py", "score", "scored.zip", "human.zip", "--difficulty", "ExpertPlus"], cwd=workspace)
    assert table.returncode == 0 and "parity errors red" in table.stdout, table.stderr[-2000:]
    card = run([ROOT / "utils.py", "score", "scored.zip", "human.zip", "--json"], cwd=workspace)
    assert card.returncode == 0 and json.loads(card.stdout)["reference"]["notes"] == 20
    missing = run([ROOT / "utils.py", "score", "scored.zip", "human.zip", "--difficulty", "Easy"], cwd=workspace)
    assert missing.returncode != 0 and "no Standard/Easy" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing song", "text as mp3", "no gpu", "output under a file", "output is a folder",
                                  "broken metadata", "nan chunk", "truncated weights", "bad audio model"])
def test_infer_bad_input_is_one_error_line(trained, workspace, tmp_path, case):
    model = str(trained)
    song = str(workspace / "song.wav")
    (tmp_path / "fake.mp3").write_text("not audio at all")
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "beatgen.json").write_text("{")
    if case in ("truncated weights", "bad audio model"):
        model = str(tmp_path / "copy")
        shutil.copytree(trained, model, ignore=shutil.ignore_patterns("checkpoint-*"))
        weights = Path(model) / "model.safetensors"
        if case == "truncated weights":
            weights.write_bytes(weights.read_bytes()[:1000])
        else:
            metadata = json.loads((Path(model) / "beatgen.json").read_text())
            (Path(model) / "beatgen.json").write_text(json.dumps({**metadata, "audio_model": str(tmp_path / "no")}))
    args = {"missing song": [model, tmp_path / "nope.ogg", "--bpm", "120"],
            "text as mp3": [model, tmp_path / "fake.mp3", "--bpm", "120"],
            "no gpu": [model, song, "--bpm", "120", "--device", "cuda:3"],
            "output under a file": [model, song, "--bpm", "120", "--output", f"{song}/map.zip"],
            "output is a folder": [model, song, "--bpm", "120", "--output", tmp_path],
            "broken metadata": [broken, song, "--bpm", "120"],
            "nan chunk": [model, song, "--chunk_duration", "nan"],
            "truncated weights": [model, song, "--bpm", "120"],
            "bad audio model": [model, song, "--bpm", "120"]}[case]
    result = run([ROOT / "infer.py", *args, "--output" if "--output" not in args else "--seed",
                  tmp_path / "out.zip" if "--output" not in args else "0"], cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(("error: ", "infer.py: error:"))
    assert not (tmp_path / "out.zip").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train", "infer"])
def test_gpu_check_stages_run_on_the_cpu_with_tiny_models(tmp_path, stage):
    """tests/gpu_check.py, the GPU check in two stages, run here the only way it can run: --cpu --tiny. Each stage
    ends in one JSON line of figures."""
    result = run([ROOT / "tests" / "gpu_check.py", "--stage", stage, "--cpu", "--tiny", "--workdir", tmp_path / "work",
                  "--report", tmp_path / "report.json"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("gpu_check {")
    report = json.loads(line[len("gpu_check "):])
    assert report == json.loads((tmp_path / "report.json").read_text()) and report["device"] == "cpu"
    if stage == "train":
        assert len(report["loss"]) == 2 and report["tokens_per_s"] > 0 and report["long_sequence_tokens"] > 900
        assert report["first_step_s"] > 0 and report["step_s"] > 0
        # fp32 master weights take the last (small) step everywhere; bf16 weights round most of it away
        assert report["last_step_changed_fp32_master"] > 0.9 > report["last_step_changed_pure_bf16"]
    else:
        # a short last chunk, yet one prompt length (no padded rows); finite logits; batched = one by one
        assert report["last_chunk_audio_s"] < 3.75 and len(report["prompt_lengths"]) == 1
        assert report["logits_finite"] and report["logit_steps_checked"] > 0
        assert report["batched_equals_one_by_one_fp32"] is True
        assert report["uncompiled_ms_per_step"] > report["uncompiled_grammar_ms_per_step"] > 0
        assert report["infer_py_stages"].startswith("time: decode")
