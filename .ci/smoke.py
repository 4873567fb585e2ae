"""Smoke test of an INSTALLED mlx-openelm (a wheel in a fresh venv), run outside the source tree.

    python /path/to/src/.ci/smoke.py /path/to/src

1. the package is imported from site-packages, not from the checkout;
2. every module of the installed package imports;
3. ``mlx-openelm COMMAND --help`` works for every command and sub-command;
4. end to end on a tiny generated Hugging Face checkpoint: convert -> generate -> lora (a few
   steps) -> fuse -> serve a request through the real ``openai`` client, and one with a JSON
   schema (``response_format``: the ``json`` extra's llguidance, as installed).

The tiny tokenizer and weights come from the suite's own fixture helpers (``tests/spm_fixture.py``,
``tests/tiny.py``), imported from the source tree's ``tests/`` folder only: they hold no package
code, and everything they import of ours resolves to the installed package. Exits non-zero on the
first failure with the command and its output.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(SRC / "tests"))  # fixture helpers only; see the docstring

import mlx_openelm  # noqa: E402  (after the path is set, on purpose)

EXE = Path(sys.executable).parent / "mlx-openelm"


def fail(what: str, output: str = "") -> None:
    print(f"SMOKE FAILED: {what}\n{output}", file=sys.stderr)
    sys.exit(1)


def run(*args: str, expect: int = 0, timeout: int = 600) -> str:
    proc = subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode != expect:
        fail(f"mlx-openelm {' '.join(args)} exited {proc.returncode}", proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def check_installed_location() -> None:
    where = Path(mlx_openelm.__file__).resolve()
    if SRC in where.parents or "site-packages" not in where.parts:
        fail(f"mlx_openelm was imported from {where}, not from an installed wheel")
    if Path.cwd().resolve() == SRC or SRC in Path.cwd().resolve().parents:
        fail(f"run me from outside the source tree, not {Path.cwd()}")
    print(f"installed package: {where.parent}")


def import_every_module() -> None:
    names = [m.name for m in pkgutil.walk_packages(mlx_openelm.__path__, "mlx_openelm.")]
    for name in names:
        importlib.import_module(name)
    if "mlx_openelm.convert" not in names or "mlx_openelm.lora" not in names:
        fail(f"subpackages missing from the install: {names}")
    print(f"imported {len(names)} modules")


def every_command() -> list[list[str]]:
    import typer

    from mlx_openelm.cli import app

    def walk(cmd, path: list[str]) -> list[list[str]]:  # typer's (vendored) click commands
        out = [path]
        if hasattr(cmd, "commands"):  # a group
            for name, sub in cmd.commands.items():
                out += walk(sub, [*path, name])
        return out

    return walk(typer.main.get_command(app), [])


def help_of_every_command() -> None:
    commands = every_command()
    for path in commands:
        text = run(*path, "--help")
        if "Usage" not in text:
            fail(f"mlx-openelm {' '.join(path)} --help printed no usage", text)
    print(f"--help works for {len(commands)} commands")


def tiny_checkpoint(root: Path) -> tuple[Path, Path]:
    import mlx.core as mx

    from spm_fixture import make_tiny_sentencepiece
    from tiny import random_weights, tiny_config

    tokenizer = make_tiny_sentencepiece(root / "tok" / "tokenizer.model")
    config = tiny_config(vocab_size=400)
    src = root / "hf-tiny"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    weights = {k: mx.array(v) for k, v in random_weights(config).items()}
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    return src, tokenizer


def write_data(folder: Path) -> Path:
    folder.mkdir()
    for split, n in (("train", 16), ("valid", 4)):
        rows = ({"text": f"hello world number {i} of the {split} set"} for i in range(n))
        lines = [json.dumps(row) for row in rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def serve_one_request(model: Path) -> None:
    import openai

    cmd = [str(EXE), "serve", "-m", str(model), "--port", "0", "--max-tokens", "4"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline, line, seen = time.monotonic() + 120, "", []
        while "Serving" not in line:
            if time.monotonic() > deadline or proc.poll() is not None:
                fail("serve did not start", "".join(seen))
            line = proc.stderr.readline()
            seen.append(line)
        base_url = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line).group(1)
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
        reply = client.completions.create(model=model.name, prompt="hello world", max_tokens=4)
        if reply.usage.completion_tokens != 4 or not reply.choices:
            fail(f"serve answered {reply}")
        print(f"serve: {reply.usage.completion_tokens} tokens through the openai client")
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
                  "required": ["ok"], "additionalProperties": False}  # fmt: skip
        fmt = {"type": "json_schema", "json_schema": {"name": "smoke", "schema": schema}}
        reply = client.completions.create(
            model=model.name, prompt="hello", max_tokens=32, extra_body={"response_format": fmt}
        )
        try:
            value = json.loads(reply.choices[0].text)
        except ValueError:
            value = None
        if not isinstance(value, dict) or set(value) != {"ok"}:
            fail(f"serve's structured output (the json extra) answered {reply}")
        print(f"serve: structured output {reply.choices[0].text}")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def end_to_end(root: Path) -> None:
    src, tokenizer = tiny_checkpoint(root)
    model = root / "tiny-mlx"
    run("convert", str(src), str(model), "--tokenizer", str(tokenizer))
    if not (model / "config.json").is_file():
        fail("convert wrote no config.json")
    text = run("generate", "-m", str(model), "-p", "hello", "-n", "5", "--raw")
    if "tokens" not in text and "tok/s" not in text:
        fail("generate printed no stats line", text)
    adapters = root / "adapters"
    train = ["--iters", "3", "--batch-size", "2", "--max-seq-len", "32", "--val-every", "3"]
    run("lora", "-m", str(model), "--data", str(write_data(root / "data")), "-o", str(adapters),
        *train)  # fmt: skip
    if not (adapters / "adapters.safetensors").is_file():
        fail(f"lora wrote no adapters.safetensors in {adapters}")
    fused = root / "fused"
    run("fuse", "-m", str(model), "--adapter", str(adapters), "-o", str(fused))
    serve_one_request(fused)
    print("end to end: convert -> generate -> lora -> fuse -> serve")


def main() -> None:
    check_installed_location()
    import_every_module()
    help_of_every_command()
    with tempfile.TemporaryDirectory() as tmp:
        end_to_end(Path(tmp))
    print(f"smoke passed on Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
