import math
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, strategies as st

import data
from conftest import click_song, wav_bytes
from data import (AUDIO_END, AUDIO_OFFSET, AUDIO_START, BOS, EOS, NOTE_TYPE_OFFSET, NOTES_START, PAD, PPQ,
                  TICK_OFFSET, BeatDataset, audio_masking_collator, note_type)


def test_token_table_matches_corrected_spec():
    # corrections.md §2
    assert (TICK_OFFSET, NOTE_TYPE_OFFSET, AUDIO_OFFSET) == (0, 12288, 12528)
    assert (BOS, EOS, PAD, AUDIO_START, AUDIO_END, NOTES_START) == (14576, 14577, 14578, 14579, 14580, 14581)
    assert data.VOCAB_USED == 14582 and PPQ == 48
    assert note_type(3, 2, 1, 9) == 239 and note_type(3, 0, 0, 0) != note_type(0, 1, 0, 0)


@given(st.integers(0, 3), st.integers(0, 2), st.integers(0, 1), st.integers(0, 9))
def test_note_type_round_trip(x, y, color, direction):
    t = note_type(x, y, color, direction)
    assert t == (y * 4 + x) * 20 + color * 10 + direction
    assert data.note_fields(t) == (x, y, color, direction)


@pytest.mark.parametrize("fields", [(4, 0, 0, 0), (-1, 0, 0, 0), (0, 3, 0, 0), (0, 0, 2, 0), (0, 0, 0, 10)])
def test_note_type_out_of_range_raises(fields):
    with pytest.raises(ValueError):
        note_type(*fields)


@pytest.mark.parametrize("call", [lambda: data.tick_token(12288), lambda: data.tick_token(-1),
                                  lambda: data.note_type_token(240), lambda: data.note_fields(-1),
                                  lambda: data.token_kind(14582), lambda: data.audio_tokens([[0, 1024]]),
                                  lambda: data.audio_codes([AUDIO_OFFSET + 1024, AUDIO_OFFSET])])
def test_out_of_range_tokens_raise(call):
    with pytest.raises(ValueError):
        call()


@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 1023)), max_size=50))
def test_audio_tokens_round_trip_and_interleave(frames):
    codes = np.array(frames, dtype=np.int64).reshape(-1, 2)
    tokens = data.audio_tokens(codes)
    assert tokens[0::2] == (AUDIO_OFFSET + codes[:, 0]).tolist()
    assert tokens[1::2] == (AUDIO_OFFSET + 1024 + codes[:, 1]).tolist()
    assert np.array_equal(data.audio_codes(tokens), codes)
    assert all(data.token_kind(t) == "audio" for t in tokens)


@given(st.lists(st.tuples(st.integers(0, 12287), st.integers(0, 239)), max_size=40))
def test_note_tokens_round_trip_sorted(notes):
    tokens = data.note_tokens(notes) + [EOS]
    assert data.decode_note_tokens(tokens) == sorted(notes)


def test_decode_note_tokens_rejects_broken_pairs():
    with pytest.raises(ValueError):
        data.decode_note_tokens([NOTE_TYPE_OFFSET, 5, EOS])
    with pytest.raises(ValueError):
        data.decode_note_tokens([5])


def test_training_sequence_layout():
    codes = np.array([[1, 2], [3, 4]])
    seq = data.create_training_sequence(codes, [(48, 7), (0, 3)])
    assert seq == [BOS, AUDIO_START, AUDIO_OFFSET + 1, AUDIO_OFFSET + 1024 + 2, AUDIO_OFFSET + 3,
                   AUDIO_OFFSET + 1024 + 4, AUDIO_END, NOTES_START, 0, NOTE_TYPE_OFFSET + 3, 48,
                   NOTE_TYPE_OFFSET + 7, EOS]
    assert len(seq) == data.sequence_length(2, 2)


