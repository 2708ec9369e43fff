"""Many sampling requests through one sampler: requests with the same step counts share calls.

A request asks for `num` samples of `steps` token steps (SEQ: and `latent_steps` latent steps)
from `seed`, optionally with clamped tokens (a prompt or a template, runtimes.prompts). Its
samples are the ones `lddm-export sample --seed SEED --num NUM --steps ...` writes with its
default batch size: its noise is drawn as sample_batches draws it (chunk b of at most
`max_batch` rows from seed + b), and every step of the sampler is row-independent, so the
chunks of several requests can ride in one sampler call and each row comes out as it would
alone. (The MDLM cache is not row-independent, which is why a server runs without it.)

The wire protocol is INPUTS and OUTPUTS: one request is one row (Triton batch dimension 1) of
scalar fields, and its response holds `num` samples, or an `error` sentence. Errors travel as
an output, not as a Triton error, because PyTriton fails every request of a dynamic batch
when its callable raises: one malformed request must not fail the others.

    handler = RequestHandler(sampler, manifest, Limits(), max_batch)
    responses = handler([request_arrays, ...])      # one dict of response arrays per request

The serving front ends (lddm_export.serve on PyTriton, the Triton Python model that
lddm_export.triton_repo writes) both are this handler behind Triton, so a request means the
same on both.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch

from runtimes.errors import LddmError
from runtimes.noise import Noise, batch_noises, latent_shape
from runtimes.options import MAX_SEED, check_int, check_job
from runtimes.prompts import FREE
from runtimes.samplers import Sampler
from runtimes.trajectory import Samples


# name -> (numpy dtype, shape without the batch dimension, optional); Triton's TYPE_INT64 / TYPE_STRING
INPUTS = {"seed": (np.int64, (1,), False), "num": (np.int64, (1,), False), "steps": (np.int64, (1,), False),
          "latent_steps": (np.int64, (1,), True),   # seq: T_y (0 or absent: steps)
          "prompt": (np.bytes_, (1,), True),        # UTF-8 text whose tokens are clamped at the start
          "template": (np.bytes_, (1,), True),      # UTF-8 text with "____" holes to fill
          "hole_tokens": (np.int64, (1,), True),    # tokens generated per hole (0 or absent: 16)
          "latent_candidates": (np.int64, (1,), True)}   # prompted seq: latent chains per sample (0, absent: 1)
OUTPUTS = {"tokens": (np.int64, (-1, "L")),          # [num, L] token ids (absent after an error)
           "text": (np.bytes_, (-1,)),               # [num] decoded UTF-8 text ("" for synthetic data)
           "error": (np.bytes_, (1,))}               # "" or the one sentence saying what to fix


class RequestError(LddmError):
    """A serving request whose fields are missing, malformed or beyond the server's limits."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (its command line sets them)."""

    max_samples: int = 256
    max_steps: int = 1024
    max_latent_candidates: int = 16


@dataclass(frozen=True)
class SampleRequest:
    """One validated request.

    Attributes:
        seed, num, steps: as `lddm-export sample`'s options.
        latent_steps: T_y for seq bundles (default: steps), None for the others.
        prompt: the prompt or template text as given, or None.
        known: int64 [num, L] clamped tokens (runtimes.prompts), or None.
        latent_candidates: prompted seq's latent chains per sample (runtimes.noise).
    """

    seed: int
    num: int
    steps: int
    latent_steps: int | None
    prompt: str | None = None
    known: torch.Tensor | None = None
    latent_candidates: int = 1

    @property
    def key(self) -> tuple[int, int, int]:
        """Requests with the same key can share sampler calls."""
        return self.steps, self.latent_steps or 0, self.latent_candidates


