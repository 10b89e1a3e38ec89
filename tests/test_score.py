"""Score card (utils.py, issue 6): onset F1 and baseline, note-type agreement, playability counts, the CLI, fixtures."""

import json
from collections import namedtuple

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import utils
from conftest import SHARED, make_map_zip
from utils import (baseline_onsets, format_score_card, impossible_doubles, match_onsets, parity_errors, score_card,
                   vision_blocks)

FIXTURE_MAPS = SHARED / "fixtures" / "maps"

# Note = maps.Note's fields: beat, x lane 0..3, y layer 0..2, color 0 red / 1 blue, direction 0..8
Note = namedtuple("Note", "beat x y color direction")
BPM = 120.0  # 0.5 s per beat in every hand-built map below


def stream(n_beats, step_beats=0.5):
    """A clean two-hand stream: red and blue take turns every step_beats, each hand alternating down / up swings."""
    notes = []
    for i, beat in enumerate(np.arange(0, n_beats, step_beats)):
        color = i % 2
        direction = 1 if (i // 2) % 2 == 0 else 0
        notes.append(Note(float(beat), 1 + color, 0, color, direction))
    return notes


def test_perfect_copy_scores_one():
    notes = stream(64) + [Note(64.0, 0, 0, 0, 1), Note(64.0, 3, 0, 1, 1)]
    card = score_card(notes, notes, BPM, BPM)
    for window in ("onset_20ms", "onset_50ms"):
        assert card[window]["precision"] == card[window]["recall"] == card[window]["f1"] == 1.0
    assert card["color_accuracy"] == card["position_accuracy"] == card["direction_accuracy"] == 1.0
    assert card["direction_kl"] == card["position_kl"] == 0.0
    assert card["nps_curve_pearson"] == pytest.approx(1.0)
    assert card["generated"] == card["reference"]


def test_shift_by_30ms_fails_20ms_window_and_passes_50ms():
    reference = stream(64)
    shift_beats = 0.030 * BPM / 60
    generated = [note._replace(beat=note.beat + shift_beats) for note in reference]
    card = score_card(generated, reference, BPM, BPM)
    assert card["onset_20ms"]["f1"] == 0.0
    assert card["onset_50ms"]["f1"] == 1.0


def test_doubles_count_as_one_onset():
    reference = [Note(float(b), 1, 0, 0, 1) for b in range(8)] + [Note(float(b), 2, 0, 1, 1) for b in range(8)]
    generated = [Note(float(b), 1, 0, 0, 1) for b in range(8)]
    card = score_card(generated, reference, BPM, BPM)
    assert card["reference"]["onsets"] == 8 and card["reference"]["notes"] == 16
    assert card["onset_20ms"]["f1"] == 1.0
    assert card["color_accuracy"] == 0.0  # {red} vs {red, blue} at every onset
    assert card["position_accuracy"] == card["direction_accuracy"] == 1.0


def test_matching_is_one_to_one():
    reference = [Note(4.0, 1, 0, 0, 1)]
    generated = [Note(4.0 - 0.02, 1, 0, 0, 1), Note(4.0 + 0.02, 1, 0, 0, 1)]  # 10 ms either side
    scores = score_card(generated, reference, BPM, BPM)["onset_20ms"]
    assert (scores["precision"], scores["recall"]) == (0.5, 1.0)


def _maximum_matching_size(estimated_s, reference_s, window_s):
    # brute-force bipartite matching by augmenting paths, to check the two-pointer walk
    match_of_reference = {}

    def augment(i, seen):
        for j, time_s in enumerate(reference_s):
            if abs(estimated_s[i] - time_s) <= window_s + 1e-9 and j not in seen:
                seen.add(j)
                if j not in match_of_reference or augment(match_of_reference[j], seen):
                    match_of_reference[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(estimated_s)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=8, unique=True), st.lists(st.integers(0, 40), max_size=8, unique=True))
def test_two_pointer_matching_is_maximum(estimated_ticks, reference_ticks):
    estimated_s = np.sort(np.array(estimated_ticks, dtype=float)) * 0.01
    reference_s = np.sort(np.array(reference_ticks, dtype=float)) * 0.01
    pairs = match_onsets(estimated_s, reference_s, 0.02)
    assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == len(pairs)
    assert all(abs(estimated_s[i] - reference_s[j]) <= 0.02 + 1e-9 for i, j in pairs)
    assert len(pairs) == _maximum_matching_size(estimated_s, reference_s, 0.02)


