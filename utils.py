"""Everything around the model that is neither a token nor map parsing, in sections, in this order:

- notes: chains → notes (training on v3 chains), snapping notes to a beat grid
- the score card: the rules a map is judged by (onsets, the one swing rule, parity errors, vision blocks,
  impossible doubles), a map scored against a human map, evaluations over many songs (table, JSON, picture)
- playable by construction: the difficulties, the play constraint the generation grammar applies (PlayState and the
  edges of a segment), thinning a dense map into an easier one
- tempo, beat phase and audio onsets: estimate_beat (BeatEstimate), lead-in, onsets and their strength
- map writing: ready-to-play zips, map folders, .dat files, a map with a range regenerated
- the light show, previews (a picture and a click track), songs from links (yt-dlp)
- the machine: device and dtype, the compiler Triton needs, stage timings and peak memory
- the web page (infer.py --serve), and the command line `python utils.py score GENERATED REFERENCE`
"""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sysconfig
import tempfile
import textwrap
import time
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import librosa
import mutagen
import mutagen.oggvorbis
import numpy as np
import scipy.signal
import soundfile
import torch
import yt_dlp
from PIL import Image, ImageDraw, ImageFont, ImageOps

from audio import audio_duration_s, load_audio
from data import PPQ
from maps import (COLORS, DIRECTIONS, LANES, LAYERS, Note, difficulty_v3, info_v2, map_files, mark_generated,
                  read_map, replace_notes, write_atomic)


# ---- notes: chains → notes, grid snapping ----

def chains_to_notes(difficulty) -> list[Note]:
    """maps.Difficulty → its colour notes plus the notes its chains stand for, sorted by (beat, x, y, color,
    direction).

    A chain of n = segments pieces (head included) gives its head note and pieces i = 1..n-1 at fraction
    f = i / (n - 1) from head to tail: beat = head beat + f * (tail beat - head beat), (x, y) = head + f * squish *
    (tail - head) rounded to the nearest lane / layer and kept on the 4x3 grid, with the chain's colour and the
    head's direction (one swing cuts the whole chain). The game bends the pieces along a curve that leaves the
    head in its cut direction; a straight line is what the 4x3 grid can hold. A head or piece at the same
    (beat, x, y, color) as a note already there is not added twice (mappers put a colour note under each chain head).
    Arcs add no notes: an arc is not cut, and the ends a player hits are colour notes of their own.
    """
    # notes = {(beat, x, y, color): Note}, the map's own notes first
    notes = {note[:4]: note for note in difficulty.notes}
    for chain in difficulty.chains:
        n = chain.segments
        for i in range(n):
            f = i / (n - 1) if n > 1 else 0.0
            x = min(max(math.floor(chain.x + f * chain.squish * (chain.tail_x - chain.x) + 0.5), 0), 3)
            y = min(max(math.floor(chain.y + f * chain.squish * (chain.tail_y - chain.y) + 0.5), 0), 2)
            beat = chain.beat + f * (chain.tail_beat - chain.beat)
            notes.setdefault((beat, x, y, chain.color), Note(beat, x, y, chain.color, chain.direction))
    return sorted(notes.values())


def snap_notes(notes, divisions=(1, 2, 3, 4, 6, 8), tolerance_beats=1 / 32) -> list[Note]:
    """notes = [Note, ...] → the notes with each beat moved to the nearest point of a 1/d-beat grid (d in divisions,
    the earlier d winning a tie) when that is within tolerance_beats, else to the nearest 1/48 beat.

    The default tolerance (1/32 beat: 16 ms at 120 BPM) pulls a note one 1/48 tick off a 1/8 or 1/6 grid onto it
    and leaves 1/12, 1/16 and 1/24 notes where they are. Notes that end up at the same (beat, x, y) are one: the
    one that moved least stays (the earliest in the input on a tie). Returns them sorted by (beat, x, y, color,
    direction).
    """
    # kept = {(beat, x, y): (beats moved, Note)}
    kept = {}
    for note in notes:
        beat = min((round(note.beat * d) / d for d in divisions), key=lambda grid_beat: abs(grid_beat - note.beat))
        if abs(beat - note.beat) > tolerance_beats:
            beat = round(note.beat * PPQ) / PPQ
        moved = abs(beat - note.beat)
        key = (beat, note.x, note.y)
        if key not in kept or moved < kept[key][0]:
            kept[key] = (moved, Note(beat, *note[1:]))
    return sorted(note for _, note in kept.values())


# ---- the score card: the rules a map is judged by, scores against a human map, evaluations ----
# The score card compares one generated difficulty with one human difficulty of the same song. Times are seconds,
# t = beat * 60 / bpm with each map's own BPM (BPM changes not applied, as DDC and Mapperatorinator score onsets).
# Rules (thresholds are the constants below; README "Score card" shows what they give on human maps):
# - onsets: notes closer than ONSET_MERGE_S are one onset (a double, stack or window counts once); generated and human
#   onsets are matched one-to-one within ±window by a two-pointer walk over the sorted times (the largest matching
#   in 1-D).
# - baseline: audio-blind, tempo-oracle. As many onsets as the generated map has, on the human map's 1/k-beat grid
#   (beat 0 at 0 s): k is the smallest of BASELINE_DIVISIONS whose grid points from the first to the last generated
#   onset (both rounded to the grid) are at least that many, and the onsets are grid points evenly spaced by index.
#   skill = F1 - baseline F1.
# - note type, on onsets matched at ±50 ms: colour = same set of colours at the onset; position / direction = same set
#   of (x, y) / of directions, per colour present in both. KL(human || generated) in nats over the 9 directions and the
#   12 grid cells, both histograms add-one smoothed (notes off the 4x3 grid are left out of the position histogram).
# - parity, per hand: the notes of one hand at one onset are one swing, along their first non-dot direction. Down,
#   down-left, down-right = down swing; up, up-left, up-right = up swing; left, right and dots take the swing opposite
#   to the hand's previous one (horizontals can be cut either way, as in bs-parity's "borderline" cuts). Two consecutive
#   swings of one hand in the same direction closer than PARITY_RESET_S are one error; a longer gap is a reset
#   (bomb resets are not seen: bombs are not notes).
# - vision block: a note at the middle layer of a centre lane (y 1, x 1 or 2) hides every later note in the same or a
#   neighbouring lane that comes within VISION_BLOCK_S (and not at the same onset); each hidden note counts once.
# - impossible double, per onset: two notes in one grid cell; or one hand with two arrows more than 45° apart; or a red
#   and a blue side by side in one layer (blue one lane right of red) whose arrows point into each other (red right,
#   up-right or down-right; blue left, up-left or down-left), so the sabers collide. A red and a blue swinging opposite
#   ways (one up, one down) is allowed: human maps use it.
ONSET_MERGE_S = 0.001                           # notes closer than this are one onset
SCORE_WINDOWS_S = (0.020, 0.050)                # ± onset match windows of the F1 scores
NOTE_TYPE_WINDOW_S = 0.050                      # ± window of the onsets whose note types are compared
BASELINE_DIVISIONS = (1, 2, 4, 8, 16, 32, 64)   # k of the 1/k-beat grids the baseline tries, coarsest first
NPS_BIN_S = 10.0                                # window of the notes-per-second curve
PARITY_RESET_S = 0.5                            # a same-direction swing after at least this long is a reset
VISION_BLOCK_S = 0.25                           # how long a middle-centre note hides the notes behind it
DOWN_SWING = {1, 6, 7}                          # cut directions: down, down-left, down-right
UP_SWING = {0, 4, 5}                            # cut directions: up, up-left, up-right
ARROW_ANGLE_DEG = {0: 90, 1: 270, 2: 180, 3: 0, 4: 135, 5: 45, 6: 225, 7: 315}   # cut direction → arrow angle
RED_INTO_BLUE = {3, 5, 7}                       # red arrows pointing right, toward a blue note on its right
BLUE_INTO_RED = {2, 4, 6}                       # blue arrows pointing left, toward a red note on its left


def note_onsets(notes, bpm):
    """notes = [Note, ...] in beats of bpm → (onsets_s, groups): onsets_s = (m,) float seconds, sorted, one per group
    of notes closer than ONSET_MERGE_S; groups = [[Note, ...], ...], the notes at each onset (sorted)."""
    onsets_s, groups = [], []
    for note in sorted(notes):
        time_s = note.beat * 60.0 / bpm
        if groups and time_s - onsets_s[-1] < ONSET_MERGE_S:
            groups[-1].append(note)
        else:
            onsets_s.append(time_s)
            groups.append([note])
    return np.array(onsets_s, dtype=float), groups


def match_onsets(estimated_s, reference_s, window_s):
    """Sorted onset times in seconds (two 1-D arrays) → [(i, j), ...] one-to-one pairs with |estimated_s[i] -
    reference_s[j]| <= window_s; walking both lists in order gives the largest such matching."""
    pairs = []
    i = j = 0
    while i < len(estimated_s) and j < len(reference_s):
        if abs(estimated_s[i] - reference_s[j]) <= window_s + 1e-9:
            pairs.append((i, j))
            i += 1
            j += 1
        elif estimated_s[i] < reference_s[j]:
            i += 1
        else:
            j += 1
    return pairs


def _precision_recall_f1(n_matched, n_estimated, n_reference):
    precision = n_matched / n_estimated if n_estimated else 0.0
    recall = n_matched / n_reference if n_reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def baseline_onsets(n_onsets, first_s, last_s, bpm):
    """The audio-blind baseline (rules above): n_onsets onsets on the 1/k-beat grid of bpm between first_s and last_s
    → (onsets_s, k): onsets_s = (n_onsets,) float seconds, sorted (fewer only if even the finest grid is too
    coarse)."""
    if n_onsets == 0:
        return np.zeros(0), BASELINE_DIVISIONS[0]
    for division in BASELINE_DIVISIONS:
        step_s = 60.0 / bpm / division
        # first_tick, last_tick = grid indices (1/division beat) nearest the first and last generated onsets
        first_tick, last_tick = round(first_s / step_s), round(last_s / step_s)
        if last_tick - first_tick + 1 >= n_onsets:
            break
    n_ticks = last_tick - first_tick + 1
    # ticks = (min(n_onsets, n_ticks),) int grid indices evenly spread over the span, distinct (floor(x + 0.5) rounding)
    ticks = first_tick + np.floor(np.linspace(0, n_ticks - 1, min(n_onsets, n_ticks)) + 0.5).astype(int)
    return ticks * step_s, division


def nps_curve(notes, bpm, end_s, bin_s=NPS_BIN_S):
    """notes in beats of bpm → (bins,) float notes per second in consecutive bin_s windows from 0 s to end_s."""
    times_s = np.array([note.beat * 60.0 / bpm for note in notes], dtype=float)
    n_bins = max(1, int(np.ceil(end_s / bin_s)))
    counts, _ = np.histogram(times_s, bins=n_bins, range=(0.0, n_bins * bin_s))
    return counts / bin_s


UP, DOWN = 1, -1                                # swing classes; 0 = the hand has not swung yet
HORIZONTAL = {2, 3}                             # left, right: the swing opposite to the hand's previous one
DOT = 8


def swing_of(direction, previous):
    """The swing one note of this direction makes after a swing `previous` (UP, DOWN or 0): down arrows DOWN, up
    arrows UP, left/right the opposite of previous, a dot 0 (undecided: the next arrow of its onset decides)."""
    if direction in DOWN_SWING:
        return DOWN
    if direction in UP_SWING:
        return UP
    if direction in HORIZONTAL:
        return opposite(previous)
    return 0


def opposite(swing):
    """The swing after `swing` when a horizontal arrow or dots decide (down after no swing)."""
    return UP if swing == DOWN else DOWN


def onset_swing(directions, previous):
    """The swing one hand makes at one onset whose notes point in directions (in note order) after `previous`: the
    first arrow decides (swing_of), dots alone take the opposite of previous. The one swing rule: the score card
    (parity_errors), the play constraint (PlayState) and thinning all resolve swings with it."""
    for direction in directions:
        swing = swing_of(direction, previous)
        if swing:
            return swing
    return opposite(previous)


def hand_swings(notes, bpm):
    """One hand's notes in beats of bpm → [(time_s, swing, rigid), ...] per onset: its swing (onset_swing after the
    one before) and whether an up or down arrow decided it (a rigid swing, which can be a parity error)."""
    swings, previous = [], 0
    for time_s, group in zip(*note_onsets(notes, bpm)):
        arrows = [note.direction for note in group if note.direction != DOT]
        previous = onset_swing(arrows, previous)
        swings.append((time_s, previous, bool(arrows) and arrows[0] in DOWN_SWING | UP_SWING))
    return swings


def parity_errors(notes, bpm):
    """notes in beats of bpm → {"red": int, "blue": int} swing-parity errors per hand (rules above): a rigid swing
    the same as the hand's one before, less than PARITY_RESET_S after it."""
    errors = {}
    for color, hand in ((0, "red"), (1, "blue")):
        swings = hand_swings([note for note in notes if note.color == color], bpm)
        errors[hand] = sum(bool(rigid and swing == before and time_s - before_s < PARITY_RESET_S)
                           for (before_s, before, _), (time_s, swing, rigid) in zip(swings, swings[1:]))
    return errors


def vision_blocks(notes, bpm):
    """notes in beats of bpm → number of notes hidden behind a middle-layer centre-lane note (rules above)."""
    notes = sorted(notes)
    times_s = [note.beat * 60.0 / bpm for note in notes]
    hidden = set()
    for i, blocker in enumerate(notes):
        if blocker.y != 1 or blocker.x not in (1, 2):
            continue
        for j in range(i + 1, len(notes)):
            delay_s = times_s[j] - times_s[i]
            if delay_s > VISION_BLOCK_S:
                break
            if delay_s >= ONSET_MERGE_S and abs(notes[j].x - blocker.x) <= 1:
                hidden.add(j)
    return len(hidden)


