"""Audio: decode song files to 24 kHz mono, and turn audio into Encodec codes and back.

    audio = load_audio("song.egg")                       # (samples,) float32 @ 24 kHz
    encodec = create_audio_tokenizer(bandwidth=1.5)
    codes = encodec.encode(torch.from_numpy(audio)[None])  # (frames, 2) int @ 75 frames/s
    audio = encodec.decode(codes)                        # (1, samples)
"""

import hashlib
import io
import math
import os

import numpy as np
import soundfile
import soxr
import torch

SAMPLE_RATE = 24000
ENCODE_SEGMENT_S = 60.0

# Limits read from a file's header before decoding, so a damaged header (1 Hz claims a 28-hour song) is refused
# instead of exhausting memory in the resampler.
MIN_SAMPLE_RATE = 8000          # Hz; telephone-band audio, the lowest rate real music files use
MAX_SAMPLE_RATE = 384000        # Hz; the highest rate studio formats (DXD) use
MAX_CHANNELS = 8                # 7.1 surround; more is header damage, not a song
MAX_DURATION_S = 3600.0         # s; one hour fits long songs and mixes (BeatSaver maps last minutes) and bounds the
                                # decoded 24 kHz mono float32 audio at 346 MB
DECODE_BLOCK_FRAMES = 65536     # frames decoded and resampled at a time: memory is one block plus the output
# what soundfile (libsndfile) and soxr raise on bytes they cannot decode
_DECODE_ERRORS = (soundfile.SoundFileError, RuntimeError, TypeError, ValueError, OSError, EOFError)


def load_audio(path_or_bytes, sample_rate=SAMPLE_RATE, name=None):
    """Decode an audio file (.ogg/.egg Vorbis, .mp3, .wav, .flac) given as a path or its bytes.

    Returns (samples,) float32 mono at `sample_rate`. Raises ValueError("<name>: <reason>") when the file cannot be
    decoded, its header is outside MIN/MAX_SAMPLE_RATE, MAX_CHANNELS or MAX_DURATION_S (checked before decoding),
    or a sample is NaN or infinite. `name` (default: the path, or "<audio bytes>") is the file named in errors.
    """
    f, name = _open_checked(path_or_bytes, name)
    # parts = [(samples,) float32 at sample_rate, ...]; bad_frame = first frame holding a NaN or infinite sample
    parts, n_frames, bad_frame = [], 0, None
    try:
        with f:
            # stream = the file's rate → sample_rate, fed block by block; None when the rates agree
            stream = soxr.ResampleStream(f.samplerate, sample_rate, 1, dtype="float32") \
                if f.samplerate != sample_rate else None
            while len(block := f.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)):
                # block = (≤ DECODE_BLOCK_FRAMES, channels) float32 at the file's rate
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    bad_frame = n_frames + int(np.argmin(finite))
                    break
                n_frames += len(block)
                mono = block.mean(axis=1)
                parts.append(stream.resample_chunk(mono) if stream else mono)
            if stream:
                parts.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    except _DECODE_ERRORS as e:
        raise ValueError(f"{name}: cannot decode audio ({e})") from None
    if bad_frame is not None:
        raise ValueError(f"{name}: sample at {bad_frame / f.samplerate:.3f} s is NaN or infinite; "
                         "every sample must be a finite number")
    if n_frames == 0:
        raise ValueError(f"{name}: audio is empty (no frame could be decoded)")
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def audio_duration_s(path_or_bytes, name=None):
    """Length of an audio file in seconds, read from its header (no full decode).

    Raises ValueError naming the file when the header is unreadable or outside the limits load_audio checks.
    """
    f, _ = _open_checked(path_or_bytes, name)
    with f:
        return f.frames / f.samplerate