def test_collator_labels_exactly():
    a = [BOS, AUDIO_START, AUDIO_OFFSET + 5, AUDIO_OFFSET + 1030, AUDIO_END, NOTES_START, 12, NOTE_TYPE_OFFSET + 9, EOS]
    b = [BOS, AUDIO_START, AUDIO_OFFSET + 1, AUDIO_OFFSET + 1025, AUDIO_END, NOTES_START, EOS]
    out = audio_masking_collator([{"input_ids": a}, {"input_ids": b}])
    assert out["input_ids"].tolist() == [a, b + [PAD, PAD]]
    assert out["attention_mask"].tolist() == [[1] * 9, [1] * 7 + [0, 0]]
    assert out["labels"].tolist() == [[-100] * 6 + [12, NOTE_TYPE_OFFSET + 9, EOS], [-100] * 6 + [EOS, -100, -100]]


def test_chunk_plan_whole_beats_and_frames():
    plan = data.chunk_plan(duration_s=95.0, bpm=137.5, chunk_duration_s=30.0, frame_rate=75.0)
    n_beats = math.floor(30 * 137.5 / 60)      # 68
    n_frames = math.ceil(n_beats * 60 / 137.5 * 75)
    assert [p[0] for p in plan] == [k * n_beats for k in range(len(plan))]
    assert plan[-1][0] * 60 / 137.5 < 95.0 <= plan[-1][1] * 60 / 137.5
    for (start_beat, end_beat, start_frame, end_frame), nxt in zip(plan, plan[1:] + [None]):
        assert start_frame == math.floor(start_beat * 60 / 137.5 * 75)
        assert end_frame - start_frame == n_frames      # every chunk alike: a batch of prompts needs no padding
        if nxt:
            assert nxt[2] in (end_frame, end_frame - 1)     # neighbours share at most one frame
    with pytest.raises(ValueError):
        data.chunk_plan(10.0, 30.0, 1.0, 75.0)      # a 1 s chunk is shorter than a beat at 30 BPM
    # the tick range caps a chunk at 256 beats
    assert data.beats_per_chunk(1000, 30.0) == 256 and data.beats_per_chunk(120, chunk_beats=300) == 256


@pytest.mark.parametrize("bpm", [61.0, 97.3, 128.0, 174.9, 240.0])
def test_chunk_plan_of_whole_beats_lasts_n_beats_at_any_tempo(bpm):
    plan = data.chunk_plan(duration_s=200.0, bpm=bpm, chunk_duration_s=None, frame_rate=75.0, chunk_beats=64)
    assert all(end_beat - start_beat == 64 for start_beat, end_beat, _, _ in plan)
    # the audio of a chunk is 64 beats long at this tempo: its length tells the model how long a beat is
    assert all(end - start == math.ceil(64 * 60 / bpm * 75) for _, _, start, end in plan)
    assert plan[-1][0] * 60 / bpm < 200.0 <= plan[-1][1] * 60 / bpm


def test_chunk_codes_pads_the_song_end_with_silence():
    codes = np.arange(20).reshape(10, 2)
    silence = np.array([7, 9])
    assert np.array_equal(data.chunk_codes(codes, 2, 5, silence), codes[2:5])
    assert np.array_equal(data.chunk_codes(codes, 8, 12, silence), np.r_[codes[8:], [[7, 9], [7, 9]]])


@dataclass
class FakeItem:
    """What BeatDataset reads from a ZippedBeatSaberDataset item."""
    source: str
    bpm: float
    notes: list
    audio: bytes
    difficulty: str = "Expert"
    characteristic: str = "Standard"

    def read_audio(self):
        return self.audio


class CountingTokenizer:
    """Wraps a real AudioTokenizer and counts encode calls."""

    def __init__(self, inner):
        self.inner, self.encode_calls = inner, 0
        self.sample_rate, self.frame_rate, self.identity = inner.sample_rate, inner.frame_rate, inner.identity
        self.n_codebooks, self.silence = inner.n_codebooks, inner.silence

    def encode(self, audio):
        self.encode_calls += 1
        return self.inner.encode(audio)


Note = namedtuple("Note", "beat x y color direction")     # the fields BeatDataset reads from maps.Note


def note(beat, x=1, y=0, color=0, direction=1):
    return Note(beat, x, y, color, direction)