def _arrows_apart_deg(direction_a, direction_b):
    difference_deg = abs(ARROW_ANGLE_DEG[direction_a] - ARROW_ANGLE_DEG[direction_b]) % 360
    return min(difference_deg, 360 - difference_deg)


def impossible_doubles(notes, bpm):
    """notes in beats of bpm → number of onsets holding a physically impossible combination of notes (rules above)."""
    count = 0
    for group in note_onsets(notes, bpm)[1]:
        cells = [(note.x, note.y) for note in group]
        same_cell = len(set(cells)) < len(cells)
        wide_arrows = any(
            _arrows_apart_deg(a.direction, b.direction) > 45
            for a in group for b in group
            if a.color == b.color and a.direction in ARROW_ANGLE_DEG and b.direction in ARROW_ANGLE_DEG)
        clash = any(
            red.color == 0 and blue.color == 1 and red.y == blue.y and blue.x - red.x == 1
            and red.direction in RED_INTO_BLUE and blue.direction in BLUE_INTO_RED
            for red in group for blue in group)
        count += same_cell or wide_arrows or clash
    return count


def map_stats(notes, bpm):
    """notes in beats of bpm → {"notes", "onsets", "nps", "parity_errors_red", "parity_errors_blue", "vision_blocks",
    "impossible_doubles"}; nps = notes per second between the first and the last note."""
    onsets_s = note_onsets(notes, bpm)[0]
    span_s = onsets_s[-1] - onsets_s[0] if len(onsets_s) else 0.0
    parity = parity_errors(notes, bpm)
    return {"notes": len(notes), "onsets": len(onsets_s), "nps": len(notes) / span_s if span_s > 0 else 0.0,
            "parity_errors_red": parity["red"], "parity_errors_blue": parity["blue"],
            "vision_blocks": vision_blocks(notes, bpm), "impossible_doubles": impossible_doubles(notes, bpm)}


def reference_notes(path, difficulties):
    """{difficulty: (notes, bpm)} of a human map's (zip or folder) Standard difficulties among those named;
    ValueError when it has none of them."""
    beatmap = read_map(path)
    found = {name: (beatmap.difficulties[("Standard", name)].notes, beatmap.bpm)
             for name in difficulties if ("Standard", name) in beatmap.difficulties}
    if not found:
        raise ValueError(f"{path}: no Standard {'/'.join(difficulties)} difficulty (has {sorted(beatmap.difficulties)})")
    return found


def score_line(notes, bpm):
    """One line of a map's playability card: notes, NPS, parity errors per hand, vision blocks, impossible doubles."""
    stats = map_stats(notes, bpm)
    return (f"{stats['notes']} notes, {stats['nps']:.2f} NPS, parity errors {stats['parity_errors_red']} red / "
            f"{stats['parity_errors_blue']} blue, vision blocks {stats['vision_blocks']}, "
            f"impossible doubles {stats['impossible_doubles']}")


def _kl_divergence(reference_counts, generated_counts):
    # p, q = add-one smoothed probabilities of the human and the generated histogram
    p = (np.asarray(reference_counts) + 1.0) / (np.sum(reference_counts) + len(reference_counts))
    q = (np.asarray(generated_counts) + 1.0) / (np.sum(generated_counts) + len(generated_counts))
    return float(np.sum(p * np.log(p / q)))


def _histograms(notes):
    # directions = (9,) counts of cut directions 0..8; cells = (12,) counts of grid cells, index y * 4 + x
    directions, cells = np.zeros(len(DIRECTIONS)), np.zeros(len(LANES) * len(LAYERS))
    for note in notes:
        if note.direction in DIRECTIONS:
            directions[note.direction] += 1
        if note.x in LANES and note.y in LAYERS:
            cells[note.y * len(LANES) + note.x] += 1
    return directions, cells


def score_card(generated, reference, bpm_generated, bpm_reference):
    """generated, reference = [Note, ...] in beats of bpm_generated / bpm_reference → the score card, a dict of plain
    numbers (JSON-ready; None where undefined): per-map stats under "generated" and "reference", onset scores under
    "onset_20ms" / "onset_50ms", and NPS-curve, note-type and distribution scores (rules above the score-card code)."""
    generated_s, generated_groups = note_onsets(generated, bpm_generated)
    reference_s, reference_groups = note_onsets(reference, bpm_reference)
    if len(generated_s):
        baseline_s, division = baseline_onsets(len(generated_s), generated_s[0], generated_s[-1], bpm_reference)
    else:
        baseline_s, division = np.zeros(0), None
    card = {"generated": map_stats(generated, bpm_generated), "reference": map_stats(reference, bpm_reference),
            "baseline_division": division}
    for window_s in SCORE_WINDOWS_S:
        n_matched = len(match_onsets(generated_s, reference_s, window_s))
        n_baseline_matched = len(match_onsets(baseline_s, reference_s, window_s))
        precision, recall, f1 = _precision_recall_f1(n_matched, len(generated_s), len(reference_s))
        baseline_precision, baseline_recall, baseline_f1 = _precision_recall_f1(
            n_baseline_matched, len(baseline_s), len(reference_s))
        card[f"onset_{round(window_s * 1000)}ms"] = {
            "precision": precision, "recall": recall, "f1": f1, "baseline_precision": baseline_precision,
            "baseline_recall": baseline_recall, "baseline_f1": baseline_f1, "skill": f1 - baseline_f1}

    end_s = max(generated_s[-1] if len(generated_s) else 0.0, reference_s[-1] if len(reference_s) else 0.0)
    # generated_nps, reference_nps = (bins,) notes per second per NPS_BIN_S window, same bins for both
    generated_nps = nps_curve(generated, bpm_generated, end_s)
    reference_nps = nps_curve(reference, bpm_reference, end_s)
    defined = len(generated_nps) > 2 and np.std(generated_nps) > 0 and np.std(reference_nps) > 0
    card["nps_curve_pearson"] = float(np.corrcoef(generated_nps, reference_nps)[0, 1]) if defined else None

    # pairs = [(generated onset index, reference onset index), ...] matched at NOTE_TYPE_WINDOW_S
    pairs = match_onsets(generated_s, reference_s, NOTE_TYPE_WINDOW_S)
    color_hits, position_hits, direction_hits, n_hand_pairs = 0, 0, 0, 0
    for i, j in pairs:
        generated_colors = {note.color for note in generated_groups[i]}
        reference_colors = {note.color for note in reference_groups[j]}
        color_hits += generated_colors == reference_colors
        for color in generated_colors & reference_colors:
            generated_hand = [note for note in generated_groups[i] if note.color == color]
            reference_hand = [note for note in reference_groups[j] if note.color == color]
            position_hits += {(n.x, n.y) for n in generated_hand} == {(n.x, n.y) for n in reference_hand}
            direction_hits += {n.direction for n in generated_hand} == {n.direction for n in reference_hand}
            n_hand_pairs += 1
    card["matched_onsets"] = len(pairs)
    card["color_accuracy"] = color_hits / len(pairs) if pairs else None
    card["position_accuracy"] = position_hits / n_hand_pairs if n_hand_pairs else None
    card["direction_accuracy"] = direction_hits / n_hand_pairs if n_hand_pairs else None
    generated_directions, generated_cells = _histograms(generated)
    reference_directions, reference_cells = _histograms(reference)
    card["direction_kl"] = _kl_divergence(reference_directions, generated_directions)
    card["position_kl"] = _kl_divergence(reference_cells, generated_cells)
    return card


def _number(value, digits=2, sign=""):
    """A table cell: value with digits decimals (sign "+": always signed), "-" for None."""
    return "-" if value is None else f"{value:{sign}.{digits}f}"


def format_score_card(card):
    """score_card's dict → a printable multi-line table."""
    generated, reference = card["generated"], card["reference"]
    lines = [f"{'':28s}{'generated':>12s}{'human':>12s}",
             f"{'notes':28s}{generated['notes']:>12d}{reference['notes']:>12d}",
             f"{'onsets':28s}{generated['onsets']:>12d}{reference['onsets']:>12d}",
             f"{'notes per second':28s}{generated['nps']:>12.2f}{reference['nps']:>12.2f}"]
    for key, label in (("parity_errors_red", "parity errors red"), ("parity_errors_blue", "parity errors blue"),
                       ("vision_blocks", "vision blocks"), ("impossible_doubles", "impossible doubles")):
        lines.append(f"{label:28s}{generated[key]:>12d}{reference[key]:>12d}")
    division = card["baseline_division"]
    lines += ["", f"{'onsets':10s}{'precision':>10s}{'recall':>10s}{'F1':>10s}{'baseline F1':>13s}{'skill':>10s}"]
    for window_s in SCORE_WINDOWS_S:
        window_ms = round(window_s * 1000)
        scores = card[f"onset_{window_ms}ms"]
        lines.append(f"{f'±{window_ms} ms':10s}{scores['precision']:>10.3f}{scores['recall']:>10.3f}"
                     f"{scores['f1']:>10.3f}{scores['baseline_f1']:>13.3f}{scores['skill']:>+10.3f}")
    lines += [f"baseline: as many onsets on the human BPM's 1/{division}-beat grid, no audio" if division else
              "baseline: none (no generated notes)",
              f"NPS curve Pearson r ({NPS_BIN_S:g} s bins): {_number(card['nps_curve_pearson'], 3)}",
              f"on {card['matched_onsets']} onsets matched at ±{NOTE_TYPE_WINDOW_S * 1000:g} ms: colour "
              f"{_number(card['color_accuracy'], 3)}, position {_number(card['position_accuracy'], 3)}, direction "
              f"{_number(card['direction_accuracy'], 3)}",
              f"KL(human || generated), add-one smoothed, nats: direction {card['direction_kl']:.3f}, "
              f"position {card['position_kl']:.3f}"]
    return "\n".join(lines)


def evaluation_maps(source):
    """The human maps to evaluate on: source = a folder (its *.zip files and map folders, sorted) or a text file of
    map paths, one a line (train.py's heldout.txt) → [path, ...]; ValueError when there is none."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(str(p) for p in source.iterdir() if p.suffix.lower() == ".zip" or (p / "Info.dat").is_file())
    elif source.is_file():
        paths = [line.strip() for line in source.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{source}: no such folder of maps or list of map files")
    if not paths:
        raise ValueError(f"{source}: no maps in it")
    return paths


# per difficulty, the score-card numbers evaluation_summary averages: name → path in a card
EVALUATION_MEANS = {"f1_20ms": ("onset_20ms", "f1"), "f1_50ms": ("onset_50ms", "f1"),
                    "skill_20ms": ("onset_20ms", "skill"), "skill_50ms": ("onset_50ms", "skill"),
                    "nps_curve_r": ("nps_curve_pearson",), "colour": ("color_accuracy",),
                    "position": ("position_accuracy",), "direction": ("direction_accuracy",)}
PLAY_ERRORS = ("parity_errors_red", "parity_errors_blue", "vision_blocks", "impossible_doubles")


def evaluation_summary(songs):
    """songs = [{"cards": {difficulty: score_card}, ...}, ...] → {difficulty: {"songs", mean and median F1 at
    ±20/±50 ms, the means of EVALUATION_MEANS (None where no song defines one), "nps_ratio" (mean of generated /
    human NPS), playability errors per 100 notes of the generated and of the human maps}}, easiest first."""
    summary = {}
    for name in sorted({d for song in songs for d in song["cards"]}, key=lambda d: DIFFICULTIES[d].rank):
        cards = [song["cards"][name] for song in songs if name in song["cards"]]
        row = {"songs": len(cards)}
        for key, path in EVALUATION_MEANS.items():
            values = [_dig(card, path) for card in cards if _dig(card, path) is not None]
            row[key] = float(np.mean(values)) if values else None
        for window in ("20ms", "50ms"):
            row[f"f1_{window}_median"] = float(np.median([card[f"onset_{window}"]["f1"] for card in cards]))
        ratios = [c["generated"]["nps"] / c["reference"]["nps"] for c in cards if c["reference"]["nps"] > 0]
        row["nps_ratio"] = float(np.mean(ratios)) if ratios else None
        for side in ("generated", "reference"):
            notes = sum(card[side]["notes"] for card in cards)
            row[f"{side}_errors_per_100"] = {error: 100 * sum(card[side][error] for card in cards) / max(notes, 1)
                                             for error in PLAY_ERRORS}
        summary[name] = row
    return summary


def _dig(card, path):
    for key in path:
        card = card[key]
    return card


def format_evaluation(summary, failed=0):
    """evaluation_summary's dict → a printable table, one row per difficulty."""
    lines = [f"{'difficulty':11s}{'songs':>6s}{'F1 ±20 ms':>16s}{'F1 ±50 ms':>16s}{'skill 20/50':>13s}{'NPS ×':>7s}"
             f"{'NPS r':>7s}{'colour/pos/dir':>16s}   errors per 100 notes: generated | human "
             f"(parity red, blue, vision, doubles)"]
    for name, row in summary.items():
        errors = "  |  ".join(" ".join(f"{row[f'{side}_errors_per_100'][e]:.1f}" for e in PLAY_ERRORS)
                              for side in ("generated", "reference"))
        lines.append(f"{name:11s}{row['songs']:>6d}{_number(row['f1_20ms']):>9s} ({_number(row['f1_20ms_median'])})"
                     f"{_number(row['f1_50ms']):>9s} ({_number(row['f1_50ms_median'])})"
                     f"{_number(row['skill_20ms'], sign='+'):>7s}/{_number(row['skill_50ms'], sign='+'):<5s}"
                     f"{_number(row['nps_ratio']):>7s}{_number(row['nps_curve_r']):>7s}"
                     f"{_number(row['colour']):>6s}/{_number(row['position'])}/{_number(row['direction'])}   {errors}")
    lines.append("F1: mean (median); skill: F1 minus the audio-blind baseline's; NPS ×: generated / human notes per "
                 "second" + (f"; {failed} songs could not be evaluated" if failed else ""))
    return "\n".join(lines)


