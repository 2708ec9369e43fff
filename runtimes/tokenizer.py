"""ids -> text from a manifest's "tokenizer" entry, with the `tokenizers` library.

The entry is the checkpoint's: {"kind": "bpe" | "bert", "json": <tokenizer.json text>,
"vocab_size": N}, or null for synthetic data (sawtooth), which has no text.
"""
from __future__ import annotations

from runtimes.errors import BundleError

MASK_PLACEHOLDER = "_"  # how a still-masked id (== vocab size) is shown, as training/data.py does


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
