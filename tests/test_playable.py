"""Playable by construction (utils.PlayState, data.NoteGrammar with states, infer.generate_map): whatever the model
proposes, a generated map has 0 parity errors, 0 vision blocks and 0 impossible doubles by the score card's rules,
seams between chunks included, its density inside the chosen difficulty's band, and EOS always reachable."""

import math

import numpy as np
import pytest
import torch

import data
import infer
import utils
from conftest import click_song, tiny_qwen
from maps import Note

RATE = 24000


def play_chunks(audio, bpm, difficulty, chunk_s, rng, policy, budget=None):
    """Drive infer.play_state for every chunk of a song with a stand-in for a model that picks by `policy` among what
    the masks allow → (notes, dead ends). Asserts that every step offers a choice and every chunk ends in budget."""
    duration_s = len(audio) / RATE
    onsets_s = utils.audio_onsets(audio, RATE)
    plan = data.chunk_plan(duration_s, bpm, chunk_s, 75.0)
    song = data.Song(audio, RATE, bpm, None, plan)
    tick_s = 60 / bpm / data.PPQ
    budget = budget or 2 * math.ceil(data.MAX_NOTES_PER_SECOND * chunk_s) + 1
    notes, dead_ends = [], 0
    for k, (start_beat, end_beat, _, _) in enumerate(plan):
        last_tick = min((end_beat - start_beat) * data.PPQ,
                        math.ceil((duration_s - start_beat * 60 / bpm) / tick_s)) - 1
        state = infer.play_state(song, k, (0, last_tick), utils.DIFFICULTIES[difficulty], onsets_s)
        favourite = int(rng.integers(data.SIZES["note_type"]))
        n = 0
        while True:
            closing = budget - n <= data.CLOSING_TOKENS
            ticks, eos = state.tick_mask(closing)
            choices = np.flatnonzero(ticks)
            assert eos or len(choices), "a state with neither a tick nor EOS"
            assert n < budget - 1 or eos, "the budget ran out before EOS was allowed"
            if eos and (not len(choices) or rng.random() < (0.3 if policy == "eos" else 0.01)):
                break
            tick = {"earliest": choices[0], "latest": choices[-1]}.get(policy, rng.choice(choices))
            state.at(int(tick))
            types = np.flatnonzero(state.type_mask(closing))
            assert len(types), f"tick {tick} allowed but no note type at it"
            type_ = favourite if policy == "same" and favourite in types else int(rng.choice(types))
            state.push(type_)
            notes.append(Note(start_beat + int(tick) / data.PPQ, *data.note_fields(type_)))
            n += 2
        dead_ends += state.dead_ends
    return sorted(set(notes)), dead_ends


def playability(notes, bpm):
    stats = utils.map_stats(notes, bpm)
    return stats, (stats["parity_errors_red"], stats["parity_errors_blue"], stats["vision_blocks"],
                   stats["impossible_doubles"])


def test_fuzzed_choices_never_break_the_rules():
    """180 songs with random tempo, click density, silence, chunk length, difficulty, budget and a model stand-in that
    picks uniformly, always the earliest or latest tick, keeps one note type, or ends whenever it may."""
    rng = np.random.default_rng(0)
    for trial in range(180):
        duration_s, bpm = float(rng.uniform(3, 35)), float(rng.uniform(60, 260))
        clicks_s = np.sort(rng.uniform(0, duration_s, int(duration_s / rng.uniform(0.05, 1.0))))
        if rng.random() < 0.2:
            clicks_s = clicks_s[clicks_s < duration_s / 3]          # the rest is silence
        audio = click_song(duration_s, clicks_s, seed=trial)
        difficulty = str(rng.choice(list(utils.DIFFICULTIES)))
        policy = str(rng.choice(["uniform", "earliest", "latest", "same", "eos"]))
        budget = 31 if rng.random() < 0.15 else None
        notes, dead_ends = play_chunks(audio, bpm, difficulty, float(rng.choice([2.0, 4.0, 30.0])), rng, policy,
                                       budget)
        stats, errors = playability(notes, bpm)
        assert errors == (0, 0, 0, 0) and dead_ends == 0, (trial, difficulty, policy, bpm, stats)