def human_difficulties(beatmap):
    """{difficulty: [Note, ...]} of a human map's Standard difficulties with notes at one tempo, the ones an
    evaluation scores against; ValueError when there is none or the song is offset."""
    if beatmap.song_time_offset_s:
        raise ValueError(f"song time offset {beatmap.song_time_offset_s} s")
    human = {name: difficulty.notes for (characteristic, name), difficulty in beatmap.difficulties.items()
             if characteristic == "Standard" and name in DIFFICULTIES and difficulty.notes and not difficulty.bpm_changes}
    if not human:
        raise ValueError("no Standard difficulty with notes at one tempo")
    return human


def write_evaluation(songs, failed, out_dir, as_json=False):
    """The evaluation of songs (each {"cards": {difficulty: score card}, ...}; failed = songs that could not be
    scored) → evaluation_summary, written with the songs to out_dir/evaluation.json, drawn to evaluation.png, and
    printed as a table (as_json: as JSON)."""
    summary = evaluation_summary(songs)
    write_atomic(Path(out_dir) / "evaluation.json", json.dumps({"summary": summary, "failed": failed, "songs": songs},
                                                               indent=1))
    if songs:
        evaluation_png(songs, Path(out_dir) / "evaluation.png")
    print(json.dumps(summary, indent=2) if as_json else format_evaluation(summary, failed))
    return summary


