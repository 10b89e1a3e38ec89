"""Utilities around generated and training maps: writing ready-to-play maps, v3 chains → notes, grid snapping,
tempo/phase estimation, songs from links, previews, and the map-quality score card."""

# ---- map writing, chains, snapping, tempo, downloads, previews (issue 4) ----


# ---- score card (issue 6) ----
# The score card compares one generated difficulty with one human difficulty of the same song. Times are seconds,
# t = beat * 60 / bpm with each map's own BPM (BPM changes not applied, as DDC and Mapperatorinator score onsets).
# Rules (thresholds are the constants below; README "Score card" shows what they give on human maps):
# - onsets: notes closer than ONSET_MERGE_S are one onset (a double, stack or window counts once); generated and human
#   onsets are matched one-to-one within ±window by a two-pointer walk over the sorted times (the largest matching in 1-D).
# - baseline: audio-blind, tempo-oracle. As many onsets as the generated map has, on the human map's 1/k-beat grid
#   (beat 0 at 0 s): k is the smallest of BASELINE_DIVISIONS whose grid points from the first to the last generated
#   onset (both rounded to the grid) are at least that many, and the onsets are grid points evenly spaced by index.
#   skill = F1 - baseline F1.
# - note type, on onsets matched at ±50 ms: colour = same set of colours at the onset; position / direction = same set
#   of (x, y) / of directions, per colour present in both. KL(human || generated) in nats over the 9 directions and the
#   12 grid cells, both histograms add-one smoothed (notes off the 4x3 grid are left out of the position histogram).
# - parity, per hand: the notes of one hand at one onset are one swing, along their first non-dot direction. Down,
#   down-left, down-right = down swing; up, up-left, up-right = up swing; left, right and dots take the swing opposite to
#   the hand's previous one (horizontals can be cut either way, as in bs-parity's "borderline" cuts). Two consecutive
#   swings of one hand in the same direction closer than PARITY_RESET_S are one error; a longer gap is a reset.
# - vision block: a note at the middle layer of a centre lane (y 1, x 1 or 2) hides every later note in the same or a
#   neighbouring lane that comes within VISION_BLOCK_S (and not at the same onset); each hidden note counts once.
# - impossible double, per onset: two notes in one grid cell; or one hand with two arrows more than 45° apart; or a red
#   and a blue side by side in one layer (blue one lane right of red) whose arrows point into each other (red right,
#   up-right or down-right; blue left, up-left or down-left), so the sabers collide. A red and a blue swinging opposite
#   ways (one up, one down) is allowed: human maps use it.
import argparse
import json

import numpy as np

ONSET_MERGE_S = 0.001
SCORE_WINDOWS_S = (0.020, 0.050)
NOTE_TYPE_WINDOW_S = 0.050
BASELINE_DIVISIONS = (1, 2, 4, 8, 16, 32, 64)
NPS_BIN_S = 10.0
PARITY_RESET_S = 0.5
VISION_BLOCK_S = 0.25
DOWN_SWING = {1, 6, 7}
UP_SWING = {0, 4, 5}
ARROW_ANGLE_DEG = {0: 90, 1: 270, 2: 180, 3: 0, 4: 135, 5: 45, 6: 225, 7: 315}
RED_INTO_BLUE = {3, 5, 7}
BLUE_INTO_RED = {2, 4, 6}


def note_onsets(notes, bpm):
    """notes = [Note, ...] in beats of bpm → (onsets_s, groups): onsets_s = (m,) float seconds, sorted, one per group of
    notes closer than ONSET_MERGE_S; groups = [[Note, ...], ...], the notes at each onset (sorted)."""
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
    → (onsets_s, k): onsets_s = (n_onsets,) float seconds, sorted (fewer only if even the finest grid is too coarse)."""
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


def parity_errors(notes, bpm):
    """notes in beats of bpm → {"red": int, "blue": int} swing-parity errors per hand (rules above)."""
    errors = {}
    for color, hand in ((0, "red"), (1, "blue")):
        onsets_s, groups = note_onsets([note for note in notes if note.color == color], bpm)
        errors[hand] = 0
        # previous_down = the hand's last swing (True down, False up, None before the first); previous_s = its time
        previous_down, previous_s = None, None
        for time_s, group in zip(onsets_s, groups):
            arrows = [note.direction for note in group if note.direction != 8]
            direction = arrows[0] if arrows else 8
            if direction in DOWN_SWING or direction in UP_SWING:
                down = direction in DOWN_SWING
                if down == previous_down and time_s - previous_s < PARITY_RESET_S:
                    errors[hand] += 1
            else:
                down = not previous_down if previous_down is not None else True
            previous_down, previous_s = down, time_s
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


def _kl_divergence(reference_counts, generated_counts):
    # p, q = add-one smoothed probabilities of the human and the generated histogram
    p = (np.asarray(reference_counts) + 1.0) / (np.sum(reference_counts) + len(reference_counts))
    q = (np.asarray(generated_counts) + 1.0) / (np.sum(generated_counts) + len(generated_counts))
    return float(np.sum(p * np.log(p / q)))


def _histograms(notes):
    # directions = (9,) counts of cut directions 0..8; cells = (12,) counts of grid cells, index y * 4 + x
    directions, cells = np.zeros(9), np.zeros(12)
    for note in notes:
        if 0 <= note.direction <= 8:
            directions[note.direction] += 1
        if 0 <= note.x <= 3 and 0 <= note.y <= 2:
            cells[note.y * 4 + note.x] += 1
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
    defined = len(generated_nps) > 1 and np.std(generated_nps) > 0 and np.std(reference_nps) > 0
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


def format_score_card(card):
    """score_card's dict → a printable multi-line table."""
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

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
    for window_ms in (20, 50):
        scores = card[f"onset_{window_ms}ms"]
        lines.append(f"{f'±{window_ms} ms':10s}{scores['precision']:>10.3f}{scores['recall']:>10.3f}{scores['f1']:>10.3f}"
                     f"{scores['baseline_f1']:>13.3f}{scores['skill']:>+10.3f}")
    lines += [f"baseline: as many onsets on the human BPM's 1/{division}-beat grid, no audio" if division else
              "baseline: none (no generated notes)",
              f"NPS curve Pearson r ({NPS_BIN_S:g} s bins): {number(card['nps_curve_pearson'])}",
              f"on {card['matched_onsets']} onsets matched at ±{NOTE_TYPE_WINDOW_S * 1000:g} ms: colour "
              f"{number(card['color_accuracy'])}, position {number(card['position_accuracy'])}, direction "
              f"{number(card['direction_accuracy'])}",
              f"KL(human || generated), add-one smoothed, nats: direction {card['direction_kl']:.3f}, "
              f"position {card['position_kl']:.3f}"]
    return "\n".join(lines)


def _score_command(args):
    from maps import read_map

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
    score.add_argument("--difficulty", default="ExpertPlus", help="difficulty of the generated map (default ExpertPlus)")
    score.add_argument("--reference_difficulty", default=None,
                       help="difficulty of the human map (default: the same as --difficulty)")
    score.add_argument("--json", action="store_true", help="print the card as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.command == "score":
        _score_command(args)


if __name__ == "__main__":
    main()