def map_song(model, encodec, audio, bpm, difficulties, constrained=True):
    """infer.generate_map at temperature 1 in 10 s chunks → {difficulty: [Note, ...]}."""
    options = infer.Options(difficulties, data.Sampling(1.0, progress=False), constrained)
    return infer.generate_map(model, encodec, data.encode_song(audio, bpm, encodec, 10.0), options)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """An untrained tiny Qwen3: at temperature 1 it proposes nearly anything, the hardest case for the constraint."""
    return infer.load_model(tiny_qwen(tmp_path_factory.mktemp("random") / "qwen", seed=3), "cpu")


@pytest.mark.parametrize("song, bpm, seed", [(0, 128.0, 0), (1, 95.0, 1), (2, 174.0, 2)])
def test_random_model_maps_are_playable_at_every_difficulty(random_model, encodec, song, bpm, seed):
    """All five difficulties of one song in one batched generate call (10 s chunks: the seams are tested too)."""
    gap_s = (0.23, 0.41, 0.15)[song]
    audio = click_song(32.0, np.arange(0.3, 32.0, gap_s), seed=song)
    torch.manual_seed(seed)
    maps_notes = map_song(random_model, encodec, audio, bpm, tuple(utils.DIFFICULTIES))
    for name, notes in maps_notes.items():
        stats, errors = playability(notes, bpm)
        low, high = utils.DIFFICULTIES[name].nps
        assert errors == (0, 0, 0, 0), (name, stats)
        assert low <= stats["nps"] <= high, (name, stats["nps"], (low, high))


def test_unconstrained_random_model_breaks_the_rules(random_model, encodec):
    """The same model without the constraint: the rules above are not met by chance."""
    audio = click_song(32.0, np.arange(0.3, 32.0, 0.23), seed=0)
    torch.manual_seed(0)
    notes = map_song(random_model, encodec, audio, 128.0, ("ExpertPlus",), constrained=False)["ExpertPlus"]
    stats, errors = playability(notes, 128.0)
    assert sum(errors) > 0 and not 3.0 <= stats["nps"] <= 8.7, stats


def test_grammar_masks_and_never_changes_an_allowed_score():
    """NoteGrammar with play states only sets scores to -inf: every score it leaves is the model's own."""
    times_s = np.arange(480) * 60 / 120 / data.PPQ
    states = [utils.PlayState(utils.DIFFICULTIES[name], times_s, data.NOTE_TYPE_FIELDS, np.arange(0.1, 5, 0.2))
              for name in ("Easy", "ExpertPlus")]
    grammar = data.NoteGrammar(3, [479, 479], states, max_new_tokens=61)
    scores = torch.randn(2, 16000)
    rows = [[], []]          # the ids generated so far, per row
    for _ in range(40):
        masked = grammar(torch.tensor([[0, 0, 0] + row for row in rows]), scores.clone())
        kept = torch.isfinite(masked)
        assert kept.any(dim=1).all() and torch.equal(masked[kept], scores[kept])
        for row, choice in zip(rows, masked.argmax(dim=1).tolist()):
            row.append(choice)
    assert all(data.EOS in row or len(row) == 40 for row in rows)


def test_state_after_notes_resolves_swings_as_the_score_card():
    """SegmentStart.after_notes reads a hand's last swing as parity_errors does: horizontals and dots take the
    opposite of the previous swing."""
    bpm = 120.0
    notes = [Note(0.0, 1, 0, 0, 1), Note(2.0, 1, 0, 0, 2), Note(4.0, 2, 0, 1, 8), Note(4.0, 2, 1, 1, 0)]
    start = utils.SegmentStart.after_notes(notes, bpm)
    # red: down, then a horizontal → up; blue: dot + up at one onset → the up arrow decides
    assert (start.hands[0].swing, start.hands[0].swing_s) == (utils.UP, 1.0)
    assert (start.hands[1].swing, start.hands[1].swing_s) == (utils.UP, 2.0)
    assert start.last_onset_s == 2.0 and start.blockers == [(2.0, 2)]