def test_baseline_is_count_matched_and_on_the_grid():
    # 8 onsets over beats 0..7: the whole-beat grid has exactly 8 points
    onsets_s, division = baseline_onsets(8, 0.0, 3.5, BPM)
    assert division == 1 and np.allclose(onsets_s, np.arange(8) * 0.5)
    # 9 onsets over the same span need the half-beat grid (15 points)
    onsets_s, division = baseline_onsets(9, 0.0, 3.5, BPM)
    assert division == 2 and len(onsets_s) == 9 and len(set(onsets_s)) == 9
    assert np.allclose(onsets_s / 0.25, np.round(onsets_s / 0.25)) and onsets_s[0] == 0.0 and onsets_s[-1] == 3.5
    # a human map with a note on every beat is matched exactly by the baseline: no skill in copying it
    reference = [Note(float(b), 1, 0, b % 2, 1) for b in range(16)]
    card = score_card(reference, reference, BPM, BPM)
    assert card["onset_20ms"]["baseline_f1"] == 1.0 and card["onset_20ms"]["skill"] == 0.0


def test_known_parity_break_is_found():
    # red cuts down twice 0.25 s apart; blue cuts down twice 2 s apart (a reset, not an error)
    notes = [Note(0.0, 1, 0, 0, 1), Note(0.5, 1, 0, 0, 1), Note(0.0, 2, 0, 1, 1), Note(4.0, 2, 0, 1, 1)]
    assert parity_errors(notes, BPM) == {"red": 1, "blue": 0}
    assert parity_errors([Note(0.0, 2, 0, 1, 0), Note(0.5, 2, 0, 1, 4)], BPM) == {"red": 0, "blue": 1}  # up, up-left


def test_clean_alternating_stream_has_no_parity_errors():
    assert parity_errors(stream(64, step_beats=0.25), BPM) == {"red": 0, "blue": 0}
    # dots and horizontals take whichever swing comes next
    dots = [Note(b * 0.25, 1, 0, 0, d) for b, d in enumerate([1, 8, 1, 8, 8, 3, 1, 2, 1])]
    assert parity_errors(dots, BPM) == {"red": 0, "blue": 0}


def test_vision_block_is_found():
    blocker = Note(0.0, 1, 1, 0, 1)  # middle layer, centre-left lane
    assert vision_blocks([blocker, Note(0.25, 2, 0, 1, 1)], BPM) == 1  # 0.125 s later, neighbouring lane
    assert vision_blocks([blocker, Note(0.25, 3, 0, 1, 1)], BPM) == 0  # two lanes away
    assert vision_blocks([blocker, Note(1.0, 2, 0, 1, 1)], BPM) == 0  # 0.5 s later: seen in time
    assert vision_blocks([blocker._replace(y=0), Note(0.25, 2, 0, 1, 1)], BPM) == 0  # bottom layer hides nothing
    assert vision_blocks([blocker, Note(0.0, 2, 1, 1, 1)], BPM) == 0  # same onset: a double, not hidden
    assert vision_blocks(stream(64), BPM) == 0


def test_impossible_double_is_found():
    assert impossible_doubles([Note(0.0, 1, 0, 0, 1), Note(0.0, 1, 2, 0, 0)], BPM) == 1  # one hand up and down
    assert impossible_doubles([Note(0.0, 1, 0, 0, 1), Note(0.0, 1, 0, 1, 1)], BPM) == 1  # one cell
    assert impossible_doubles([Note(0.0, 1, 0, 0, 3), Note(0.0, 2, 0, 1, 2)], BPM) == 1  # sabers cut into each other
    assert impossible_doubles([Note(0.0, 1, 0, 0, 1), Note(0.0, 2, 0, 1, 1)], BPM) == 0  # plain double
    assert impossible_doubles([Note(0.0, 1, 0, 0, 1), Note(0.0, 2, 0, 1, 0)], BPM) == 0  # opposite swings: allowed
    assert impossible_doubles([Note(0.0, 1, 0, 0, 1), Note(0.0, 1, 1, 0, 7)], BPM) == 0  # stack 45° apart
    assert impossible_doubles(stream(64), BPM) == 0


def test_note_type_and_distribution_scores():
    reference = stream(32)
    mirrored = [note._replace(direction=1 - note.direction) for note in reference]
    card = score_card(mirrored, reference, BPM, BPM)
    assert card["onset_20ms"]["f1"] == 1.0 and card["color_accuracy"] == 1.0
    assert card["direction_accuracy"] == 0.0 and card["position_accuracy"] == 1.0
    # same histogram of directions (half up, half down) → KL 0; all dots → KL > 0
    assert card["direction_kl"] == pytest.approx(0.0)
    assert score_card([n._replace(direction=8) for n in reference], reference, BPM, BPM)["direction_kl"] > 0.5