def evaluation_png(songs, path):
    """A picture of an evaluation (songs as evaluation_summary takes them) → PNG at path: per difficulty the
    distribution of onset F1 at ±50 ms over the songs (left) and each song's generated against human notes per
    second (right, the diagonal = the same density)."""
    names = sorted({d for song in songs for d in song["cards"]}, key=lambda d: DIFFICULTIES[d].rank)
    colours = [(110, 170, 250), (120, 220, 140), (240, 200, 80), (240, 130, 70), (230, 70, 90)]
    size, margin = 320, 40
    image = Image.new("RGB", (2 * size + 3 * margin, size + 2 * margin + 16 * len(names)), (22, 22, 26))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    for left, title in ((margin, "onset F1 ±50 ms: songs per 0.1"), (2 * margin + size, "NPS: generated (y) vs human (x)")):
        draw.rectangle([left, margin, left + size, margin + size], outline=(120, 120, 130))
        draw.text((left, margin - 16), title, fill="white", font=font)
    top_nps = max([1.0] + [max(c["generated"]["nps"], c["reference"]["nps"]) for s in songs for c in s["cards"].values()])
    draw.line([2 * margin + size, margin + size, 2 * margin + 2 * size, margin], fill=(90, 90, 100))
    for index, name in enumerate(names):
        colour = colours[DIFFICULTIES[name].rank // 2]
        cards = [song["cards"][name] for song in songs if name in song["cards"]]
        counts, _ = np.histogram([card["onset_50ms"]["f1"] for card in cards], bins=10, range=(0, 1))
        for bin_index, count in enumerate(counts):
            x0 = margin + bin_index * size / 10 + index * size / 10 / len(names)
            y1 = margin + size - count / max(1, len(songs)) * size
            draw.rectangle([x0, y1, x0 + size / 10 / len(names) - 1, margin + size], fill=colour)
        for card in cards:
            x = 2 * margin + size + card["reference"]["nps"] / top_nps * size
            y = margin + size - card["generated"]["nps"] / top_nps * size
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((margin, 2 * margin + size + 16 * index - 20), f"■ {name}: {len(cards)} songs", fill=colour, font=font)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    write_atomic(path, buffer.getvalue())


# ---- playable by construction: difficulties, the play constraint, thinning ----
# The constraint the generation grammar applies, in note space: which notes may come next so that the finished map
# has, by the score card's rules above, no parity error, no vision block and no impossible double, and follows the
# chosen difficulty. It works in seconds (each tick's time is given), on one segment of the song at a time (a chunk,
# or the range a regeneration replaces), whose neighbours are described by a SegmentStart and a SegmentEnd. It only
# ever removes options (the model picks among what is left) and never leaves a state with nothing allowed: EOS
# stays reachable. spec.md, "Playable by construction", gives the rules and why they are enough.
ROOM_VISION_S = VISION_BLOCK_S + 0.02           # a return swing may have to wait out a vision block
SAFETY_S = 1e-6                                 # s: margin on the score card's thresholds (times computed two ways differ)


@dataclass(frozen=True)
class DifficultyRules:
    """What a difficulty allows; the values and where they come from: DIFFICULTIES below, spec.md."""
    name: str
    rank: int                   # Info.dat _difficultyRank
    njs: float                  # note jump speed
    offset_beats: float         # note jump start beat offset
    nps: tuple                  # (low, high) notes per second of human maps of this difficulty
    hand_gap_s: float           # shortest time between two swings of one hand
    onset_gap_s: float          # shortest time between two onsets (notes of either hand)
    notes_per_onset: int        # most notes at one onset
    max_gap_s: float            # longest time without a note while the music has onsets (see PlayState.deadline_s)


# From the fixture maps (Standard, no mods; the numbers and their sources: spec.md, "Playable by construction"): NPS
# band = the spread of human maps of the difficulty; hand_gap_s and onset_gap_s at or below the human 5th percentile
# of one hand's swing-to-swing and of onset-to-onset gaps; max_gap_s near their 90th-95th percentile of onset gaps;
# notes_per_onset = what human maps of the difficulty put at one time (sliders and stacks aside).
DIFFICULTIES = {rules.name: rules for rules in (
    DifficultyRules("Easy", 1, 10.0, 0.0, (0.4, 1.6), hand_gap_s=1.0, onset_gap_s=0.5, notes_per_onset=1,
                    max_gap_s=1.6),
    DifficultyRules("Normal", 3, 10.0, 0.0, (0.9, 2.6), hand_gap_s=0.6, onset_gap_s=0.3, notes_per_onset=2,
                    max_gap_s=1.2),
    DifficultyRules("Hard", 5, 12.0, 0.0, (1.5, 4.0), hand_gap_s=0.28, onset_gap_s=0.19, notes_per_onset=2,
                    max_gap_s=0.8),
    DifficultyRules("Expert", 7, 16.0, 0.0, (2.8, 6.2), hand_gap_s=0.2, onset_gap_s=0.12, notes_per_onset=3,
                    max_gap_s=0.5),
    DifficultyRules("ExpertPlus", 9, 18.0, 0.0, (3.0, 8.7), hand_gap_s=0.16, onset_gap_s=0.06, notes_per_onset=4,
                    max_gap_s=0.45),
)}


@dataclass
class HandStart:
    swing: int                  # the hand's last swing before the segment: UP, DOWN, 0 = none
    swing_s: float              # its time (-inf: none)


@dataclass
class SegmentStart:
    """What lies before a segment: per hand its last swing, the last onset, and the notes that may hide later ones."""
    hands: tuple                # (HandStart red, HandStart blue)
    last_onset_s: float         # -inf: none
    blockers: list              # [(time_s, x), ...] middle-layer centre-lane notes of the last VISION_BLOCK_S

    @classmethod
    def song_start(cls):
        return cls((HandStart(0, -math.inf), HandStart(0, -math.inf)), -math.inf, [])

    @classmethod
    def seam(cls, start_s, rules):
        """A chunk after another generated in the same batch: its notes are unknown, but SegmentEnd.seam bounds them:
        each hand's last swing (if any) is an up swing at most start_s - hand_gap_s / 2; the last onset at most
        start_s - onset_gap_s / 2; no blocker in the last VISION_BLOCK_S. Assuming "up at start_s - hand_gap_s / 2"
        for both hands is then safe: every swing this chunk may start after it is right after the true one."""
        hand = HandStart(UP, start_s - rules.hand_gap_s / 2)
        return cls((hand, hand), start_s - rules.onset_gap_s / 2, [])

    @classmethod
    def after_notes(cls, notes, bpm):
        """The exact state after notes = [Note, ...] in beats of bpm (the kept part of a map before a regenerated
        range), each hand's last swing as hand_swings resolves it."""
        hands = []
        for color in (0, 1):
            swings = hand_swings([n for n in notes if n.color == color], bpm)
            hands.append(HandStart(swings[-1][1], swings[-1][0]) if swings else HandStart(0, -math.inf))
        onsets_s = note_onsets(notes, bpm)[0]
        last_onset_s = onsets_s[-1] if len(onsets_s) else -math.inf
        blockers = [(n.beat * 60 / bpm, n.x) for n in notes
                    if n.y == 1 and n.x in (1, 2) and n.beat * 60 / bpm >= last_onset_s - VISION_BLOCK_S]
        return cls(tuple(hands), last_onset_s, blockers)


@dataclass
class HandEnd:
    deadline_s: float           # the hand's last swing may come no later (inf: no limit)
    final: int                  # the swing the hand's last swing must end with (0: any) ...
    final_after_s: float        # ... when it comes later than this (-inf: always)


@dataclass
class SegmentEnd:
    """What follows a segment, as limits on the segment's own last notes."""
    hands: tuple                # (HandEnd red, HandEnd blue)
    onset_deadline_s: float     # no onset later than this
    protected: list             # [(time_s, x), ...] notes after the segment that no note of it may hide
    blocker_deadline_s: float   # no middle-layer centre-lane note later than this (inf: no limit)

    @classmethod
    def song_end(cls):
        hand = HandEnd(math.inf, 0, math.inf)
        return cls((hand, hand), math.inf, [], math.inf)

    @classmethod
    def seam(cls, end_s, rules):
        """Before a chunk that starts from SegmentStart.seam(end_s, rules): the limits that make that start true."""
        hand = HandEnd(end_s - rules.hand_gap_s / 2, UP, -math.inf)
        return cls((hand, hand), end_s - rules.onset_gap_s / 2, [], end_s + rules.onset_gap_s / 2 - VISION_BLOCK_S)

    @classmethod
    def before_notes(cls, notes, bpm, kept_before, replaced, rules):
        """Before notes = [Note, ...] (the kept rest of a map after a regenerated range): the generated range must leave
        each hand so that those notes resolve and play as they did after kept_before + replaced (the original)."""
        hands = []
        original = SegmentStart.after_notes(kept_before + replaced, bpm)
        for color in (0, 1):
            onsets_s, groups = note_onsets([n for n in notes if n.color == color], bpm)
            if not len(onsets_s):
                hands.append(HandEnd(math.inf, 0, math.inf))
                continue
            arrows = [n.direction for n in groups[0] if n.direction != DOT]
            rigid = swing_of(arrows[0], 0) if arrows and arrows[0] not in HORIZONTAL else 0
            if rigid:       # the next swing decides itself: no parity error with it, and room before it
                hands.append(HandEnd(onsets_s[0] - rules.hand_gap_s, opposite(rigid), onsets_s[0] - PARITY_RESET_S))
            else:           # it takes the swing opposite to ours: ours must be the original's
                hands.append(HandEnd(onsets_s[0] - rules.hand_gap_s, original.hands[color].swing or UP, -math.inf))
        onsets_s = note_onsets(notes, bpm)[0]
        first_s = onsets_s[0] if len(onsets_s) else math.inf
        protected = [(n.beat * 60 / bpm, n.x) for n in notes if n.beat * 60 / bpm <= first_s + VISION_BLOCK_S]
        return cls(tuple(hands), first_s - max(rules.onset_gap_s, 2 * ONSET_MERGE_S), protected, math.inf)


@dataclass
class KeptNotes:
    """The notes of a map kept around a range that is regenerated, in beats of bpm."""
    before: list                # [Note, ...] before span_s
    inside: list                # the notes the range replaces
    after: list                 # after span_s
    bpm: float
    span_s: tuple               # (start_s, end_s) of the regenerated range

    @classmethod
    def split(cls, notes, bpm, span_s):
        times_s = [note.beat * 60 / bpm for note in notes]
        return cls([n for n, t in zip(notes, times_s) if t < span_s[0]],
                   [n for n, t in zip(notes, times_s) if span_s[0] <= t < span_s[1]],
                   [n for n, t in zip(notes, times_s) if t >= span_s[1]], bpm, tuple(span_s))

    @classmethod
    def read(cls, path, difficulties, bpm, span_s):
        """The map (zip or folder) to regenerate span_s of → (maps.BeatMap, {difficulty: KeptNotes}); ValueError when
        it lacks a Standard difficulty, changes tempo, has a song offset, or bpm (not None) differs from its BPM."""
        base_map = read_map(path)
        if base_map.song_time_offset_s:
            raise ValueError(f"{path}: song time offset {base_map.song_time_offset_s} s (bake it into the audio first)")
        if bpm is not None and abs(bpm - base_map.bpm) > 1e-6:
            raise ValueError(f"--bpm {bpm:g} differs from {path}'s {base_map.bpm:g} BPM (leave --bpm out)")
        kept = {}
        for name in difficulties:
            difficulty = base_map.difficulties.get(("Standard", name))
            if difficulty is None:
                raise ValueError(f"{path}: no Standard {name} difficulty (has "
                                 f"{', '.join('/'.join(key) for key in base_map.difficulties) or 'none'})")
            if difficulty.bpm_changes:
                raise ValueError(f"{path}: {name} changes tempo; regeneration needs one tempo")
            kept[name] = cls.split(difficulty.notes, base_map.bpm, span_s)
        return base_map, kept


def segment_edges(rules, start_s, end_s, song_s, kept=None):
    """(SegmentStart, SegmentEnd) of a chunk covering [start_s, end_s) of a song of song_s seconds, generated in one
    batch with its neighbours: exact at the song's start and end and, with kept (a regenerated range), at the kept
    notes around the range; between chunks the seam bounds (SegmentStart.seam, SegmentEnd.seam)."""
    if kept is not None and start_s <= kept.span_s[0]:
        start = SegmentStart.after_notes(kept.before, kept.bpm)
    elif start_s <= 0:
        start = SegmentStart.song_start()
    else:
        start = SegmentStart.seam(start_s, rules)
    if kept is not None and end_s >= kept.span_s[1]:
        end = SegmentEnd.before_notes(kept.after, kept.bpm, kept.before, kept.inside, rules)
    elif end_s >= song_s - 1e-6:
        end = SegmentEnd.song_end()
    else:
        end = SegmentEnd.seam(end_s, rules)
    return start, end


class PlayState:
    """One segment's notes as they are generated, and what may come next.

    times_s = (ticks,) float seconds of each tick of the segment (non-decreasing); candidates = (K, 4) int
    (x, y, color, direction) of the note types the grammar offers; onsets_s = sorted audio onset times of the song;
    first_tick: the segment's first tick (the ticks before belong to its chunk but not to the segment).
    Use per note: tick_mask() → the ticks the next note may take and whether the segment may end there; at(tick) for
    the tick chosen; type_mask() → which candidates may be the note at that tick; push(k) for the one chosen. A note
    at the tick of the previous note joins its onset. Everything is a mask over the model's choices, never a choice.
    closing=True (few tokens left) allows only the notes the segment's end needs, and the end.
    """

    def __init__(self, rules, times_s, candidates, onsets_s, start=None, end=None, first_tick=0):
        self.rules = rules
        self.first_tick = first_tick                # no note before this tick (a regenerated range's start)
        self.times_s = np.asarray(times_s, dtype=float)
        self.onsets_s = np.asarray(onsets_s, dtype=float)
        start = start or SegmentStart.song_start()
        self.end = end or SegmentEnd.song_end()
        # the segment's own last onset time (a finite number: the last tick, or the end's onset deadline)
        self.end_s = min(self.times_s[-1] if len(self.times_s) else -math.inf, self.end.onset_deadline_s)
        # candidate columns (K,): x, y, color, direction; swing of each direction after an up / a down / no swing
        candidates = np.asarray(candidates, dtype=int).reshape(-1, 4)
        self.x, self.y, self.color, self.direction = candidates.T
        self.valid = (np.isin(self.x, LANES) & np.isin(self.y, LAYERS) & np.isin(self.color, COLORS)
                      & (self.direction >= 0) & (self.direction <= DOT))
        self.swing_after = {prev: np.array([swing_of(d, prev) for d in self.direction]) for prev in (UP, DOWN, 0)}
        self.rigid = np.isin(self.direction, list(DOWN_SWING | UP_SWING))
        self.dot = self.direction == DOT
        self.angle = np.array([ARROW_ANGLE_DEG.get(d, np.nan) for d in self.direction], dtype=float)
        self.blocker = (self.y == 1) & np.isin(self.x, (1, 2))
        self.red_into_blue = np.isin(self.direction, list(RED_INTO_BLUE))
        self.blue_into_red = np.isin(self.direction, list(BLUE_INTO_RED))
        # per hand: the swing before the current onset and its time
        self.swing = [hand.swing for hand in start.hands]
        self.swing_s = [hand.swing_s for hand in start.hands]
        self.last_onset_s = start.last_onset_s      # the onset before the current one
        self.blockers = list(start.blockers)        # [(time_s, x), ...] that may still hide a later note
        self.tick = -1                              # tick of the current onset (-1: none yet)
        self.onset = []                             # candidate indices of the notes at the current onset
        self.onset_directions = [[], []]            # per hand the directions of its notes at the current onset
        self.dead_ends = 0                          # times nothing but a forced end was left (never, by design)

    # ---- the current onset ----

    def _resolved(self, hand):
        """(swing, time_s) the hand leaves after the current onset."""
        if not self.onset_directions[hand]:
            return self.swing[hand], self.swing_s[hand]
        return onset_swing(self.onset_directions[hand], self.swing[hand]), self.times_s[self.tick]

    def _deciding(self, hand):
        """The hand's swing at the current onset so far: None (no note there), 0 (dots only: undecided), UP, DOWN."""
        directions = self.onset_directions[hand]
        if not directions:
            return None
        return onset_swing(directions, self.swing[hand]) if any(d != DOT for d in directions) else 0

    def _ends_well(self, hand, swing, swing_s):
        """Whether a hand whose last swing is (swing, swing_s) meets the segment's end."""
        end = self.end.hands[hand]
        return swing == 0 or swing_s <= end.final_after_s or end.final in (0, swing)

    def at(self, tick):
        """The next note goes at tick: a new onset when it is later than the current one."""
        if tick != self.tick:
            for hand in (0, 1):
                self.swing[hand], self.swing_s[hand] = self._resolved(hand)
            if self.onset:
                self.last_onset_s = self.times_s[self.tick]
            self.tick, self.onset, self.onset_directions = tick, [], [[], []]

    def push(self, k):
        """Candidate k is the note at the current tick."""
        self.onset_directions[self.color[k]].append(int(self.direction[k]))
        self.onset.append(k)
        if self.blocker[k]:
            self.blockers.append((self.times_s[self.tick], self.x[k]))

    # ---- rules ----

    def deadline_s(self, last_s):
        """The latest time an onset may follow one at last_s: last_s + max_gap_s when the audio has an onset between
        last_s + onset_gap_s and that; else the first audio onset after it (inf when none). While the music plays the
        map keeps the player busy; in a break it may wait."""
        rules = self.rules
        gap_end_s = last_s + rules.max_gap_s
        i = np.searchsorted(self.onsets_s, last_s + rules.onset_gap_s, side="right")
        if i < len(self.onsets_s) and self.onsets_s[i] <= gap_end_s:
            return gap_end_s
        j = np.searchsorted(self.onsets_s, gap_end_s, side="right")
        return self.onsets_s[j] if j < len(self.onsets_s) else math.inf

    def _swings(self, hand, times_s, swing, swing_s):
        """A new swing of `hand` at each of times_s (array) after (swing, swing_s) → (may_up, may_down, flexible) bool
        arrays: whether an up arrow, a down arrow, a note taking the swing opposite to the last (horizontal arrow,
        dot) may start it, by the shortest gap, parity, deadline and end rules."""
        rules, end = self.rules, self.end.hands[hand]
        deadline_s = min(end.deadline_s, self.end.onset_deadline_s)
        ok = (times_s >= swing_s + rules.hand_gap_s - 1e-9) & (times_s <= end.deadline_s)
        too_soon = times_s - swing_s < PARITY_RESET_S + SAFETY_S
        # a swing that cannot be the last (the end wants the other) needs room for one more before the deadline
        room = times_s + rules.hand_gap_s + ROOM_VISION_S + 2 * rules.onset_gap_s <= deadline_s
        late = times_s > end.final_after_s
        may = {}
        for cls in (UP, DOWN):
            may[cls] = ok & ~(too_soon & (cls == swing)) & (room | ~late | (end.final in (0, cls)))
        return may[UP], may[DOWN], may[opposite(swing)]

    def _lanes_free(self, times_s):
        """(len(times_s), 4) bool: the lanes in which a note at those times is hidden by no blocker."""
        free = np.ones((len(times_s), 4), dtype=bool)
        for blocker_s, blocker_x in self.blockers:
            hidden = ((times_s - blocker_s >= ONSET_MERGE_S - SAFETY_S)
                      & (times_s - blocker_s <= VISION_BLOCK_S + SAFETY_S))
            free[hidden, max(0, blocker_x - 1):blocker_x + 2] = False
        return free

    def _last_chance(self, hand, times_s):
        """(len(times_s),) bool: whether an onset at times_s is the hand's last chance to make the swing the end wants
        (it has not made it yet, and no later onset, onset_gap_s on, would still come by its deadline)."""
        if self._ends_well(hand, *self._resolved(hand)):
            return np.zeros(len(times_s), dtype=bool)
        deadline_s = min(self.end.hands[hand].deadline_s, self.end.onset_deadline_s)
        return times_s + self.rules.onset_gap_s > deadline_s + SAFETY_S

    def _feasible(self, first, stop, closing):
        """(stop - first,) bool: ticks first..stop-1 (all after the current onset) where some note may start an onset.
        Where it is some hand's last chance (_last_chance), that hand must be able to make its final swing there."""
        times_s = self.times_s[first:stop]
        onset_s = self.times_s[self.tick] if self.onset else self.last_onset_s
        feasible = (times_s >= onset_s + self.rules.onset_gap_s - 1e-9) & (times_s <= self.end.onset_deadline_s)
        if not feasible.any():
            return feasible
        feasible &= self._lanes_free(times_s).any(axis=1)
        can_swing = np.zeros(len(times_s), dtype=bool)
        must_ok = np.ones(len(times_s), dtype=bool)       # every hand at its last chance can make its final swing
        musts = np.zeros(len(times_s), dtype=int)         # how many hands are at their last chance
        for hand in (0, 1):
            swing, swing_s = self._resolved(hand)
            may_up, may_down, flexible = self._swings(hand, times_s, swing, swing_s)
            if not closing:
                can_swing |= may_up | may_down | flexible
            elif not self._ends_well(hand, swing, swing_s):
                can_swing |= may_up if self.end.hands[hand].final == UP else may_down
            must = self._last_chance(hand, times_s)
            final = may_up if self.end.hands[hand].final == UP else may_down
            must_ok &= ~must | final
            musts += must
        return feasible & np.where(musts > 0, must_ok & (musts <= self.rules.notes_per_onset), can_swing)

    def tick_mask(self, closing=False):
        """→ (allowed, eos): allowed = (ticks,) bool, the ticks the next note may take (the current onset's, to join
        it, or later ones); eos = whether the segment may end now."""
        allowed = np.zeros(len(self.times_s), dtype=bool)
        if self.onset and self.type_mask(closing).any():
            allowed[self.tick] = True
        onset_s = self.times_s[self.tick] if self.onset else self.last_onset_s
        if not math.isfinite(onset_s):      # nothing yet: the gap counts from the segment's start
            start_s = self.times_s[self.first_tick] if self.first_tick < len(self.times_s) else 0.0
            onset_s = start_s - self.rules.onset_gap_s
        self.blockers = [(t, x) for t, x in self.blockers if t >= onset_s - VISION_BLOCK_S]
        deadline_s = self.deadline_s(onset_s)
        first = max(self.tick + 1, self.first_tick)
        stop = max(first, int(np.searchsorted(self.times_s, deadline_s + 1e-9, side="right")))
        window = self._feasible(first, stop, closing)
        allowed[first:stop] = window
        later = np.zeros(0, dtype=bool)
        if not window.any():                # nothing by the deadline: the next feasible ticks, within max_gap_s
            later = self._feasible(stop, len(self.times_s), closing)
            if later.any():
                start_s = self.times_s[stop + int(np.argmax(later))]
                later &= self.times_s[stop:] <= start_s + self.rules.max_gap_s
                allowed[stop:] = later
        ends_well = all(self._ends_well(hand, *self._resolved(hand)[:2]) for hand in (0, 1))
        eos = ends_well and (closing or deadline_s > self.end_s or not (window.any() or later.any()))
        if not eos and not allowed.any():
            self.dead_ends += 1
            eos = True
        return allowed, eos

    def type_mask(self, closing=False):
        """(K,) bool: the candidates that may be the note at the current tick (set by at())."""
        time_s = self.times_s[self.tick]
        mask = self.valid & self._lanes_free(np.array([time_s]))[0][np.clip(self.x, 0, 3)]
        mask &= ~(self.blocker & (time_s > self.end.blocker_deadline_s))
        for protected_s, protected_x in self.end.protected:
            if ONSET_MERGE_S - SAFETY_S <= protected_s - time_s <= VISION_BLOCK_S + SAFETY_S:
                mask &= ~(self.blocker & (np.abs(self.x - protected_x) <= 1))
        if len(self.onset) >= self.rules.notes_per_onset:
            return np.zeros_like(mask)
        for k in self.onset:
            mask &= ~((self.x == self.x[k]) & (self.y == self.y[k]))
            if self.color[k] == 0 and self.red_into_blue[k]:
                mask &= ~((self.color == 1) & (self.y == self.y[k]) & (self.x == self.x[k] + 1) & self.blue_into_red)
            if self.color[k] == 1 and self.blue_into_red[k]:
                mask &= ~((self.color == 0) & (self.y == self.y[k]) & (self.x == self.x[k] - 1) & self.red_into_blue)
        # hands at their last chance (see _last_chance) that have no note here yet: the next note is one of theirs
        musts = [hand for hand in (0, 1) if self._deciding(hand) is None
                 and self._last_chance(hand, np.array([time_s]))[0]]
        for hand in (0, 1):
            if self._deciding(hand) is None:
                hand_mask = self._starts_swing(hand, time_s, closing or hand in musts)
            else:
                hand_mask = self._joins_swing(hand, closing)
            mask &= (self.color != hand) | hand_mask
        if musts:
            mask &= np.isin(self.color, musts)
        return mask

    def _starts_swing(self, hand, time_s, closing):
        """(K,) bool: candidates that may start a swing of `hand` at time_s."""
        swing, swing_s = self.swing[hand], self.swing_s[hand]
        may_up, may_down, flexible = (bool(m[0]) for m in self._swings(hand, np.array([time_s]), swing, swing_s))
        if closing:
            if self._ends_well(hand, swing, swing_s):
                return np.zeros(len(self.x), dtype=bool)
            final = self.end.hands[hand].final
            may_up, may_down, flexible = may_up and final == UP, may_down and final == DOWN, False
        after = self.swing_after[swing]
        return (self.rigid & (((after == UP) & may_up) | ((after == DOWN) & may_down))) | (~self.rigid & flexible)

    def _joins_swing(self, hand, closing):
        """(K,) bool: candidates that may join `hand`'s swing at the current onset: notes of the same swing (dots
        always), arrows at most 45° from the hand's other arrows there."""
        if closing:
            return np.zeros(len(self.x), dtype=bool)
        deciding, after = self._deciding(hand), self.swing_after[self.swing[hand]]
        if deciding == 0:                 # dots so far: an arrow decides the swing, where parity allows it
            may_up, may_down, _ = (bool(m[0]) for m in self._swings(
                hand, np.array([self.times_s[self.tick]]), self.swing[hand], self.swing_s[hand]))
            mask = ((after == UP) & may_up) | ((after == DOWN) & may_down) | self.dot
        else:
            mask = (after == deciding) | self.dot
        for k in self.onset:
            if self.color[k] == hand and not self.dot[k]:
                apart_deg = np.abs((self.angle - self.angle[k] + 180) % 360 - 180)
                mask &= ~(apart_deg > 45)   # NaN (a dot) compares False: dots stay allowed
        return mask


# every (x, y, color, direction) a note can have: the candidates of thin_notes' play state
ALL_NOTES = np.array([(x, y, color, direction) for x in LANES for y in LAYERS for color in COLORS
                      for direction in DIRECTIONS])
# a direction → the one that swings the other way (dots and horizontals stay: parity never needs them changed)
REVERSED = {0: 1, 1: 0, 4: 7, 7: 4, 5: 6, 6: 5, 2: 2, 3: 3, 8: 8}


def thin_notes(notes, bpm, rules, onsets_s, strength):
    """A dense playable map → the map of an easier difficulty made of its notes: notes = [Note, ...] in beats of bpm;
    onsets_s = the audio's onsets (audio_onsets); strength(times_s) → the audio's onset strength there. Only notes
    within SCORE_WINDOWS_S[1] of an audio onset are kept (an easier map follows what the music plays), unless that
    leaves the map below the difficulty's NPS band; then all are candidates. A PlayState for `rules` whose ticks are
    the candidates' onsets walks the song: among the onsets it allows next (its shortest gaps, density deadline and
    playability rules), the one on the strongest audio onset is kept, with its notes — each as it was, or with its
    direction reversed, or as a dot, whichever the rules allow first (so a hand's swings keep alternating: the flow).
    Returns the kept notes, sorted; every rule of the difficulty holds, as for a generated map."""
    onsets_s = np.asarray(onsets_s, dtype=float)
    if len(onsets_s) and notes:
        # times_s = (notes,) each note's time; apart_s = its distance to the nearest audio onset
        times_s = np.array([n.beat * 60 / bpm for n in notes])
        j = np.searchsorted(onsets_s, times_s)
        apart_s = np.minimum(np.abs(times_s - onsets_s[np.maximum(j - 1, 0)]),
                             np.abs(onsets_s[np.minimum(j, len(onsets_s) - 1)] - times_s))
        on_audio = [n for n, near in zip(notes, apart_s <= SCORE_WINDOWS_S[1]) if near]
        thinned = _thin(on_audio, bpm, rules, onsets_s, strength)
        if thinned and map_stats(thinned, bpm)["nps"] >= rules.nps[0]:
            return thinned
    return _thin(notes, bpm, rules, onsets_s, strength)


def _thin(notes, bpm, rules, onsets_s, strength):
    """thin_notes' walk over the onsets of notes."""
    onsets = note_onsets(notes, bpm)
    times_s, groups = onsets[0], onsets[1]
    if not len(times_s):
        return []
    state = PlayState(rules, times_s, ALL_NOTES, onsets_s)
    power = strength(times_s)
    index = {tuple(row): k for k, row in enumerate(ALL_NOTES)}
    kept = []
    while True:
        allowed, _ = state.tick_mask()
        allowed[:state.tick + 1] = False            # one visit per onset
        if not allowed.any():
            break
        candidates = np.flatnonzero(allowed)
        tick = int(candidates[np.argmax(power[candidates])])
        state.at(tick)
        for note in groups[tick]:
            mask = state.type_mask()
            for direction in (note.direction, REVERSED[note.direction], DOT):
                k = index[(note.x, note.y, note.color, direction)]
                if mask[k]:
                    state.push(k)
                    kept.append(note._replace(direction=direction))
                    break
    return sorted(kept)


# ---- tempo, beat phase and audio onsets ----
TEMPO_HOP = 256                  # samples per onset-envelope frame (light show, audio onsets)
ONSET_HOP_S, ONSET_FRAME_S = 0.0025, 0.02   # short frames for onset times (≈ 3 ms late on clicks)
ONSET_MELS = 40                  # mel bands of those short frames (more leave bands empty)
ONSET_SPLIT_HZ = 250             # onsets below (kick, bass) and above weigh the same in the beat phase
BEAT_WINDOW = 1 / 10             # onsets within this many beats of the grid fit the final line
QUIET_DB = -40.0                 # dB below the song's loud frames (95th percentile RMS) where the music counts as quiet
# Chosen on 41 real songs with known tempo maps (4 + 4 Frets on Fire songs, 25 LMMS and 8 Hydrogen demo projects;
# README "Tempo" has the table): the prior and the bass weight lie in the middle of the range that gets 40 of 41.
SALIENCE_HOP, SALIENCE_FFT = 128, 1024   # samples per frame (5.3 ms at 24 kHz) and FFT size of the salience envelopes
TEMPO_RANGE_BPM = (55.0, 250.0)  # metrical levels a map's BPM takes
TEMPO_CANDIDATES = 3000          # candidate tempi in that range, log-spaced (0.05 % apart)
TEMPO_HARMONICS = (1, 2, 4)      # the beat, its 1/2 and its 1/4 subdivision
TEMPO_PRIOR_BPM, TEMPO_PRIOR_OCTAVES = 100.0, 1.0   # log-normal prior over tempi: centre, spread in octaves
LOW_BAND_HZ, LOW_BAND_WEIGHT = 150, 0.35   # the bass band's salience counts this much beside the full band's
TEMPO_SURE_MARGIN = 0.25         # log-score gap below which another metrical level is reported as a candidate
TEMPO_SEARCH, TEMPO_STEPS = 0.015, 601     # the periodicity fit searches ±1.5 % of the level in 0.005 % steps
PHASE_WEAK_RATIO = 0.6           # half-beat shift collecting this share of the best grid's strength: a weak choice
DRIFT_LIMIT = 0.01               # the song's thirds differing by more than 1 % in tempo: it drifts (steady real songs
                                 # measured ≤ 0.5 %, a synthetic 2 % drift 1.3 %)


class BeatEstimate(NamedTuple):
    """A song's beat grid: beat k at first_beat_s + k * 60 / bpm seconds."""
    bpm: float
    first_beat_s: float         # 0 <= first_beat_s < 60 / bpm (the grid may start in an intro)
    candidates: tuple           # (bpm, ...) other metrical levels scored within TEMPO_SURE_MARGIN; () when none
    drift: float                # (max - min) / mean of the tempo measured in each third of the song

    @property
    def sure(self):
        return not self.candidates and self.drift <= DRIFT_LIMIT

    def warning(self):
        """One line for the user when the estimate is not sure, else None."""
        if self.sure:
            return None
        if self.candidates:
            others = " or ".join(f"{bpm:.1f}" for bpm in self.candidates)
            why = f"{self.bpm:.1f} BPM is likely, but so is {others}"
        else:
            why = f"the tempo drifts ({self.drift:.1%} between the song's thirds), so one BPM cannot fit it all"
        return f"tempo uncertain: {why}; the map is written at {self.bpm:.2f} BPM, pass --bpm to choose another"


def estimate_beat(audio, sample_rate) -> BeatEstimate:
    """Tempo and beat phase of a song at one steady tempo: audio = (samples,) float mono at sample_rate Hz.

    1. Metrical level: each candidate tempo c in TEMPO_RANGE_BPM scores log Σ_k |X(k·c)| over k in TEMPO_HARMONICS
       (the beat, its 1/2 and 1/4 subdivisions) of the onset envelope's spectrum X, plus LOW_BAND_WEIGHT times the same
       for the bass band (kicks and bass notes mark beats), plus a log-normal prior around TEMPO_PRIOR_BPM. A tempo
       2/3 of the truth loses because its 1/2 and 1/4 subdivisions fall between the music's; half or double tempo
       because one side of the beat's three octaves holds less. Other levels within TEMPO_SURE_MARGIN are returned
       as candidates (measured on 41 real songs: README "Tempo").
    2. The tempo within ±TEMPO_SEARCH that maximises Σ_k |X(k·bpm)|, k = 1..4 (periodicity fit).
    3. The grid offset (1 ms steps) whose beats collect the most onset strength, in short frames with the bands below
       and above ONSET_SPLIT_HZ weighing the same. When the half-beat shift collects almost as much (a ratio above
       PHASE_WEAK_RATIO: off-beat hi-hats, skanks or bass), the music's entry decides: songs start on a beat.
    4. A least-squares line t = first_beat_s + k * 60 / bpm through the onsets within BEAT_WINDOW of the grid.
    drift: how far the tempo of the song's thirds differ (live playing, tempo changes); above DRIFT_LIMIT not sure.
    Raises ValueError when there is no beat to find (silence, a few seconds of audio).
    """
    audio = np.asarray(audio, dtype=np.float32)
    # envelopes = (mel onset strength, bass-band spectral flux), (frames,) each at sample_rate / SALIENCE_HOP Hz
    magnitude = np.abs(librosa.stft(audio, n_fft=SALIENCE_FFT, hop_length=SALIENCE_HOP))
    mel_db = librosa.power_to_db(librosa.feature.melspectrogram(S=magnitude ** 2, sr=sample_rate))
    bass = np.log1p(100 * magnitude[librosa.fft_frequencies(sr=sample_rate, n_fft=SALIENCE_FFT) < LOW_BAND_HZ])
    envelopes = (librosa.onset.onset_strength(S=mel_db, sr=sample_rate),
                 np.r_[0.0, np.maximum(0, np.diff(bass, axis=1)).sum(axis=0)])
    frame_rate = sample_rate / SALIENCE_HOP
    if len(envelopes[0]) < 4 * frame_rate or not envelopes[0].any():
        raise ValueError("no beat found: the audio is silent or too short")
    level_bpm, alternatives = _metrical_level(envelopes, frame_rate)
    period_s = 60 / _periodicity_bpm(envelopes[0], frame_rate, level_bpm, TEMPO_SEARCH, TEMPO_STEPS)
    # drift = relative spread of the tempo measured in each third of the song (±5 %)
    thirds = [_periodicity_bpm(third, frame_rate, 60 / period_s, 0.05, 2001)
              for third in np.array_split(envelopes[0], 3)]
    drift = (max(thirds) - min(thirds)) / np.mean(thirds)
    # 3. sharp = (frames,) onset strength at ONSET_HOP_S (frame times sharp_s), bands below / above ONSET_SPLIT_HZ
    # scaled to unit variance and summed
    hop = round(ONSET_HOP_S * sample_rate)
    split = int(np.searchsorted(librosa.mel_frequencies(ONSET_MELS + 2, fmax=sample_rate / 2)[1:-1], ONSET_SPLIT_HZ))
    bands = librosa.onset.onset_strength_multi(y=audio, sr=sample_rate, hop_length=hop, n_mels=ONSET_MELS,
                                               n_fft=2 ** round(math.log2(ONSET_FRAME_S * sample_rate)),
                                               channels=[0, max(split, 1), ONSET_MELS])
    sharp = sum((band - band.mean()) / (band.std() + 1e-12) for band in bands)
    sharp_s = np.arange(len(sharp)) * hop / sample_rate
    onsets_s = librosa.onset.onset_detect(onset_envelope=sharp, sr=sample_rate, hop_length=hop, units="time")
    first_beat_s = _beat_phase(audio, sample_rate, sharp, sharp_s, onsets_s, period_s)
    # 4. beats = (onsets,) index of the nearest grid beat
    beats = np.round((onsets_s - first_beat_s) / period_s)
    on_grid = np.abs(onsets_s - first_beat_s - beats * period_s) < BEAT_WINDOW * period_s
    if len(np.unique(beats[on_grid])) >= 4:
        period_s, first_beat_s = np.polyfit(beats[on_grid], onsets_s[on_grid], 1)
    return BeatEstimate(float(60 / period_s), float(first_beat_s % period_s), alternatives, float(drift))


def _metrical_level(envelopes, frame_rate):
    """envelopes = (full band, bass band) onset envelopes at frame_rate → (bpm, alternatives): the best-scored tempo
    (estimate_beat, step 1) and the other metrical levels scored within TEMPO_SURE_MARGIN of it, best first."""
    # candidates = (n,) tempi; score = (n,) log salience + log prior
    candidates = np.geomspace(*TEMPO_RANGE_BPM, TEMPO_CANDIDATES)
    score = -0.5 * (np.log2(candidates / TEMPO_PRIOR_BPM) / TEMPO_PRIOR_OCTAVES) ** 2
    for envelope, weight in zip(envelopes, (1.0, LOW_BAND_WEIGHT)):
        score += weight * np.log(_harmonic_salience(envelope, frame_rate, candidates) + 1e-9)
    best = int(np.argmax(score))
    alternatives = []
    for i in np.argsort(score)[::-1]:       # one per metrical level: the best-scored tempo of each 3 % neighbourhood
        if score[best] - score[i] >= TEMPO_SURE_MARGIN:
            break
        if all(abs(candidates[i] / seen - 1) > 0.03 for seen in [candidates[best], *alternatives]):
            alternatives.append(float(candidates[i]))
    return float(candidates[best]), tuple(alternatives)


def _harmonic_salience(envelope, frame_rate, candidates):
    """envelope = (frames,) at frame_rate Hz; candidates = (n,) tempi → (n,) Σ_k |X(k·c / 60 Hz)| / max |X| over k in
    TEMPO_HARMONICS, each |X| the largest within ±0.3 % of k·c (the peak of a 3-minute song is ~0.3 BPM wide)."""
    envelope = envelope - envelope.mean()
    n_fft = 1 << math.ceil(math.log2(16 * len(envelope)))
    # spectrum = (n_fft / 2 + 1,) |X| at bins bpm_per_bin apart
    spectrum = np.abs(np.fft.rfft(envelope, n_fft))
    bpm_per_bin = frame_rate / n_fft * 60
    salience = np.zeros(len(candidates))
    for k in TEMPO_HARMONICS:
        lo = np.floor(k * candidates * 0.997 / bpm_per_bin).astype(int)
        hi = np.ceil(k * candidates * 1.003 / bpm_per_bin).astype(int) + 1
        salience += np.maximum.reduceat(spectrum, np.ravel(np.column_stack([lo, hi])))[::2]
    return salience / (spectrum[int(40 / bpm_per_bin):].max() + 1e-12)


def _beat_phase(audio, sample_rate, sharp, sharp_s, onsets_s, period_s):
    """The grid offset in [0, period_s) whose beats collect the most of sharp = (frames,) onset strength at times
    sharp_s, or its half-beat shift when that collects almost as much and the music's first onset (after its entry,
    its first frame not QUIET_DB below its loud frames) lies on the shifted grid (estimate_beat, step 3)."""
    offsets_s = np.arange(0, period_s, 0.001)
    comb = np.interp(offsets_s[:, None] + np.arange(0, sharp_s[-1], period_s), sharp_s, sharp).mean(axis=1)
    best = int(np.argmax(comb))
    first_beat_s = offsets_s[best]
    # off_beat = the best offset within 1/8 beat of the half-beat shift
    apart = (offsets_s - first_beat_s) / period_s % 1
    off_beat = comb[np.abs(apart - 0.5) < 0.125].max()
    rms = librosa.feature.rms(y=audio, hop_length=round(ONSET_HOP_S * sample_rate))[0]
    entry_s = np.argmax(rms > np.percentile(rms, 95) * 10 ** (QUIET_DB / 20)) * ONSET_HOP_S
    entering = onsets_s[onsets_s >= entry_s - 0.05]
    if comb[best] > 0 and off_beat > PHASE_WEAK_RATIO * comb[best] and len(entering) \
            and abs((entering[0] - first_beat_s) / period_s % 1 - 0.5) < 0.125:
        first_beat_s += period_s / 2
    return first_beat_s % period_s


def _periodicity_bpm(envelope, frame_rate, bpm, search, steps):
    """The tempo within ±search (relative) of bpm that maximises Σ_k |DFT of envelope at k·bpm/60 Hz|, k = 1..4;
    envelope = (frames,) onset strength at frame_rate Hz."""
    envelope = envelope - envelope.mean()
    bpms = bpm * np.linspace(1 - search, 1 + search, steps)
    strength = sum(np.abs(scipy.signal.zoom_fft(envelope, [k * bpms[0] / 60, k * bpms[-1] / 60], m=steps,
                                                fs=frame_rate, endpoint=True)) for k in range(1, 5))
    return float(bpms[int(np.argmax(strength))])


def audio_onsets(audio, sample_rate) -> np.ndarray:
    """audio = (samples,) float mono → (onsets,) float seconds of librosa's onsets, sorted, without those in quiet
    passages (a frame more than QUIET_DB below the song's loud frames): the music onsets a map follows."""
    audio = np.asarray(audio, dtype=np.float32)
    onsets_s = librosa.onset.onset_detect(y=audio, sr=sample_rate, hop_length=TEMPO_HOP, units="time")
    # rms = (frames,) loudness at TEMPO_HOP samples per frame
    rms = librosa.feature.rms(y=audio, hop_length=TEMPO_HOP)[0]
    if not len(rms) or not rms.any():
        return np.zeros(0)
    loud = np.percentile(rms, 95)
    frames = np.minimum((onsets_s * sample_rate / TEMPO_HOP).astype(int), len(rms) - 1)
    return np.sort(onsets_s[rms[frames] >= loud * 10 ** (QUIET_DB / 20)])


def lead_in_for_beat(bpm, first_beat_s) -> float:
    """Seconds of silence to put in front of a song so that its beat grid (estimate_beat's first_beat_s + k * 60 / bpm)
    lands on whole beats of the written song: (first_beat_s + lead_in_s) * bpm / 60 is a whole number.
    In [0, 60 / bpm)."""
    period_s = 60 / bpm
    return (period_s - first_beat_s % period_s) % period_s


def onset_strength(audio, sample_rate):
    """audio = (samples,) float mono → strength(times_s) → (len(times_s),) float: the audio's onset strength
    (librosa) at each time, the largest within ±20 ms. The envelope is computed once, here."""
    envelope = librosa.onset.onset_strength(y=np.asarray(audio, dtype=np.float32), sr=sample_rate, hop_length=TEMPO_HOP)
    frame_s = TEMPO_HOP / sample_rate

    def strength(times_s):
        out = np.zeros(len(times_s))
        for i, time_s in enumerate(times_s):
            lo = max(0, int((time_s - SCORE_WINDOWS_S[0]) / frame_s))
            hi = min(len(envelope), int((time_s + SCORE_WINDOWS_S[0]) / frame_s) + 1)
            out[i] = envelope[lo:hi].max() if hi > lo else 0.0
        return out
    return strength


# ---- map writing: ready-to-play zips, map folders, .dat files, regenerated maps ----
LEVEL_AUTHOR = "beatgen"
GENERATOR_VERSION = "0.1.0"      # written into every map's Info.dat _customData._editors
LIGHTS_ON = (0, 1, 2, 3, 4)      # v3 basic event types switched on (value 1, blue) at beat 0, so the stage is lit
SONG_RATE = 44100                # Hz of a song.egg converted from another format
AUDIO_BLOCK_FRAMES = 65536       # soundfile's Vorbis encoder crashes on one long write (corrections.md §6)
AUDIO_FORMATS = {".ogg": "OGG", ".egg": "OGG", ".wav": "WAV", ".flac": "FLAC"}   # extension → soundfile format
COVER_PX = 512                   # BeatSaver wants a square jpg/png cover of at least 256 px
PREVIEW_S = 10.0                 # song preview length in the game's song list


def write_map(out_path, difficulties, bpm, song_path, lead_in_s=0.0, lights=None, about=None) -> str:
    """Write Standard difficulties as a map BeatSaver accepts; returns out_path.

    difficulties = {"Expert": [Note(beat, x, y, color, direction), ...], ...} (names from DIFFICULTIES), notes in
    beats of `bpm`; beat 0 is lead_in_s into the written song, so a time t_s of the original song is beat
    (t_s + lead_in_s) * bpm / 60.
    out_path ending ".zip" → a zip of Info.dat (2.0.0; each difficulty listed with its rank, NJS and offset; the
    generator named in _customData._editors), <difficulty>Standard.dat (3.3.0, every field written) per difficulty,
    song.egg and cover.jpg; ".dat" → only the difficulty file (exactly one difficulty); anything else → a new folder of
    those files, written completely or not at all.
    song.egg = the song as Ogg Vorbis after lead_in_s seconds of silence (an Ogg Vorbis song with no lead-in is
    copied as is; anything else is decoded by audio.load_audio to 44.1 kHz mono and encoded).
    lights = {difficulty: (basic events, boost events)} (light_show), or None: the stage lit, no show.
    about = {"name", "author", "cover"}, each optional: the song's name and artist (default: the song's title /
    artist tags, else its file stem / ""), a cover image (centre-cropped to a square; default: a generated one).
    Raises ValueError for no or an unknown difficulty, a bpm outside 10..1000, a negative lead_in_s or the first note
    the game or BeatSaver would reject (beat outside 0..song length, x, y, color or direction out of range);
    nothing is written then, and no note is ever dropped or moved.
    """
    out_path = os.fspath(out_path)
    unknown = [name for name in difficulties if name not in DIFFICULTIES]
    if not difficulties or unknown:
        raise ValueError(f"difficulties {unknown or 'none'}: each must be one of {', '.join(DIFFICULTIES)}")
    if not 10 <= bpm <= 1000:
        raise ValueError(f"bpm {bpm} is outside 10..1000")
    if not lead_in_s >= 0:
        raise ValueError(f"lead_in_s {lead_in_s} is negative")
    only_dat = out_path.lower().endswith(".dat")
    if only_dat and len(difficulties) != 1:
        raise ValueError(f"{out_path}: a .dat file holds one difficulty, not {len(difficulties)}")
    # song_egg = Ogg Vorbis bytes of the song as written (lead-in included); None when only the .dat is written
    song_egg = None if only_dat else _song_egg(song_path, lead_in_s)
    duration_s = audio_duration_s(song_path) + lead_in_s if only_dat else audio_duration_s(song_egg)
    dats = _difficulty_files(difficulties, bpm, duration_s, lights)
    if only_dat:
        write_atomic(out_path, next(iter(dats.values())))
        return out_path
    about = about or {}
    title, artist = _song_tags(song_path)
    song_name = about.get("name") or title or Path(song_path).stem
    song_author = about["author"] if about.get("author") is not None else artist
    # names = the difficulties from easiest to hardest, as dats lists them
    listings = [(name, DIFFICULTIES[name].rank, DIFFICULTIES[name].njs, DIFFICULTIES[name].offset_beats)
                for name in (file[:-len("Standard.dat")] for file in dats)]
    preview_s = (max(0.0, min(duration_s / 3, duration_s - PREVIEW_S)), min(PREVIEW_S, duration_s))
    info = info_v2(bpm, listings, song_name[:100 - len(LEVEL_AUTHOR)], song_author, preview_s,
                   (LEVEL_AUTHOR, GENERATOR_VERSION))
    # files = {name in the map: bytes}
    files = {"Info.dat": json.dumps(info, indent=2).encode(), **dats, "song.egg": song_egg,
             "cover.jpg": _cover_jpg(about.get("cover"), song_name)}
    return write_files(out_path, files)


def _difficulty_files(difficulties, bpm, duration_s, lights):
    """{difficulty: [Note, ...]} → {"<difficulty>Standard.dat": v3 JSON bytes}, easiest first; ValueError naming the
    difficulty and its first note outside the song or the grid (_check_notes)."""
    dats = {}
    for name in sorted(difficulties, key=lambda name: DIFFICULTIES[name].rank):
        try:
            _check_notes(difficulties[name], duration_s * bpm / 60)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        basic, boosts = (lights or {}).get(name) or (
            [{"b": 0.0, "et": event_type, "i": 1, "f": 1.0} for event_type in LIGHTS_ON], [])
        dats[f"{name}Standard.dat"] = json.dumps(difficulty_v3(difficulties[name], basic, boosts)).encode()
    return dats


def check_output(output):
    """The map path to write, checked before any work → output; ValueError when it is a folder but a file is asked
    for (.zip, .dat) or the reverse, a non-empty folder, lies under a file, or its folder cannot be written."""
    target = Path(output)
    wants_file = output.lower().endswith((".zip", ".dat"))
    if wants_file and target.is_dir():
        raise ValueError(f"--output {output}: is a folder; give a file name ending in .zip or .dat")
    if not wants_file and target.exists() and not target.is_dir():
        raise ValueError(f"--output {output}: exists and is not a folder (a map folder is written there)")
    if not wants_file and target.is_dir() and any(target.iterdir()):
        raise ValueError(f"--output {output}: folder exists and is not empty; give a new folder name")
    folder = target.parent if wants_file else target
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--output {output}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"--output {output}: cannot write in {parent}")
            break
    return output


