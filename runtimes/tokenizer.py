"""The "tokenizer" entry of a checkpoint and a manifest: its check, and ids -> text.

The entry is the checkpoint's: {"kind": "bpe" | "bert", "json": <tokenizer.json text>,
"vocab_size": N}, or null for synthetic data (sawtooth), which has no text. The `tokenizers`
library is imported only where it is used, so the check runs without it.
"""
from __future__ import annotations

import reprlib

from runtimes.errors import BundleError

MASK_PLACEHOLDER = "_"  # how a still-masked id (== vocab size) is shown, as training/data.py does


def tokenizer_problem(entry, vocab_size: int) -> str | None:
    """What is wrong with a "tokenizer" entry (manifest or checkpoint), as a phrase, or None.

    None (synthetic data) is fine. Otherwise the entry needs kind (str), json (str) and
    vocab_size (int) equal to the model's vocabulary, and where the tokenizers package is
    installed (not on an engine-only Jetson) the JSON must load to a tokenizer of that size, so
    a malformed entry is refused when a bundle is built, not when it is sampled.
    """
    if entry is None:
        return None
    if not (isinstance(entry, dict) and isinstance(entry.get("kind"), str) and isinstance(entry.get("json"), str)
            and isinstance(entry.get("vocab_size"), int) and not isinstance(entry["vocab_size"], bool)):
        return f"is not {{\"kind\": str, \"json\": str, \"vocab_size\": int}} (got {reprlib.repr(entry)})"
    if entry["vocab_size"] != vocab_size:
        return f"says vocab_size {entry['vocab_size']}, but the model's vocabulary is {vocab_size}"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        loaded = Tokenizer.from_str(entry["json"])
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        return f"holds JSON that does not load as a tokenizer ({(str(e).splitlines() or [type(e).__name__])[0][:80]})"
    if loaded.get_vocab_size() != vocab_size:
        return f"loads a tokenizer of {loaded.get_vocab_size()} tokens, but the model's vocabulary is {vocab_size}"
    return None


class TextDecoder:
    """Decode token ids with the tokenizer a bundle records.

    Args:
        entry: the manifest's "tokenizer" entry (a dict with "json"); None for synthetic data.
    """

    def __init__(self, entry: dict | None):
        self.tokenizer = None
        if entry is None:
            return
        if not isinstance(entry, dict) or not isinstance(entry.get("json"), str):
            raise BundleError(f"the manifest's tokenizer entry {str(entry)[:60]!r} has no 'json' field; "
                              f"rebuild the bundle from a checkpoint trained on text")
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_str(entry["json"])
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise BundleError(f"the manifest's tokenizer JSON does not load ({str(e)[:80]}); "
                              f"rebuild the bundle") from None

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    def decode(self, rows) -> list[str | None]:
        """Decode each row of ids.

        Args:
            rows: int ids [N, L] (tensor, array or nested lists).
        Returns:
            N strings (ids beyond the vocabulary, i.e. the mask, shown as "_"), or N Nones when
            the bundle has no tokenizer.
        """
        rows = rows.tolist() if hasattr(rows, "tolist") else [list(r) for r in rows]
        if self.tokenizer is None:
            return [None] * len(rows)
        vocab = self.tokenizer.get_vocab_size()
        placeholder = self.tokenizer.token_to_id(MASK_PLACEHOLDER)
        texts = []
        for row in rows:
            kept = [i if i < vocab else placeholder for i in row]
            texts.append(self.tokenizer.decode([i for i in kept if i is not None], skip_special_tokens=False))
        return texts
