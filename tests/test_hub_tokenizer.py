"""Tokenizer resolution against a real, local Hugging Face cache (no network, nothing mocked).

Each test builds the hub cache layout huggingface_hub itself reads
(``models--{org}--{name}/refs/main``, ``snapshots/<commit>/tokenizer.model`` → ``blobs/…``) in a
temporary folder, with offline mode on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_token

from mlx_openelm.errors import ModelNotFoundError, TokenizerError
from mlx_openelm.hub import (
    LLAMA2_GATED_REPO,
    LLAMA2_MIRRORS,
    check_llama2_tokenizer,
    file_sha256,
    resolve_tokenizer_file,
)
from mlx_openelm.tokenizer import LLAMA2_TOKENIZER_SHA256

MIRROR = LLAMA2_MIRRORS[0]


def add_to_cache(cache: Path, repo: str, data: bytes, commit: str = "0123abcd" * 5) -> Path:
    """Put ``data`` as ``tokenizer.model`` of ``repo`` into a hub cache, the way hf does."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.model").symlink_to(os.path.relpath(blob, snapshot))
    return snapshot / "tokenizer.model"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache in tmp_path, offline, with no Hugging Face token anywhere.

    huggingface_hub reads these variables once, at import, into ``huggingface_hub.constants``,
    so the constants are set as well.
    """
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    assert get_token() is None
    return cache


def test_resolves_the_real_tokenizer_from_the_mirror_cache(
    hf_cache: Path, llama2_tokenizer: Path
) -> None:
    cached = add_to_cache(hf_cache, MIRROR, llama2_tokenizer.read_bytes())
    found = resolve_tokenizer_file()  # cache and offline mode from the environment
    assert found == cached
    assert file_sha256(found) == LLAMA2_TOKENIZER_SHA256
    check_llama2_tokenizer(found)
    # A model folder without tokenizer.model falls back to the cache as well.
    assert resolve_tokenizer_file(model_dir=hf_cache.parent) == cached


def test_token_prefers_metas_gated_repo(hf_cache: Path, llama2_tokenizer: Path) -> None:
    data = llama2_tokenizer.read_bytes()
    mirrored = add_to_cache(hf_cache, MIRROR, data)
    gated = add_to_cache(hf_cache, LLAMA2_GATED_REPO, data)
    assert resolve_tokenizer_file(token="hf_example") == gated
    assert resolve_tokenizer_file() == mirrored  # no token: only the public mirror


def test_a_wrong_file_from_the_mirror_is_refused(hf_cache: Path) -> None:
    cached = add_to_cache(hf_cache, MIRROR, b"not the llama-2 tokenizer")
    wrong = hashlib.sha256(b"not the llama-2 tokenizer").hexdigest()
    with pytest.raises(TokenizerError) as info:
        resolve_tokenizer_file(cache_dir=hf_cache, offline=True)
    message = str(info.value)
    assert f"{cached} (from {MIRROR}) is not the Llama-2 tokenizer" in message
    assert f"its sha256 is {wrong}, expected {LLAMA2_TOKENIZER_SHA256}" in message
    assert f"`hf cache rm model/{MIRROR}`" in message and "--tokenizer FILE" in message


def test_a_wrong_file_from_the_gated_repo_is_refused(hf_cache: Path, tmp_path: Path) -> None:
    add_to_cache(hf_cache, LLAMA2_GATED_REPO, b"something else")
    with pytest.raises(TokenizerError, match=f"from {LLAMA2_GATED_REPO}"):
        resolve_tokenizer_file(token="hf_example", cache_dir=hf_cache)
    # Files named by the user are trusted; check_llama2_tokenizer verifies one on request.
    mine = tmp_path / "mine.model"
    mine.write_bytes(b"something else")
    assert resolve_tokenizer_file(tokenizer=mine) == mine
    with pytest.raises(TokenizerError, match="is not the Llama-2 tokenizer"):
        check_llama2_tokenizer(mine)


def test_empty_cache_offline_says_how_to_fetch(hf_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_tokenizer_file()
    message = str(info.value)
    assert f"not cached in {hf_cache}" in message and "HF_HUB_OFFLINE=1" in message
    assert f"`hf download {MIRROR} tokenizer.model`" in message
    assert "--tokenizer FILE" in message
    assert f"Tried: {MIRROR}: LocalEntryNotFoundError" in message
    assert LLAMA2_GATED_REPO + ":" not in message  # no token, so the gated repo is not tried


def test_empty_cache_with_token_tries_gated_repo_then_mirror(hf_cache: Path, tmp_path) -> None:
    other_cache = tmp_path / "other-cache"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_tokenizer_file(token="hf_example", cache_dir=other_cache, offline=True)
    message = str(info.value)
    assert f"not cached in {other_cache}" in message
    assert message.index(f"{LLAMA2_GATED_REPO}: LocalEntryNotFoundError") < message.index(
        f"{MIRROR}: LocalEntryNotFoundError"
    )


def test_explicit_file_and_model_folder_come_first(
    hf_cache: Path, tiny_spm: Path, tmp_path
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(tiny_spm.read_bytes())
    assert resolve_tokenizer_file(model_dir=model_dir) == model_dir / "tokenizer.model"
    assert resolve_tokenizer_file(model_dir=model_dir, tokenizer=tiny_spm) == tiny_spm
    assert resolve_tokenizer_file(tokenizer=str(tiny_spm.parent)) == tiny_spm
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(TokenizerError, match=f"Tokenizer file {missing} does not exist"):
        resolve_tokenizer_file(model_dir=model_dir, tokenizer=missing)


def test_file_sha256(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # several read blocks
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