def write_files(out_path, files) -> str:
    """files = {name in the map: bytes} → out_path: a zip when it ends in ".zip", else a new folder; either is
    written completely or not at all. Returns out_path."""
    out_path = os.fspath(out_path)
    if out_path.lower().endswith(".zip"):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        write_atomic(out_path, buffer.getvalue())
    else:
        _write_folder_atomic(out_path, files)
    return out_path


def write_regenerated(out_path, base_map, difficulties, span_s) -> str:
    """base_map (maps.BeatMap) with the colour notes of each difficulty's Standard file in span_s = (start_s, end_s)
    replaced by difficulties = {difficulty: [Note, ...]} (in beats of base_map.bpm; those inside the span are used)
    and Info.dat naming the generator → out_path (zip or new folder); everything else of the map stays as it was."""
    files = map_files(base_map.source)
    lower = {name.lower(): name for name in files}
    start_beat, end_beat = (t * base_map.bpm / 60 for t in span_s)
    for name, notes in difficulties.items():
        file_name = lower[base_map.difficulties[("Standard", name)].filename.lower()]
        new = [n for n in notes if start_beat <= n.beat < end_beat]
        try:
            files[file_name] = replace_notes(files[file_name], start_beat, end_beat, new)
        except ValueError as error:
            raise ValueError(f"{base_map.source}: {file_name}: {error}") from None
    info_name = lower["info.dat"]
    files[info_name] = mark_generated(files[info_name], LEVEL_AUTHOR, GENERATOR_VERSION)
    return write_files(out_path, files)