def test_note_lands_in_chunk_whose_frames_cover_it(encodec, tmp_path):
    bpm, chunk_s = 137.5, 4.0
    beats = [0.0, 0.5, 8.75, 9.0, 9.25, 17.5, 18.0, 27.0]
    song = click_song(14.0, [b * 60 / bpm for b in beats])
    item = FakeItem("song.zip", bpm, [note(b) for b in beats], wav_bytes(song))
    ds = BeatDataset([item], chunk_duration=chunk_s, cache_dir=tmp_path, audio_tokenizer=encodec)
    found = []
    for k, (i, (start_beat, end_beat, start_frame, end_frame)) in enumerate(ds.chunks):
        seq = ds[k]["input_ids"]
        notes = data.decode_note_tokens(seq[seq.index(NOTES_START) + 1:])
        n_frames = (seq.index(AUDIO_END) - 2) // 2
        assert n_frames == end_frame - start_frame      # the last chunk too: silence after the song
        for tick, _ in notes:
            beat = start_beat + tick / PPQ
            time_s = beat * 60 / bpm
            frame = math.floor(time_s * encodec.frame_rate)
            assert start_frame <= frame < end_frame      # the click's audio is inside this chunk's audio
            assert tick < (end_beat - start_beat) * PPQ
            found.append(beat)
    assert sorted(found) == beats


def test_sequence_length_30s_is_4500_audio_tokens(encodec, tmp_path):
    # 120 BPM: 30 s = 60 whole beats = 2,250 frames at 75 Hz
    item = FakeItem("a.zip", 120.0, [note(1.0), note(2.0)], wav_bytes(click_song(61.0, [1.0])))
    ds = BeatDataset([item], chunk_duration=30.0, cache_dir=tmp_path, audio_tokenizer=encodec)
    seq = ds[0]["input_ids"]
    assert seq.index(AUDIO_END) - seq.index(AUDIO_START) - 1 == 4500
    assert len(seq) == 5 + 4500 + 4
    assert len(ds) == 3                      # 61 s → chunks at 0, 30, 60 s


def test_overlong_chunk_is_skipped_not_truncated(encodec, tmp_path):
    notes = [note(i / 8) for i in range(8 * 8)]                 # 64 notes in the first 8 beats
    item = FakeItem("x.zip", 120.0, notes, wav_bytes(click_song(8.0, [])))
    ds = BeatDataset([item], chunk_duration=4.0, max_seq_length=400, cache_dir=tmp_path, audio_tokenizer=encodec)
    # chunk = 8 beats = 4 s = 300 frames → 600 audio tokens > 400
    assert len(ds) == 0 and ds.skipped["chunk longer than max_seq_length"] == 2
    ds = BeatDataset([item], chunk_duration=4.0, max_seq_length=5 + 600 + 128, cache_dir=tmp_path,
                     audio_tokenizer=encodec)
    assert len(ds) == 2 and len(ds[0]["input_ids"]) == 5 + 600 + 128 and len(ds[1]["input_ids"]) == 5 + 600


def test_same_tick_notes_have_deterministic_order(encodec, tmp_path):
    notes = [note(1.0, 3, 2, 1, 0), note(1.0, 0, 0, 0, 1), note(1.0, 2, 1, 1, 8)]
    wav = wav_bytes(click_song(4.0, []))
    a = BeatDataset([FakeItem("y.zip", 120.0, notes, wav)], chunk_duration=4.0, cache_dir=tmp_path,
                    audio_tokenizer=encodec)[0]["input_ids"]
    b = BeatDataset([FakeItem("y.zip", 120.0, notes[::-1], wav)], chunk_duration=4.0, cache_dir=tmp_path,
                    audio_tokenizer=encodec)[0]["input_ids"]
    assert a == b
    types = a[a.index(NOTES_START) + 2:-1:2]
    assert types == sorted(types)


def test_unreadable_song_is_skipped_and_counted(encodec, tmp_path, caplog):
    good = FakeItem("good.zip", 120.0, [note(1.0)], wav_bytes(click_song(4.0, [0.5])))
    bad = FakeItem("bad.zip", 120.0, [note(1.0)], b"not audio")
    ds = BeatDataset([bad, good], chunk_duration=4.0, cache_dir=tmp_path, audio_tokenizer=encodec)
    assert ds.skipped["unusable song"] == 1 and len(ds) == 1 and "bad.zip" in caplog.text
    assert ds[0]["input_ids"][-1] == EOS