def parse_request(fields: dict, limits: Limits, variant: str, shapes: dict, encoder=None) -> SampleRequest:
    """Validate one request's fields, all in one place, before any work.

    Args:
        fields: {"seed", "num", "steps"} (ints), optional "latent_steps" (int, 0 = steps),
            optional "prompt" or "template" (str; "" = none), "hole_tokens" (int, 0 = the
            encoder's default).
        limits: the server's Limits.
        variant, shapes: the bundle's (shapes: {"L", "P", "D", ...}).
        encoder: a runtimes.prompts.PromptEncoder for text bundles, None for synthetic ones.
    Raises:
        RequestError (or the OptionError/PromptError subclasses of LddmError): one sentence
            naming the field and the fix.
    """
    for name in ("seed", "num", "steps"):
        if name not in fields:
            raise RequestError(f"the request has no {name!r}; send seed, num and steps")
    seed = check_int("seed", fields["seed"], 0, MAX_SEED)
    num = check_int("num", fields["num"], 1, limits.max_samples)
    steps = check_int("steps", fields["steps"], 1, limits.max_steps)
    latent_steps = check_int("latent_steps", fields.get("latent_steps", 0), 0, limits.max_steps)
    if latent_steps and variant != "seq":
        raise RequestError(f"latent_steps applies to seq bundles only, and this one is {variant}; send 0")
    latent_steps = (latent_steps or steps) if variant == "seq" else None
    hole_tokens = check_int("hole_tokens", fields.get("hole_tokens", 0), 0, shapes["L"])
    prompt, template = fields.get("prompt") or None, fields.get("template") or None
    if prompt is not None and template is not None:
        raise RequestError("the request has both a prompt and a template; send one of them")
    text, known = prompt or template, None
    if text is not None:
        if not isinstance(text, str):
            raise RequestError(f"the request's {'prompt' if prompt else 'template'} must be UTF-8 text")
        if encoder is None:
            raise RequestError("this bundle's model was trained on synthetic data and has no tokenizer, so it "
                               "takes no text prompt; send the request without a prompt or template")
        row = (encoder.prompt(text, "the request's prompt") if prompt
               else encoder.template(text, "the request's template", hole_tokens))
        known = torch.tensor([row.known] * num, dtype=torch.int64)
    candidates = check_int("latent_candidates", fields.get("latent_candidates", 0), 0, limits.max_latent_candidates) or 1
    if candidates > 1 and variant != "seq":
        raise RequestError(f"latent_candidates applies to seq bundles only, and this one is {variant}; send 0")
    if candidates > 1 and known is None:
        raise RequestError("latent_candidates keeps the latent that best explains the prompt; send a prompt or "
                           "template, or 0 candidates")
    check_job(num, num, steps, latent_steps, shapes, candidates)
    return SampleRequest(seed, num, steps, latent_steps, text, known, candidates)


def request_fields(arrays: dict[str, np.ndarray]) -> dict:
    """A request's tensors (batch dimension 1, as INPUTS) as plain Python values.

    Raises:
        RequestError: an unknown input, a tensor of another shape, or text that is not UTF-8.
    """
    unknown = sorted(set(arrays) - set(INPUTS))
    if unknown:
        raise RequestError(f"the request has the unknown inputs {unknown}; send {', '.join(INPUTS)}")
    fields = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.size != 1:
            raise RequestError(f"the request's {name!r} has shape {list(array.shape)}; send one value per "
                               f"request (shape [1, 1]) and one request per set of samples")
        value = array.reshape(()).item()
        if INPUTS[name][0] is np.bytes_:
            try:
                value = value.decode("utf-8") if isinstance(value, bytes) else value
            except UnicodeDecodeError:
                raise RequestError(f"the request's {name!r} is not UTF-8 text; encode it as UTF-8") from None
        fields[name] = value
    return fields


def response_arrays(tokens: np.ndarray, texts: list[str | None]) -> dict[str, np.ndarray]:
    """A served request's response tensors (batch dimension 1, as OUTPUTS): int64 [num, L]
    tokens, their decoded texts (None: synthetic data) and an empty error."""
    encoded = [(t or "").encode("utf-8") for t in texts]
    return {"tokens": tokens.astype(np.int64)[None], "text": np.array([encoded], dtype=np.object_),
            "error": np.array([[b""]], dtype=np.object_)}


def error_arrays(error: str) -> dict[str, np.ndarray]:
    """A refused request's response: the error alone (PyTriton cannot send empty tensors)."""
    return {"error": np.array([[error.encode("utf-8")]], dtype=np.object_)}