def _write_folder_atomic(path, files):
    """files = {name: bytes} → a new folder at path, written completely or not at all: the files go into a
    temporary folder beside it, which is renamed to path. ValueError when path exists and is not an empty folder."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ValueError(f"{path}: exists and is not an empty folder")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.chmod(temporary, 0o755)   # mkdtemp makes the folder private; a map is for everyone to read
        for name, data in files.items():
            with open(os.path.join(temporary, name), "wb") as out:
                out.write(data)
        if os.path.isdir(path):
            os.rmdir(path)           # the empty folder the user named
        os.rename(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _check_notes(notes, song_beats):
    """Raise ValueError naming the first note outside the song (beat 0..song_beats) or with x, y, color or direction
    out of range."""
    for i, (beat, x, y, color, direction) in enumerate(notes):
        if not (math.isfinite(beat) and 0 <= beat <= song_beats):
            raise ValueError(f"note {i} {tuple(notes[i])}: beat {beat} is outside the song (0..{song_beats:.3f} beats)")
        for name, value, allowed in (("x", x, LANES), ("y", y, LAYERS), ("color", color, COLORS),
                                     ("direction", direction, DIRECTIONS)):
            if value not in allowed:
                raise ValueError(f"note {i} {tuple(notes[i])}: {name} {value} is not in {allowed[0]}..{allowed[-1]}")


def _song_egg(song_path, lead_in_s) -> bytes:
    """song file → Ogg Vorbis bytes of lead_in_s seconds of silence followed by the song."""
    if lead_in_s == 0 and isinstance(_mutagen_file(song_path), mutagen.oggvorbis.OggVorbis):
        return Path(song_path).read_bytes()
    # song = (samples,) float32 mono at SONG_RATE, silence in front
    song = load_audio(song_path, sample_rate=SONG_RATE)
    song = np.concatenate([np.zeros(round(lead_in_s * SONG_RATE), np.float32), song])
    buffer = io.BytesIO()
    _write_audio(buffer, song, SONG_RATE, "OGG")
    return buffer.getvalue()


def _write_audio(file, samples, sample_rate, audio_format):
    """samples = (n,) float mono → file (path or binary file object) as audio_format ("OGG" = Ogg Vorbis, "WAV",
    "FLAC"), handed to soundfile in blocks of AUDIO_BLOCK_FRAMES."""
    subtype = "VORBIS" if audio_format == "OGG" else None
    samples = np.clip(samples, -1.0, 1.0)
    with soundfile.SoundFile(file, "w", samplerate=sample_rate, channels=1, format=audio_format,
                             subtype=subtype) as out:
        for start in range(0, len(samples), AUDIO_BLOCK_FRAMES):
            out.write(samples[start:start + AUDIO_BLOCK_FRAMES])


def _mutagen_file(path):
    """mutagen's view of an audio file (tags, container type), or None when it cannot read it."""
    try:
        return mutagen.File(path, easy=True)
    except (mutagen.MutagenError, OSError):
        return None