def test_nps_and_empty_generated_map():
    reference = stream(40)  # 80 notes over 19.75 s
    card = score_card([], reference, BPM, BPM)
    assert card["reference"]["nps"] == pytest.approx(80 / 19.75)
    assert card["onset_50ms"]["f1"] == 0.0 and card["nps_curve_pearson"] is None and card["color_accuracy"] is None
    assert "baseline: none" in format_score_card(card)


def test_format_and_json():
    reference = stream(64)
    generated = reference[::2]
    card = score_card(generated, reference, BPM, BPM)
    assert json.loads(json.dumps(card)) == card
    text = format_score_card(card)
    assert "±20 ms" in text and "±50 ms" in text and "parity errors red" in text


def test_cli_scores_a_map_zip(tmp_path, capsys):
    reference = [(n.beat, n.x, n.y, n.color, n.direction) for n in stream(32)]
    generated = reference[::2]
    human_zip = make_map_zip(tmp_path / "human.zip", BPM, {"ExpertPlus": reference}, b"")
    generated_zip = make_map_zip(tmp_path / "generated.zip", BPM, {"Expert": generated}, b"")
    utils.main(["score", str(generated_zip), str(human_zip), "--difficulty", "Expert",
                "--reference_difficulty", "ExpertPlus", "--json"])
    card = json.loads(capsys.readouterr().out)
    assert card["onset_20ms"]["precision"] == 1.0 and card["onset_20ms"]["recall"] == 0.5
    utils.main(["score", str(human_zip), str(human_zip)])
    assert "±50 ms" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no Standard/Hard"):
        utils.main(["score", str(human_zip), str(human_zip), "--difficulty", "Hard"])


def fixture_map_folders():
    """Folders under the shared fixtures holding an Info.dat (any case)."""
    return sorted({path.parent for path in FIXTURE_MAPS.glob("*/*/*") if path.name.lower() == "info.dat"})


def fixture_difficulties():
    """(folder, BeatMap, Difficulty) of every readable shared fixture map's difficulties that hold notes."""
    from maps import read_map
    for folder in fixture_map_folders():
        try:
            beatmap = read_map(folder)
        except ValueError:
            continue
        for difficulty in beatmap.difficulties.values():
            if difficulty.notes:
                yield folder, beatmap, difficulty


@pytest.mark.skipif(not FIXTURE_MAPS.is_dir(), reason="shared fixtures absent")
def test_fixture_maps_score_one_against_themselves():
    n_scored = 0
    for folder, beatmap, difficulty in fixture_difficulties():
        card = score_card(difficulty.notes, difficulty.notes, beatmap.bpm, beatmap.bpm)
        assert card["onset_20ms"]["f1"] == card["onset_50ms"]["f1"] == 1.0, (folder, difficulty.difficulty)
        n_scored += 1
    assert n_scored > 30


@pytest.mark.skipif(not FIXTURE_MAPS.is_dir(), reason="shared fixtures absent")
def test_one_swing_rule_for_score_card_play_constraint_and_seams():
    """Every hand of every fixture map, onset by onset: the swing the score card resolves (utils.hand_swings, which
    parity_errors counts on), the swing a PlayState is left with when the same notes are pushed into it (the play
    constraint and thinning), and SegmentStart.after_notes on the notes so far (regeneration) agree."""
    import numpy as np

    import utils
    index = {tuple(row): k for k, row in enumerate(utils.ALL_NOTES)}
    compared = 0
    for folder, beatmap, difficulty in fixture_difficulties():
        notes = [n for n in difficulty.notes if n.direction <= 8 and 0 <= n.x <= 3 and 0 <= n.y <= 2][:400]
        onsets_s, groups = utils.note_onsets(notes, beatmap.bpm)
        if not len(onsets_s):
            continue
        state = utils.PlayState(utils.DIFFICULTIES["ExpertPlus"], onsets_s, utils.ALL_NOTES, np.zeros(0))
        swings = {color: utils.hand_swings([n for n in notes if n.color == color], beatmap.bpm) for color in (0, 1)}
        seen = {0: 0, 1: 0}         # onsets of each hand so far
        for tick, group in enumerate(groups):
            state.at(tick)
            for note in group:
                state.push(index[(note.x, note.y, note.color, note.direction)])
            start = utils.SegmentStart.after_notes([n for g in groups[:tick + 1] for n in g], beatmap.bpm)
            for color in {note.color for note in group}:
                time_s, swing, _ = swings[color][seen[color]]
                seen[color] += 1
                assert state._resolved(color) == (swing, time_s), (folder.name, difficulty.difficulty, tick)
                assert (start.hands[color].swing, start.hands[color].swing_s) == (swing, time_s)
                compared += 1
    assert compared > 10000
