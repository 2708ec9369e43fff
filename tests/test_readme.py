"""The README's Python block runs as written (on a tiny FP32 bundle in place of the main job's)."""
from __future__ import annotations

import re
from pathlib import Path

from fixtures import cached_tiny_bundle

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_block_runs_as_written(bundle_cache, capsys):  # noqa: F811
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert 'Bundle.open("bundles/sawtooth-seq")' in code
    bundle = cached_tiny_bundle(bundle_cache, "seq")  # FP32 graphs only
    code = code.replace("bundles/sawtooth-seq", str(bundle)).replace('"ort", "fp16"', '"ort", "fp32"')
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "latent 1 / 8" and out[-2] == "token 8 / 8"
    assert out[-1].startswith("torch.Size([4, 16])")
