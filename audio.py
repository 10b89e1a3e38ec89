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


def load_audio(path_or_bytes, sample_rate=SAMPLE_RATE, name=None):
    """Decode an audio file (.ogg/.egg Vorbis, .mp3, .wav, .flac) given as a path or its bytes.

    Returns (samples,) float32 mono at `sample_rate`. Raises ValueError naming the file when it cannot be decoded.
    """
    if isinstance(path_or_bytes, (bytes, bytearray)):
        name = name or "<audio bytes>"
        source = io.BytesIO(path_or_bytes)
    else:
        name = name or os.fspath(path_or_bytes)
        source = os.fspath(path_or_bytes)
    try:
        # audio = (samples, channels) float32 at the file's rate
        audio, file_rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, OSError) as e:
        raise ValueError(f"{name}: cannot decode audio ({e})") from None
    if audio.shape[0] == 0:
        raise ValueError(f"{name}: audio is empty")
    mono = audio.mean(axis=1)
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_duration_s(path_or_bytes, name=None):
    """Length of an audio file in seconds, read from its header (no full decode). Raises ValueError when unreadable."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else os.fspath(path_or_bytes)
    try:
        info = soundfile.info(source)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, OSError) as e:
        raise ValueError(f"{name or '<audio>'}: cannot read audio header ({e})") from None
    return info.frames / info.samplerate


class AudioTokenizer:
    """Encodec at a fixed bandwidth: (1, samples) float audio ↔ (frames, n_codebooks) int codes.

    sample_rate   input/output rate in Hz (24000)
    hop           samples per frame (320)
    frame_rate    frames per second (75.0), read from the model
    n_codebooks   codebooks used at this bandwidth (2 at 1.5 kbps)
    codebook_size values per codebook (1024)
    identity      stable string naming model, bandwidth and weights, for cache keys
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
        self.identity = f"{name}|bandwidth={bandwidth}|weights={_weights_hash(model)}"

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
    """Load an Encodec model (hub id, local folder, or an EncodecModel instance) as an AudioTokenizer."""
    from transformers import EncodecModel
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, EncodecModel):
        encodec, name = model, model.config.name_or_path or "EncodecModel"
    else:
        encodec, name = EncodecModel.from_pretrained(model), str(model)
    if bandwidth not in encodec.config.target_bandwidths:
        raise ValueError(f"{name}: bandwidth {bandwidth} is not one of {encodec.config.target_bandwidths}")
    return AudioTokenizer(encodec, bandwidth, name, device)


def _weights_hash(model):
    """Short SHA-1 over all parameters and buffers, so two differently initialised models never share a cache."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
