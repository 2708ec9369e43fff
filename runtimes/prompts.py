"""Prompted and infilling generation: which tokens of a sample are given, and which generated.

A sampler takes `known`, int64 [B, L]: a token id where the position is clamped, FREE (-1)
where it is generated. Masked diffusion clamps natively: a clamped position starts unmasked at
t = 1, the token step carries unmasked tokens over, so it never changes, and its uniforms are
drawn but ignored (the noise protocol is unchanged). This module turns text into `known` rows:

    --prompt TEXT        the prompt's tokens at positions 0..n-1, the rest generated
    --template TEXT      text with holes: each HOLE ("____") is --hole-tokens generated
                         positions, the text around it is clamped, positions after the end
                         are generated
    --prompts FILE       JSON lines, {"prompt": TEXT} or {"template": TEXT} each
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from runtimes.errors import LddmError

FREE = -1
HOLE = "____"
MAX_PROMPTS_BYTES = 64 << 20


class PromptError(LddmError):
    """A prompt, template or prompts file that cannot be turned into clamped tokens."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: the text as given, whether it is a template, and its `known` row (L entries)."""

    text: str
    template: bool
    known: tuple[int, ...]


class PromptEncoder:
    """Encodes prompts and templates with a bundle's tokenizer into `known` rows of length L.

    Args:
        tokenizer: the manifest's "tokenizer" entry; None (synthetic data) is refused.
        seq_len: L; vocab_size: the data vocabulary (V - 1): ids must be below it.
        hole_tokens: generated positions per HOLE in a template.
    Each method's `where` names the input in messages ("--prompt", "line 3 of --prompts FILE").
    """

    def __init__(self, tokenizer: dict | None, seq_len: int, vocab_size: int, hole_tokens: int = 16):
        if tokenizer is None:
            raise PromptError("this bundle's model was trained on synthetic data and has no tokenizer, so it "
                              "takes no text prompt; sample it without --prompt, --template or --prompts")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer["json"])
        self.seq_len, self.vocab_size, self.hole_tokens = seq_len, vocab_size, hole_tokens
        self.unknown = {self.tokenizer.token_to_id(t) for t in ("[UNK]", "<unk>")} - {None}

    def _ids(self, text: str, where: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bad = [i for i in ids if i in self.unknown or not 0 <= i < self.vocab_size]
        if bad:
            raise PromptError(f"{where} has text the bundle's tokenizer cannot encode (unknown-token ids "
                              f"{bad[:3]}); use characters of the training corpus")
        return ids

    def prompt(self, text: str, where: str = "--prompt") -> Prompt:
        ids = self._ids(text, where)
        if not ids:
            raise PromptError(f"{where} is empty; give the text to continue")
        if len(ids) >= self.seq_len:
            raise PromptError(f"{where} is {len(ids)} tokens, but the model samples {self.seq_len}; "
                              f"shorten it to fewer than {self.seq_len} tokens")
        return Prompt(text, False, tuple(ids + [FREE] * (self.seq_len - len(ids))))

    def template(self, text: str, where: str = "--template", hole_tokens: int | None = None) -> Prompt:
        """`text` with each HOLE as hole_tokens generated positions (default: the encoder's)."""
        hole_tokens = hole_tokens or self.hole_tokens
        pieces = text.split(HOLE)
        if len(pieces) == 1:
            raise PromptError(f"{where} has no hole; mark each span to fill with {HOLE!r}")
        if not "".join(pieces).strip():
            raise PromptError(f"{where} is only holes; give the text around them (or use no prompt)")
        known: list[int] = []
        for i, piece in enumerate(pieces):
            known += self._ids(piece, where) if piece else []
            if i < len(pieces) - 1:
                known += [FREE] * hole_tokens
        if len(known) > self.seq_len:
            raise PromptError(f"{where} is {len(known)} tokens with its holes of {hole_tokens}, but the "
                              f"model samples {self.seq_len}; shorten it or lower --hole-tokens")
        return Prompt(text, True, tuple(known + [FREE] * (self.seq_len - len(known))))

    def file(self, path: str | Path) -> list[Prompt]:
        """Every line of a JSON-lines file: {"prompt": TEXT} or {"template": TEXT}."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_PROMPTS_BYTES:
                raise PromptError(f"--prompts {path} is above {MAX_PROMPTS_BYTES >> 20} MiB; split it")
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PromptError(f"--prompts {path} cannot be read as UTF-8 text ({type(e).__name__}); "
                              f"pass a JSON-lines file") from None
        prompts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"line {number} of --prompts {path}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise PromptError(f"{where} is not JSON; write one {{\"prompt\": TEXT}} or "
                                  f"{{\"template\": TEXT}} object per line") from None
            if not (isinstance(entry, dict) and len(entry) == 1 and set(entry) <= {"prompt", "template"}
                    and isinstance(next(iter(entry.values())), str)):
                raise PromptError(f"{where} is {line[:60]!r}; write one {{\"prompt\": TEXT}} or "
                                  f"{{\"template\": TEXT}} object per line")
            prompts.append(self.prompt(entry["prompt"], where) if "prompt" in entry
                           else self.template(entry["template"], where))
        if not prompts:
            raise PromptError(f"--prompts {path} has no prompts; write one JSON object per line")
        return prompts


def start_tokens(known: torch.Tensor | None, batch: int, seq_len: int, mask_id: int,
                 device: torch.device | str) -> torch.Tensor:
    """x at t = 1: the known tokens, every other position masked. Checks `known`.

    Raises:
        PromptError: `known` is not int64 [B, L] of ids below mask_id or FREE.
    """
    start = torch.full((batch, seq_len), mask_id, dtype=torch.int64, device=device)
    if known is None:
        return start
    known = torch.as_tensor(known)
    if known.dtype != torch.int64 or tuple(known.shape) != (batch, seq_len):
        raise PromptError(f"known tokens must be int64 [B, L] = [{batch}, {seq_len}], got {known.dtype} "
                          f"{list(known.shape)}")
    if bool(((known < FREE) | (known >= mask_id)).any()):
        raise PromptError(f"known tokens must be ids in [0, {mask_id}) or {FREE} (generated); "
                          f"got values outside")
    known = known.to(device)
    return torch.where(known >= 0, known, start)