def _song_tags(song_path) -> tuple[str, str]:
    """(title, artist) from the song file's tags; "" for a missing one."""
    tagged = _mutagen_file(song_path)
    if tagged is None or tagged.tags is None:
        return "", ""
    return tuple(str((tagged.tags.get(key) or [""])[0]).strip() for key in ("title", "artist"))


def _cover_jpg(cover_path, song_name) -> bytes:
    """cover image file (centre-cropped to a square) or, for None, a red → blue gradient with the song name
    → COVER_PX x COVER_PX JPEG bytes."""
    if cover_path:
        with Image.open(cover_path) as image:
            cover = ImageOps.fit(image.convert("RGB"), (COVER_PX, COVER_PX))
    else:
        # ramp = (COVER_PX, COVER_PX) 0..1, top left → bottom right
        ramp = np.add.outer(np.arange(COVER_PX), np.arange(COVER_PX)) / (2 * COVER_PX - 2)
        rgb = (1 - ramp)[..., None] * (170, 30, 40) + ramp[..., None] * (30, 70, 190)
        cover = Image.fromarray(rgb.astype(np.uint8))
        draw = ImageDraw.Draw(cover)
        text = "\n".join(textwrap.wrap(song_name, 16)[:5])
        draw.multiline_text((COVER_PX / 2, COVER_PX / 2), text, fill="white", anchor="mm", align="center",
                            font=ImageFont.load_default(size=48))
    buffer = io.BytesIO()
    cover.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# ---- the light show (write_map's lights) ----
# A v3 basic-event light show derived from the notes and the audio, deterministic for a given map and song, in the
# manner of mappers' light tools: the song is cut into sections of like energy (RMS per 4-beat bar against the
# loudest bar: LIGHT_LOUD, LIGHT_QUIET); each section sets a base state (quiet: ring lights blue, lasers off, slow;
# middle: rings red, back lasers blue; loud: everything on, fast lasers, colour boost, a ring zoom) and spins the
# rings; at each onset of notes the left laser flashes red for red notes and the right laser blue for blue notes
# (fading in quiet sections), a double flashes the back lasers, and a note on one of the song's strongest onsets (top
# LIGHT_ACCENT_SHARE of onset strength) flashes the centre lights and spins the rings. Event values (v3 `i`): 0 off,
# 1/2/3 blue on/flash/fade, 5/6/7 red on/flash/fade; types (`et`): 0 back lasers, 1 ring lights, 2 left lasers,
# 3 right lasers, 4 centre lights, 8 ring spin, 9 ring zoom, 12/13 left/right laser speed.
LIGHT_BAR_BEATS = 4              # beats per energy bar
LIGHT_LOUD, LIGHT_QUIET = 0.7, 0.35   # a bar's RMS / the loudest bar's: ≥ LOUD loud, < QUIET quiet, else middle
LIGHT_MIN_SECTION_BARS = 2       # shorter runs of one energy level join the section before
LIGHT_ACCENT_SHARE = 0.1         # share of the song's onsets (by strength) that light the centre
BACK, RINGS, LEFT, RIGHT, CENTER, SPIN, ZOOM, LEFT_SPEED, RIGHT_SPEED = 0, 1, 2, 3, 4, 8, 9, 12, 13
OFF, BLUE_ON, BLUE_FLASH, BLUE_FADE, RED_ON, RED_FLASH, RED_FADE = 0, 1, 2, 3, 5, 6, 7
# energy level → base state: [(event type, value), ...], laser speed, colour boost
SECTION_LIGHTS = {
    0: ([(BACK, OFF), (RINGS, BLUE_ON), (LEFT, OFF), (RIGHT, OFF), (CENTER, OFF)], 1, False),
    1: ([(BACK, BLUE_ON), (RINGS, RED_ON), (LEFT, OFF), (RIGHT, OFF), (CENTER, BLUE_ON)], 3, False),
    2: ([(BACK, RED_ON), (RINGS, BLUE_ON), (LEFT, RED_ON), (RIGHT, BLUE_ON), (CENTER, RED_ON)], 6, True),
}


def light_show(notes, bpm, audio, sample_rate):
    """notes = [Note, ...] in beats of bpm; audio = (samples,) float mono, beat 0 at sample 0 → (basic events,
    colour boost events): v3 dicts {"b", "et", "i", "f"} and {"b", "o"}, sorted by beat, all within the song."""
    audio = np.asarray(audio, dtype=np.float32)
    song_beats = len(audio) / sample_rate * bpm / 60
    # bar_rms = (bars,) mean RMS of each LIGHT_BAR_BEATS-beat bar; level = (bars,) 0 quiet, 1 middle, 2 loud
    rms = librosa.feature.rms(y=audio, hop_length=TEMPO_HOP)[0]
    rms_beats = np.arange(len(rms)) * TEMPO_HOP / sample_rate * bpm / 60
    n_bars = max(1, math.ceil(song_beats / LIGHT_BAR_BEATS))
    bar_of = np.minimum((rms_beats // LIGHT_BAR_BEATS).astype(int), n_bars - 1)
    bar_rms = np.bincount(bar_of, weights=rms, minlength=n_bars) / np.maximum(np.bincount(bar_of, minlength=n_bars), 1)
    loudness = bar_rms / bar_rms.max() if bar_rms.any() else bar_rms
    level = np.where(loudness >= LIGHT_LOUD, 2, np.where(loudness >= LIGHT_QUIET, 1, 0))
    # sections = [(first bar, level), ...]: runs of one level, short runs joining the one before
    sections = []
    for bar, bar_level in enumerate(level):
        if not sections or (bar_level != sections[-1][1] and bar - sections[-1][0] >= LIGHT_MIN_SECTION_BARS):
            sections.append((bar, int(bar_level)))
    basic, boosts = [], []
    for bar, bar_level in sections:
        beat = float(bar * LIGHT_BAR_BEATS)
        states, speed, boost = SECTION_LIGHTS[bar_level]
        basic += [{"b": beat, "et": et, "i": value, "f": 1.0} for et, value in states]
        basic += [{"b": beat, "et": et, "i": speed, "f": 1.0} for et in (LEFT_SPEED, RIGHT_SPEED)]
        basic.append({"b": beat, "et": SPIN, "i": 0, "f": 1.0})
        if bar_level == 2:
            basic.append({"b": beat, "et": ZOOM, "i": 0, "f": 1.0})
        boosts.append({"b": beat, "o": boost})
    # strong_s = onset times (seconds) of the strongest LIGHT_ACCENT_SHARE of the song's onsets
    envelope = librosa.onset.onset_strength(y=audio, sr=sample_rate, hop_length=TEMPO_HOP)
    peaks = librosa.onset.onset_detect(onset_envelope=envelope, sr=sample_rate, hop_length=TEMPO_HOP)
    strong_s = np.zeros(0)
    if len(peaks):
        cut = np.quantile(envelope[peaks], 1 - LIGHT_ACCENT_SHARE)
        strong_s = librosa.frames_to_time(peaks[envelope[peaks] >= cut], sr=sample_rate, hop_length=TEMPO_HOP)
    section_starts = [bar * LIGHT_BAR_BEATS for bar, _ in sections]
    for time_s, group in zip(*note_onsets(notes, bpm)):
        beat = float(group[0].beat)
        quiet = sections[max(0, int(np.searchsorted(section_starts, beat, side="right")) - 1)][1] == 0
        colors = {note.color for note in group}
        if 0 in colors:
            basic.append({"b": beat, "et": LEFT, "i": RED_FADE if quiet else RED_FLASH, "f": 1.0})
        if 1 in colors:
            basic.append({"b": beat, "et": RIGHT, "i": BLUE_FADE if quiet else BLUE_FLASH, "f": 1.0})
        if colors == {0, 1}:
            basic.append({"b": beat, "et": BACK, "i": BLUE_FLASH if quiet else RED_FLASH, "f": 1.0})
        if len(strong_s) and np.min(np.abs(strong_s - time_s)) <= SCORE_WINDOWS_S[1]:
            basic.append({"b": beat, "et": CENTER, "i": RED_FLASH if 0 in colors else BLUE_FLASH, "f": 1.0})
            basic.append({"b": beat, "et": SPIN, "i": 0, "f": 1.0})
    # one event per (beat, type): the later one (a note's flash over the section's base state)
    unique = {}
    for event in basic:
        if 0 <= event["b"] <= song_beats:
            unique[(event["b"], event["et"])] = event
    boosts = [b for b in boosts if 0 <= b["b"] <= song_beats]
    return sorted(unique.values(), key=lambda e: (e["b"], e["et"])), boosts


# ---- previews: a picture and a click track of a map ----

PREVIEW_BEATS_PER_ROW = 16       # beats in one row of the preview picture (4 bars of 4)
PREVIEW_BEAT_PX = 80
PREVIEW_CELL_PX = 14             # height of one of the 12 grid cells stacked in a row
PREVIEW_LEFT_PX = 60
PREVIEW_DENSITY_PX = 90
NOTE_RGB = {0: (230, 50, 60), 1: (50, 125, 240)}
# direction → (dx, dy) unit arrow in picture coordinates (y points down); 8 (any) is drawn as a dot
ARROWS = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0), 4: (-0.7071, -0.7071), 5: (0.7071, -0.7071),
          6: (-0.7071, 0.7071), 7: (0.7071, 0.7071)}
CLICK_HZ = {0: 1500.0, 1: 2500.0}   # red notes click lower than blue ones


def write_preview(notes, bpm, song_path, out_png, out_audio, lead_in_s=0.0):
    """A picture and a click track of a map, to judge it without the game.

    notes = [Note, ...] in beats of bpm, beat 0 = lead_in_s into the written song (as write_map).
    out_png: notes per second over the whole song, then rows of 16 beats (time left → right) with the 12 grid
    cells stacked as lanes (top layer on top, x 0..3 from the top within a layer); a note is a square in its
    colour (red 0, blue 1) with a white arrow toward its cut direction, or a white dot for any direction.
    out_audio (.ogg/.egg = Ogg Vorbis, .wav, .flac): the song after lead_in_s of silence, as in song.egg, with a
    short tone at every note (1.5 kHz red, 2.5 kHz blue).
    """
    audio_format = AUDIO_FORMATS.get(Path(out_audio).suffix.lower())
    if audio_format is None:
        raise ValueError(f"{out_audio}: preview audio must end in one of {', '.join(AUDIO_FORMATS)}")
    # song = (samples,) float32 mono at SONG_RATE with the lead-in, as written to song.egg
    song = load_audio(song_path, sample_rate=SONG_RATE)
    song = np.concatenate([np.zeros(round(lead_in_s * SONG_RATE), np.float32), song])
    duration_s = len(song) / SONG_RATE
    write_atomic(out_png, _preview_png(notes, bpm, duration_s, Path(song_path).stem))
    t_s = np.arange(int(0.03 * SONG_RATE)) / SONG_RATE
    # clicks = {color: (samples,) float32 tone burst}
    clicks = {color: (0.6 * np.sin(2 * np.pi * hz * t_s) * np.exp(-t_s / 0.006)).astype(np.float32)
              for color, hz in CLICK_HZ.items()}
    mix = 0.6 * song
    for beat, color in {(note.beat, note.color) for note in notes}:
        start = round(beat * 60 / bpm * SONG_RATE)
        burst = clicks[color][:max(0, len(mix) - start)]
        mix[start:start + len(burst)] += burst
    buffer = io.BytesIO()
    _write_audio(buffer, mix, SONG_RATE, audio_format)
    write_atomic(out_audio, buffer.getvalue())