class RequestHandler:
    """Triton requests in, Triton responses out: parse each, sample the valid ones together.

    Args:
        sampler: a Sampler whose runners are active, built without the MDLM cache.
        manifest: the bundle's validated manifest (variant, shapes, tokenizer).
        limits: what one request may ask; max_batch: rows per sampler call.
    """

    def __init__(self, sampler: Sampler, manifest: dict, limits: Limits, max_batch: int):
        from runtimes.prompts import PromptEncoder
        from runtimes.tokenizer import TextDecoder

        self.sampler, self.limits, self.max_batch = sampler, limits, max_batch
        self.variant, self.shapes = manifest["variant"], manifest["shapes"]
        self.decoder = TextDecoder(manifest["tokenizer"])
        self.encoder = None if manifest["tokenizer"] is None else PromptEncoder(
            manifest["tokenizer"], self.shapes["L"], self.shapes["V"] - 1)

    def __call__(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """One response per request, in order; a request that fails validation gets its error."""
        responses: list[dict | None] = [None] * len(requests)
        valid: dict[int, SampleRequest] = {}
        for i, arrays in enumerate(requests):
            try:
                valid[i] = parse_request(request_fields(arrays), self.limits, self.variant, self.shapes, self.encoder)
            except LddmError as e:
                responses[i] = error_arrays(str(e))
        for i, result in zip(valid, run_requests(self.sampler, list(valid.values()), self.max_batch)):
            tokens = result.tokens.numpy()
            responses[i] = response_arrays(tokens, self.decoder.decode(tokens))
        return responses


@dataclass
class _Chunk:
    """Rows [start, start + noise.batch) of request `request`, drawn from one seed."""

    request: int
    start: int
    noise: Noise
    known: torch.Tensor | None


def _chunks(index: int, request: SampleRequest, variant: str, shapes: dict, max_batch: int) -> list[_Chunk]:
    """The request's noise, chunked as sample_batches chunks it: chunk b from seed + b."""
    return [_Chunk(index, start, noise, None if request.known is None else request.known[start:start + noise.batch])
            for start, noise in batch_noises(request.seed, request.num, max_batch, request.steps, shapes["L"],
                                             latent_shape(variant, shapes), request.latent_candidates)]


def _calls(chunks: list[_Chunk], max_batch: int) -> list[list[_Chunk]]:
    """Whole chunks packed, in order, into calls of at most max_batch rows."""
    calls: list[list[_Chunk]] = []
    rows = max_batch
    for chunk in chunks:
        if rows + chunk.noise.batch > max_batch:
            calls.append([])
            rows = 0
        calls[-1].append(chunk)
        rows += chunk.noise.batch
    return calls


def _joined(chunks: list[_Chunk]) -> tuple[Noise, torch.Tensor | None]:
    """One call's noise (rows concatenated) and known tokens (FREE rows where a chunk has none)."""
    def joined(field: str, axis: int):
        arrays = [getattr(c.noise, field) for c in chunks]
        return None if arrays[0] is None else np.concatenate(arrays, axis=axis)

    noise = Noise(joined("u", 1), joined("y_init", 0), joined("y_candidates", 1))
    if all(c.known is None for c in chunks):
        return noise, None
    L = noise.u.shape[2]
    known = torch.cat([c.known if c.known is not None else torch.full((c.noise.batch, L), FREE)
                       for c in chunks])
    return noise, known


def run_requests(sampler: Sampler, requests: list[SampleRequest], max_batch: int) -> list[Samples]:
    """Sample every request, sharing calls between requests of the same step counts.

    Args:
        sampler: a Sampler whose runners are active, without the MDLM cache.
        requests: validated by parse_request.
        max_batch: rows per sampler call (the bundle's batch profile maximum).
    Returns:
        One Samples per request, in order, on the CPU: tokens int64 [num, L], latent or None.
    """
    if sampler.cache:
        raise LddmError("the MDLM cache makes a row's samples depend on the others in its batch; "
                        "serve with a sampler built without cache")
    done: dict[tuple[int, int], Samples] = {}     # (request, first row of the chunk) -> its rows
    order = sorted(range(len(requests)), key=lambda i: requests[i].key)
    for (steps, latent_steps, _), members in groupby(order, key=lambda i: requests[i].key):
        chunks = [c for i in members for c in _chunks(i, requests[i], sampler.variant, sampler.shapes, max_batch)]
        for call in _calls(chunks, max_batch):
            noise, known = _joined(call)
            result = sampler.sample(noise, latent_steps or None, known=known)
            row = 0
            for chunk in call:
                rows = slice(row, row + chunk.noise.batch)
                done[chunk.request, chunk.start] = Samples(
                    result.tokens[rows].cpu(), None if result.latent is None else result.latent[rows].cpu())
                row += chunk.noise.batch
    out = []
    for i, request in enumerate(requests):
        parts = [done[i, start] for start in range(0, request.num, max_batch)]
        out.append(Samples(torch.cat([p.tokens for p in parts]),
                           None if parts[0].latent is None else torch.cat([p.latent for p in parts])))
    return out
