"""Finding files on the Hugging Face Hub: the Llama-2 tokenizer OpenELM uses.

Apple's OpenELM repositories ship no tokenizer; the models use Meta's Llama-2 ``tokenizer.model``.
Meta's repository is gated (a licence click and a token), so a public mirror holding the same file
is the fallback. Whatever the source, a downloaded file must hash to the known Llama-2 sha256.
huggingface_hub itself honours ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from huggingface_hub import constants, get_token, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from mlx_openelm.errors import ModelNotFoundError, TokenizerError
from mlx_openelm.tokenizer import LLAMA2_TOKENIZER_SHA256, TOKENIZER_FILENAME

LLAMA2_GATED_REPO = "meta-llama/Llama-2-7b-hf"
# Public, ungated copies of Meta's Llama-2 repository with the identical tokenizer.model.
LLAMA2_MIRRORS = ("NousResearch/Llama-2-7b-hf",)


def resolve_tokenizer_file(
    model_dir: str | Path | None = None,
    tokenizer: str | Path | None = None,
    token: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
) -> Path:
    """Find the SentencePiece ``tokenizer.model`` for a model.

    Order: the explicit ``tokenizer`` file (or a folder holding ``tokenizer.model``); else
    ``model_dir/tokenizer.model``; else the Llama-2 tokenizer from the Hub or its cache (see
    :func:`download_llama2_tokenizer`). Files the user points at are trusted as they are; use
    :func:`check_llama2_tokenizer` to verify one.

    Args:
        model_dir: A model folder that may hold ``tokenizer.model``.
        tokenizer: A tokenizer file given by the user (``--tokenizer FILE``).
        token: A Hugging Face token; defaults to the logged-in one.
        cache_dir: The Hugging Face hub cache; defaults to huggingface_hub's (``HF_HUB_CACHE``).
        offline: Use only the cache; defaults to huggingface_hub's ``HF_HUB_OFFLINE``.

    Returns:
        The path of the tokenizer file.

    Raises:
        TokenizerError: ``tokenizer`` does not exist, or a downloaded file is not Llama-2's.
        ModelNotFoundError: No tokenizer could be downloaded or found in the cache.
    """
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / TOKENIZER_FILENAME
        if not path.is_file():
            raise TokenizerError(
                f"Tokenizer file {path} does not exist. Pass the path of a Llama-2 "
                f"{TOKENIZER_FILENAME}, or leave --tokenizer out to fetch it from the Hub."
            )
        return path
    if model_dir is not None and (Path(model_dir) / TOKENIZER_FILENAME).is_file():
        return Path(model_dir) / TOKENIZER_FILENAME
    return download_llama2_tokenizer(token=token, cache_dir=cache_dir, offline=offline)


def download_llama2_tokenizer(
    token: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
) -> Path:
    """The Llama-2 ``tokenizer.model`` from the Hugging Face cache, downloading it if needed.

    With a token (given or logged in) Meta's gated repository is tried first, then the public
    mirrors. The file found must hash to :data:`LLAMA2_TOKENIZER_SHA256`.

    Raises:
        TokenizerError: The file found is not the Llama-2 tokenizer.
        ModelNotFoundError: No repository gave the file (not cached while offline, no network,
            no access).
    """
    token = token or get_token()
    repos = ((LLAMA2_GATED_REPO,) if token else ()) + LLAMA2_MIRRORS
    local_only = constants.is_offline_mode() if offline is None else offline
    failures = []
    for repo in repos:
        try:
            found = hf_hub_download(
                repo,
                TOKENIZER_FILENAME,
                token=token if repo == LLAMA2_GATED_REPO else False,
                cache_dir=cache_dir,
                local_files_only=local_only,
            )
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
            failures.append(f"{repo}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        check_llama2_tokenizer(found, source=repo)
        return Path(found)
    offline_now = (
        local_only or constants.is_offline_mode()
    )  # HF_HUB_OFFLINE wins over offline=False
    raise ModelNotFoundError(_not_found_message(failures, offline_now, cache_dir))


def check_llama2_tokenizer(path: str | Path, source: str | None = None) -> None:
    """Refuse a file that is not Meta's Llama-2 ``tokenizer.model`` (by sha256).

    Raises:
        TokenizerError: The file's sha256 differs from :data:`LLAMA2_TOKENIZER_SHA256`.
    """
    digest = file_sha256(path)
    if digest != LLAMA2_TOKENIZER_SHA256:
        origin = f" (from {source})" if source else ""
        remove = f"`hf cache rm model/{source}`" if source else "delete it"
        raise TokenizerError(
            f"{path}{origin} is not the Llama-2 tokenizer OpenELM uses: its sha256 is {digest}, "
            f"expected {LLAMA2_TOKENIZER_SHA256}. Refusing it, since a wrong tokenizer gives "
            f"wrong ids silently. Remove the bad copy ({remove}) or pass the real Llama-2 "
            f"{TOKENIZER_FILENAME} with --tokenizer FILE."
        )


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _not_found_message(failures: list[str], offline: bool, cache_dir: str | Path | None) -> str:
    cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
    mirror = LLAMA2_MIRRORS[0]
    if offline:
        what = (
            f"The Llama-2 {TOKENIZER_FILENAME} is not cached in {cache} and Hugging Face "
            "downloads are off (offline mode, HF_HUB_OFFLINE=1)."
        )
    else:
        what = f"Could not download the Llama-2 {TOKENIZER_FILENAME} from the Hugging Face Hub."
    return (
        f"{what} Fetch it while online with `hf download {mirror} {TOKENIZER_FILENAME}` "
        f"(or `hf download {LLAMA2_GATED_REPO} {TOKENIZER_FILENAME}` after accepting Meta's "
        "licence and `hf auth login`), or pass a local copy with --tokenizer FILE. "
        "Tried: " + "; ".join(failures)
    )