def _preview_png(notes, bpm, duration_s, title) -> bytes:
    """notes in beats of bpm over a song of duration_s → PNG bytes of the picture write_preview describes."""
    font = ImageFont.load_default(size=12)
    song_beats = duration_s * bpm / 60
    last_beat = max([song_beats] + [note.beat for note in notes])
    n_rows = max(1, math.ceil(last_beat / PREVIEW_BEATS_PER_ROW))
    row_px = 12 * PREVIEW_CELL_PX + 22
    plot_px = PREVIEW_BEATS_PER_ROW * PREVIEW_BEAT_PX
    width, top_px = PREVIEW_LEFT_PX + plot_px + 20, 30 + PREVIEW_DENSITY_PX + 10
    image = Image.new("RGB", (width, top_px + n_rows * row_px + 10), (22, 22, 26))
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), f"{title}: {len(notes)} notes, {bpm:.2f} BPM, {duration_s:.1f} s, "
                      f"{len(notes) / duration_s:.2f} notes/s", fill="white", font=font)

    # per_second = (seconds,) notes starting in each second of the song
    seconds = max(1, math.ceil(duration_s))
    per_second, _ = np.histogram([note.beat * 60 / bpm for note in notes], bins=seconds, range=(0, seconds))
    base_y, scale = 30 + PREVIEW_DENSITY_PX, (PREVIEW_DENSITY_PX - 14) / max(1, per_second.max())
    draw.text((8, 30), f"notes/s\nmax {per_second.max()}", fill=(200, 200, 200), font=font)
    for second, count in enumerate(per_second):
        x0 = PREVIEW_LEFT_PX + second * plot_px / seconds
        draw.rectangle([x0, base_y - count * scale, x0 + max(1.0, plot_px / seconds - 1), base_y], fill=(150, 150, 170))
    for second in range(0, seconds, 30):
        x = PREVIEW_LEFT_PX + second * plot_px / seconds
        draw.line([x, base_y, x, base_y + 4], fill="white")
        draw.text((x + 2, base_y - 12), f"{second // 60}:{second % 60:02d}", fill=(200, 200, 200), font=font)

    for row in range(n_rows):
        grid_top = top_px + row * row_px + 16
        for layer in LAYERS:
            y0 = grid_top + layer * len(LANES) * PREVIEW_CELL_PX
            draw.rectangle([PREVIEW_LEFT_PX, y0, PREVIEW_LEFT_PX + plot_px, y0 + len(LANES) * PREVIEW_CELL_PX - 1],
                           fill=(40, 40, 48) if layer % 2 == 0 else (32, 32, 38))
            draw.text((6, y0 + 2), ("top", "middle", "bottom")[layer], fill=(160, 160, 160), font=font)
            draw.text((6, y0 + 2 * PREVIEW_CELL_PX), "x 0..3", fill=(110, 110, 110), font=font)
        for beat in range(PREVIEW_BEATS_PER_ROW + 1):
            x = PREVIEW_LEFT_PX + beat * PREVIEW_BEAT_PX
            bar = beat % 4 == 0
            draw.line([x, grid_top, x, grid_top + 12 * PREVIEW_CELL_PX], fill=(110, 110, 120) if bar else (60, 60, 70))
            if bar and beat < PREVIEW_BEATS_PER_ROW:
                draw.text((x + 3, grid_top - 14), str(row * PREVIEW_BEATS_PER_ROW + beat), fill="white", font=font)
        end_offset = song_beats - row * PREVIEW_BEATS_PER_ROW
        if 0 <= end_offset < PREVIEW_BEATS_PER_ROW:
            x = PREVIEW_LEFT_PX + end_offset * PREVIEW_BEAT_PX
            draw.line([x, grid_top - 14, x, grid_top + 12 * PREVIEW_CELL_PX], fill=(240, 200, 60), width=2)

    for beat, x, y, color, direction in sorted(notes):
        row, offset = divmod(beat, PREVIEW_BEATS_PER_ROW)
        cx = PREVIEW_LEFT_PX + offset * PREVIEW_BEAT_PX
        cy = top_px + int(row) * row_px + 16 + ((2 - y) * 4 + x + 0.5) * PREVIEW_CELL_PX
        draw.rectangle([cx - 6, cy - 6, cx + 6, cy + 6], fill=NOTE_RGB.get(color, (200, 200, 200)), outline="black")
        if direction in ARROWS:
            dx, dy = ARROWS[direction]
            draw.polygon([(cx + 5 * dx, cy + 5 * dy), (cx - 3 * dx - 4 * dy, cy - 3 * dy + 4 * dx),
                          (cx - 3 * dx + 4 * dy, cy - 3 * dy - 4 * dx)], fill="white")
        else:
            draw.ellipse([cx - 2.5, cy - 2.5, cx + 2.5, cy + 2.5], fill="white")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ---- songs from links ----
DOWNLOADABLE = {".ogg", ".egg", ".mp3", ".wav", ".flac", ".opus"}   # what audio.load_audio decodes without ffmpeg


def is_url(text) -> bool:
    """True for an http(s) link with a host (a song to download), False for anything else (a local path)."""
    parsed = urllib.parse.urlparse(str(text))
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def download_audio(url, out_dir) -> str:
    """Download the best audio of a link (a video page yt-dlp knows, or a direct link to an audio file) into out_dir
    → path of the audio file. With ffmpeg on PATH the audio is converted to Ogg Vorbis; without it the file is kept
    as served and must be one audio.load_audio decodes (.ogg/.mp3/.wav/.flac/.opus).
    Raises ValueError when the download fails or gives a file that cannot be decoded without ffmpeg.
    """
    os.makedirs(out_dir, exist_ok=True)
    has_ffmpeg = shutil.which("ffmpeg") is not None
    options = {
        "format": "bestaudio/best",
        "outtmpl": os.path.join(os.fspath(out_dir), "%(title).100B.%(ext)s"),   # the stem is write_map's fallback name
        "noplaylist": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "socket_timeout": 30,
        "postprocessors": [{"key": "FFmpegExtractAudio", "preferredcodec": "vorbis"}] if has_ffmpeg else [],
    }
    try:
        with yt_dlp.YoutubeDL(options) as downloader:
            info = downloader.extract_info(url, download=True)
    except yt_dlp.utils.YoutubeDLError as e:
        raise ValueError(f"{url}: download failed ({e})") from None
    path = info["requested_downloads"][0]["filepath"]
    if Path(path).suffix.lower() not in DOWNLOADABLE:
        raise ValueError(f"{url}: got {Path(path).name}, which cannot be decoded without ffmpeg; install ffmpeg")
    return path


# ---- the machine: device, compiler, stage timings ----

def pick_device(name=None) -> torch.device:
    """--device value (None: the first GPU if any, else the CPU) → torch.device; ValueError for a GPU this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a device name ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU on this machine (torch {torch.__version__}); use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 … "
                             f"cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda[:N] are supported")
    return device


def model_dtype(device):
    """bf16 where the GPU computes it natively; float32 elsewhere (CPUs, and GPUs that only emulate bf16 such as
    T4/V100, where fp16 could give NaN logits)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def compile_problem():
    """Why torch.compile (Triton) cannot build kernels here — no C compiler, or no Python headers — or None."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    missing = [what for what, ok in (("a C compiler (gcc or clang, or $CC)", compiler),
                                     (f"the Python headers ({headers})", os.path.exists(headers))) if not ok]
    return " and ".join(missing) or None


class StageTimes:
    """Wall seconds per stage of one song (`with times("Encodec"): ...`), and a line with the peak memory."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, stage):
        start_s = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start_s

    def line(self, device):
        stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.seconds.items())
        memory = []
        with contextlib.suppress(ImportError):      # resource: Unix only; ru_maxrss in KiB on Linux
            import resource
            memory.append(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process)")
        if device.type == "cuda":
            memory.append(f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)")
        return f"time: {stages}; peak memory {', '.join(memory) or 'unknown'}"


# ---- the web page (infer.py --serve) ----

MAX_UPLOAD = "200mb"            # the web page's largest upload (a song, or a map zip)


def serve(map_song, host="127.0.0.1", port=7860, block=True):
    """The web page (Gradio): drop a song or paste a link, pick difficulties and a BPM (or let it be estimated), get
    the zip, the preview picture, the click track over the song and the score lines; or upload a map and a time
    range to regenerate. map_song(song path, output zip, difficulties, temperature, bpm or None, base map or None,
    span_s or None) → infer.MapResult does the work (the command line's Mapper, its model loaded once). Requests run
    one at a time (a queue), each in its own folder, so two at once do not mix. Bad input is a message on the page;
    the server keeps running."""
    try:
        import gradio as gr
    except ImportError:
        raise ValueError("--serve needs Gradio: pip install -e '.[web]'") from None
    work = Path(tempfile.mkdtemp(prefix="beatgen-serve-"))

    def generate(song, link, difficulties, bpm, temperature, base, span, progress=gr.Progress(track_tqdm=True)):
        """One request → (zip, preview png, click track, score lines); gr.Error with the reason on bad input."""
        request = Path(tempfile.mkdtemp(dir=work))
        try:
            if not difficulties:
                raise ValueError("pick at least one difficulty")
            if link and link.strip():
                if not is_url(link.strip()):
                    raise ValueError(f"{link.strip()!r} is not an http(s) link")
                song = download_audio(link.strip(), request)
            span_s = parse_span(span or "") if base else None
            if base:
                song = song or base_song(base, request)
            elif not song:
                raise ValueError("drop a song file or paste a link")
            name = Path(base).stem + "_regenerated" if base else Path(song).stem + "_beatgen"
            difficulties = tuple(sorted(difficulties, key=lambda name: DIFFICULTIES[name].rank))
            result = map_song(song, str(request / f"{name}.zip"), difficulties, float(temperature),
                              float(bpm) if bpm else None, base, span_s)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise gr.Error(str(error)) from None
        # the score lines name files by their names (the request folder is the server's business)
        return result.written, result.preview_png, result.clicks, "\n".join(result.lines).replace(f"{request}/", "")

    page = web_page(gr, generate)
    page.queue(default_concurrency_limit=1)
    print(f"beatgen page on http://{host}:{port} (Ctrl-C to stop)")
    page.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, allowed_paths=[str(work)],
                prevent_thread_lock=not block, show_error=True)
    return page


def base_song(base, folder):
    """The song of the map zip or folder `base`, written into folder → its path."""
    path = Path(folder) / "song.egg"
    path.write_bytes(read_map(base).read_audio())
    return str(path)


def parse_span(text):
    """argparse type: "30-60" → (30.0, 60.0) seconds, start < end."""
    try:
        start_s, end_s = (float(part) for part in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START-END in seconds, e.g. 30-60") from None
    if not (math.isfinite(start_s) and math.isfinite(end_s) and 0 <= start_s < end_s):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END")
    return start_s, end_s


def web_page(gr, generate):
    """The page's layout (Gradio Blocks), its button wired to generate(song, link, difficulties, bpm, temperature,
    base map, span) → (zip, preview, click track, score lines)."""
    with gr.Blocks(title="beatgen") as page:
        gr.Markdown("# beatgen\nA Beat Saber map for your song, from your own model. Declare maps made here as "
                    "AI-generated when you upload them to BeatSaver.")
        with gr.Row():
            with gr.Column():
                song = gr.File(label="Song (.ogg .egg .mp3 .wav .flac)", type="filepath", elem_id="song")
                link = gr.Textbox(label="…or a link (YouTube, SoundCloud, a direct file)", elem_id="link")
                difficulties = gr.CheckboxGroup(list(DIFFICULTIES), value=["Expert", "ExpertPlus"],
                                                label="Difficulties", elem_id="difficulties")
                bpm = gr.Number(label="BPM (empty: estimate)", value=None, elem_id="bpm")
                temperature = gr.Slider(0.0, 1.5, value=0.8, step=0.05, label="Temperature (0: greedy)")
                with gr.Accordion("Regenerate part of a map", open=False):
                    base = gr.File(label="Map zip to keep (v2 or v3 difficulties)", type="filepath", elem_id="base")
                    span = gr.Textbox(label="Seconds to regenerate, START-END", placeholder="30-60", elem_id="span")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                zip_file = gr.File(label="Map (zip: drop into CustomLevels or upload)", elem_id="map")
                preview = gr.Image(label="Preview", type="filepath", elem_id="preview")
                clicks = gr.Audio(label="Click track over the song", type="filepath", elem_id="clicks")
                lines = gr.Textbox(label="Score", lines=6, elem_id="score")
        button.click(generate, [song, link, difficulties, bpm, temperature, base, span],
                     [zip_file, preview, clicks, lines])
    return page


# ---- command line: python utils.py score ----

def _score_command(args):
    generated_map, reference_map = read_map(args.generated), read_map(args.reference)
    generated_key = (args.characteristic, args.difficulty)
    reference_key = (args.characteristic, args.reference_difficulty or args.difficulty)
    for beatmap, key in ((generated_map, generated_key), (reference_map, reference_key)):
        if key not in beatmap.difficulties:
            raise SystemExit(f"{beatmap.source}: no {key[0]}/{key[1]}; has "
                             f"{', '.join('/'.join(k) for k in beatmap.difficulties) or 'none'}")
    card = score_card(generated_map.difficulties[generated_key].notes, reference_map.difficulties[reference_key].notes,
                      generated_map.bpm, reference_map.bpm)
    print(json.dumps(card, indent=2) if args.json else format_score_card(card))


def main(argv=None):
    """Command line: `python utils.py score GENERATED REFERENCE [--difficulty ExpertPlus] [--json]` prints the score
    card of one difficulty of a generated map against a human map (zips or folders)."""
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score a generated map against a human map of the same song")
    score.add_argument("generated", help="generated map: zip or folder")
    score.add_argument("reference", help="human map of the same song: zip or folder")
    score.add_argument("--characteristic", default="Standard", help="characteristic in both maps (default Standard)")
    score.add_argument("--difficulty", default="ExpertPlus",
                       help="difficulty of the generated map (default ExpertPlus)")
    score.add_argument("--reference_difficulty", default=None,
                       help="difficulty of the human map (default: the same as --difficulty)")
    score.add_argument("--json", action="store_true", help="print the card as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.command == "score":
        _score_command(args)


if __name__ == "__main__":
    main()