def _open_checked(path_or_bytes, name):
    """→ (soundfile.SoundFile open for reading, name for errors), once the header is within the limits above."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        name = name or "<audio bytes>"
        source = io.BytesIO(path_or_bytes)
    else:
        name = name or os.fspath(path_or_bytes)
        source = os.fspath(path_or_bytes)
    try:
        f = soundfile.SoundFile(source)
    except _DECODE_ERRORS as e:
        raise ValueError(f"{name}: cannot decode audio: not a readable .ogg/.egg/.mp3/.wav/.flac file "
                         f"({e})") from None
    rate, channels, frames = f.samplerate, f.channels, f.frames
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        problem = f"sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
    elif not 1 <= channels <= MAX_CHANNELS:
        problem = f"{channels} channels, outside 1..{MAX_CHANNELS}"
    elif frames <= 0:
        problem = "audio is empty (the header counts 0 frames)"
    elif frames / rate > MAX_DURATION_S:
        problem = f"header claims {frames / rate:.0f} s of audio, more than MAX_DURATION_S = {MAX_DURATION_S:.0f} s"
    else:
        return f, name
    f.close()
    raise ValueError(f"{name}: {problem}")


class AudioTokenizer:
    """Encodec at a fixed bandwidth: (1, samples) float audio ↔ (frames, n_codebooks) int codes.

    sample_rate   input/output rate in Hz (24000)
    hop           samples per frame (320)
    frame_rate    frames per second (75.0), read from the model
    n_codebooks   codebooks used at this bandwidth (2 at 1.5 kbps)
    codebook_size values per codebook (1024)
    silence       (n_codebooks,) int64 codes of silence (what Encodec settles on a few frames into zeros)
    identity      stable string naming model, bandwidth, weights and device type, for cache keys
    """

    def __init__(self, model, bandwidth, name, device):
        self.model = model.to(device).eval()
        self.bandwidth = bandwidth
        self.device = device
        config = model.config
        self.sample_rate = config.sampling_rate
        self.hop = math.prod(config.upsampling_ratios)
        self.frame_rate = self.sample_rate / self.hop
        self.n_codebooks = model.quantizer.get_num_quantizers_for_bandwidth(bandwidth)
        self.codebook_size = config.codebook_size
        # codes computed on a GPU may differ from the CPU's (TF32 convolutions), so the device type is part of it
        self.identity = (f"{name}|bandwidth={bandwidth}|weights={_weights_hash(model)}"
                         f"|device={torch.device(device).type}")
        self.silence = self.encode(torch.zeros(1, self.sample_rate))[-1].numpy()

    @torch.no_grad()
    def encode(self, audio):
        """(1, samples) float → (frames, n_codebooks) int64 codes, frames = ceil(samples / hop); frame k starts at k / frame_rate s.

        Long audio is encoded in segments of ENCODE_SEGMENT_S (a multiple of the hop), so memory stays bounded.
        """
        audio = torch.as_tensor(audio, dtype=torch.float32).reshape(1, -1)
        segment_samples = int(ENCODE_SEGMENT_S * self.sample_rate) // self.hop * self.hop
        codes = []
        for start in range(0, audio.shape[1], segment_samples):
            # segment = (1, 1, samples) on the model's device
            segment = audio[:, start:start + segment_samples][None].to(self.device)
            # audio_codes = (1 chunk, 1 batch, n_codebooks, frames)
            audio_codes = self.model.encode(segment, bandwidth=self.bandwidth).audio_codes
            codes.append(audio_codes[0, 0].T.cpu())
        return torch.cat(codes).long()

    @torch.no_grad()
    def decode(self, codes):
        """(frames, n_codebooks) int → (1, frames * hop) float audio."""
        codes = torch.as_tensor(codes, dtype=torch.long).to(self.device)
        audio = self.model.decode(codes.T[None, None], [None]).audio_values
        return audio.reshape(1, -1).cpu()


def create_audio_tokenizer(bandwidth=1.5, model="facebook/encodec_24khz", device=None):
    """Load an Encodec model (hub id, local folder, or an EncodecModel instance) as an AudioTokenizer.

    ValueError naming the model when it cannot be loaded (no such folder, truncated weights, hub unreachable) or
    has no such bandwidth."""
    from safetensors import SafetensorError
    from transformers import EncodecModel
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, EncodecModel):
        encodec, name = model, model.config.name_or_path or "EncodecModel"
    else:
        try:
            encodec, name = EncodecModel.from_pretrained(model), str(model)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
            raise load_failure("the Encodec model", model, e, "--audio_model") from None
    if bandwidth not in encodec.config.target_bandwidths:
        raise ValueError(f"{name}: bandwidth {bandwidth} is not one of {encodec.config.target_bandwidths}")
    return AudioTokenizer(encodec, bandwidth, name, device)


def load_failure(what, name, error, flag):
    """ValueError in one line for a model that cannot be loaded from name (a hub id or a folder): the error's first
    line and, for a hub id, how to point flag at a local folder instead (no internet, no cached copy)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hint = "" if os.path.isdir(str(name)) else (f"; without internet, pass {flag} a local folder (a copy of the hub's "
                                                f"{name}, or a model written by save_pretrained)")
    return ValueError(f"{name}: {what} cannot be loaded ({message}){hint}")


def _weights_hash(model):
    """Short SHA-1 over all parameters and buffers, so two differently initialised models never share a cache."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
