"""The Llama-2 SentencePiece tokenizer OpenELM uses, its Zephyr chat template and streaming decode.

Encoding follows Hugging Face's slow ``LlamaTokenizer`` in legacy mode, which OpenELM-Instruct
was fine-tuned with: ``<unk>``, ``<s>`` and ``</s>`` in the text become their ids, and each stretch
between them is encoded by SentencePiece on its own, dummy-prefix space included
(``"hi</s>\\nx"`` → ``▁hi </s> ▁ <0x0A> x``). transformers 5's Llama tokenizer (a ``tokenizers``
BPE) differs from SentencePiece on runs of spaces (``"a  b"``: ``▁a ▁▁ b`` vs ``▁a ▁ ▁b``) and at
stretches that start with a space; we keep SentencePiece's encoding, as OpenELM was trained on it.

Decoding works piece by piece (``▁`` → space, ``<0xNN>`` → byte) in one state machine shared by
:meth:`Tokenizer.decode` and :class:`StreamingDetokenizer`, so streamed chunks always join to
exactly the full decode. That state machine lives in :mod:`mlx_openelm.detokenizer`;
``StreamingDetokenizer`` is re-exported here.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_openelm.detokenizer import SPECIAL, StreamingDetokenizer, piece_table
from mlx_openelm.errors import TokenizerError
from mlx_openelm.jsonio import read_json

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

LLAMA2_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
TOKENIZER_FILENAME = "tokenizer.model"
TOKENIZER_CONFIG_FILENAME = "tokenizer_config.json"
MODEL_MAX_LENGTH = 2048  # OpenELM's context length
CHAT_ROLES = ("system", "user", "assistant")

# Apple's template, verbatim from corenet's openelm-instruct.yaml (alignment-handbook's Zephyr
# template). Rendered like Hugging Face does (trim_blocks, lstrip_blocks) it gives
# "<|system|>\n{sys}</s>\n<|user|>\n{msg}</s>\n<|assistant|>\n{reply}</s>\n" and the generation
# prompt "<|assistant|>\n": trim_blocks removes the newline after a block tag (`%}`) but not the one
# after the expression `{{ '<|assistant|>' }}`, so the prompt already ends with a newline.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Tokenizer:
    """A SentencePiece tokenizer with Hugging Face ``LlamaTokenizer`` (legacy) semantics.

    Besides its own API it offers what mlx-lm's ``stream_generate`` reads from a tokenizer
    (``encode(text, add_special_tokens=...)``, ``decode``, ``bos_token``, ``eos_token_id``,
    ``get_vocab``, ``chat_template``…), so it can be passed to mlx-lm directly; use
    :meth:`to_mlx_lm` to wrap it with our linear-time :class:`StreamingDetokenizer`.
    """

    def __init__(self, model_file: str | Path, chat_template: str | None = None) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise TokenizerError(
                f"Tokenizer file {path} does not exist. Pass the Llama-2 {TOKENIZER_FILENAME} "
                "(--tokenizer FILE) or convert the model again so its folder holds one."
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as exc:
            raise TokenizerError(
                f"{path} is not a SentencePiece model ({exc}). OpenELM needs the Llama-2 "
                f"{TOKENIZER_FILENAME} (sha256 {LLAMA2_TOKENIZER_SHA256})."
            ) from exc
        self.model_file = path
        self.chat_template = chat_template
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()
        self.vocab_size: int = self._sp.get_piece_size()
        if min(self.bos_id, self.eos_id, self.unk_id) < 0:
            raise TokenizerError(
                f"{path} defines no BOS, EOS or UNK piece (ids {self.bos_id}, {self.eos_id}, "
                f"{self.unk_id}); OpenELM needs the Llama-2 {TOKENIZER_FILENAME}."
            )
        # Hugging Face's names, which mlx-lm reads.
        self.bos_token, self.eos_token, self.unk_token = map(
            self._sp.id_to_piece, (self.bos_id, self.eos_id, self.unk_id)
        )
        self.bos_token_id, self.eos_token_id = self.bos_id, self.eos_id
        self.eos_token_ids = {self.eos_id}
        self.pieces = piece_table(self._sp)  # (kind, text, byte) per id, for the detokenizer
        self._special_ids = {
            text: i for i, (kind, text, _) in enumerate(self.pieces) if kind == SPECIAL
        }
        # Longest first, so that no special string matches inside a longer one.
        alternatives = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer_file: str | Path | None = None) -> Tokenizer:
        """Load ``folder/tokenizer.model`` (or ``tokenizer_file``) and the folder's chat template.

        Args:
            folder: A model folder; its ``tokenizer_config.json`` may hold a ``chat_template``.
            tokenizer_file: A SentencePiece model to use instead of ``folder/tokenizer.model``.

        Raises:
            TokenizerError: The model file is missing or unreadable, or the config is malformed.
        """
        folder = Path(folder)
        model_file = (
            Path(tokenizer_file) if tokenizer_file is not None else folder / TOKENIZER_FILENAME
        )
        if not model_file.is_file():
            raise TokenizerError(
                f"No tokenizer at {model_file}. Pass the Llama-2 {TOKENIZER_FILENAME} with "
                "--tokenizer FILE, or convert the model again so its folder holds one."
            )
        return cls(model_file, chat_template=_read_chat_template(folder))

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    @has_chat_template.setter
    def has_chat_template(self, value: bool) -> None:
        # mlx-lm's TokenizerWrapper assigns this name on the tokenizer it wraps (its __setattr__
        # forwards unknown names). Our answer always follows ``chat_template``, so the assignment
        # is accepted and has no effect.
        del value

    def get_vocab(self) -> dict[str, int]:
        """Piece → id for the whole vocabulary."""
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def __len__(self) -> int:
        return self.vocab_size

    def encode(
        self, text: str, add_bos: bool = True, *, add_special_tokens: bool | None = None
    ) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids.

        ``add_special_tokens`` is Hugging Face's name for ``add_bos`` (mlx-lm passes it); when
        given it wins. No EOS is ever appended.
        """
        if add_special_tokens is not None:
            add_bos = add_special_tokens
        check_text(text)
        ids = [self.bos_id] if add_bos else []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # re.split puts the captured special strings at the odd positions
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(
        self,
        ids: Iterable[int],
        skip_special: bool = True,
        *,
        skip_special_tokens: bool | None = None,
    ) -> str:
        """Text of ``ids``.

        With ``skip_special`` (Hugging Face: ``skip_special_tokens``) BOS, EOS and UNK are dropped
        and the result equals SentencePiece's decode. Without it they appear as ``<s>``, ``</s>``
        and ``<unk>`` and the text after each loses the dummy-prefix space that ``encode`` gave
        it, so ``decode(encode(t, add_bos=False), skip_special=False) == t``.

        Raises:
            TokenizerError: An id is outside the vocabulary.
        """
        if skip_special_tokens is not None:
            skip_special = skip_special_tokens
        detokenizer = StreamingDetokenizer(self, skip_special=skip_special)
        for token in ids:
            detokenizer.add_token(int(token))
        detokenizer.finalize()
        return detokenizer.text

    def detokenizer(self, skip_special: bool = True) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for this vocabulary."""
        return StreamingDetokenizer(self, skip_special=skip_special)

    def to_mlx_lm(self) -> TokenizerWrapper:
        """This tokenizer wrapped for mlx-lm, streaming through our :class:`StreamingDetokenizer`.

        ``mlx_lm.stream_generate`` also accepts the bare tokenizer, but then wraps it with its
        naive detokenizer, which re-decodes the current line for every token.
        """
        from mlx_lm.tokenizer_utils import TokenizerWrapper  # imports transformers: keep lazy

        return TokenizerWrapper(self, detokenizer_class=StreamingDetokenizer)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tokenize: bool = False,
        **template_vars: Any,
    ) -> str | list[int]:
        """Render ``messages`` (``{"role": "system" | "user" | "assistant", "content": str}``).

        Args:
            messages: The conversation.
            add_generation_prompt: End with the assistant header (``<|assistant|>\\n``).
            tokenize: Return :meth:`encode_chat` ids instead (mlx-lm's wrapper asks for them).
                Unlike Hugging Face's these start with BOS: the Zephyr template renders none,
                and OpenELM-Instruct was fine-tuned on BOS + rendered text.
            template_vars: Extra template variables (Hugging Face and mlx-lm pass some).

        Raises:
            TokenizerError: No chat template, bad messages, or the template fails to render.
        """
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt)
        return self._render(messages, add_generation_prompt, template_vars)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """BOS + the ids of the rendered chat (see :meth:`apply_chat_template`)."""
        return self.encode(self._render(messages, add_generation_prompt, {}), add_bos=True)

    def _render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        template_vars: Mapping[str, Any],
    ) -> str:
        if self.chat_template is None:
            raise TokenizerError(
                f'Tokenizer {self.model_file} has no chat template. Add "chat_template" to the '
                f"model's {TOKENIZER_CONFIG_FILENAME} (OpenELM-Instruct uses Zephyr's) or prompt "
                "with plain text."
            )
        _check_messages(messages)
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            **template_vars,
            "messages": [dict(message) for message in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return _compile_template(self.chat_template).render(**context)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"The chat template failed to render: {exc}") from exc

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.model`` and a ``tokenizer_config.json`` into ``folder``.

        The config is one that both :meth:`from_folder` and transformers' ``AutoTokenizer``
        (hence ``mlx_lm.load``) read: a legacy ``LlamaTokenizer`` that adds BOS and not EOS.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / TOKENIZER_FILENAME
        if not (target.exists() and target.samefile(self.model_file)):
            shutil.copyfile(self.model_file, target)
        config: dict[str, Any] = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MODEL_MAX_LENGTH,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (folder / TOKENIZER_CONFIG_FILENAME).write_text(text, encoding="utf-8")


def check_text(text: str) -> None:
    """Refuse text SentencePiece cannot take: a lone surrogate (``\\udcff`` is how Python holds
    a command-line byte that is not UTF-8) would end in a pybind11 cast error.

    Raises:
        TokenizerError: naming the position and how to fix it.
    """
    if not isinstance(text, str):
        raise TokenizerError(f"text to tokenize must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"the text is not valid UTF-8: character {e.start} ({text[e.start]!r}) is a lone "
            "surrogate, e.g. from bytes that are not UTF-8; give UTF-8 text"
        ) from None


def _read_chat_template(folder: Path) -> str | None:
    """The ``chat_template`` of ``folder/tokenizer_config.json``, if the file has one."""
    config_file = folder / TOKENIZER_CONFIG_FILENAME
    if not config_file.is_file():
        return None
    config = read_json(config_file, TokenizerError, "fix or delete it")
    template = config.get("chat_template")
    if isinstance(template, list):  # Hugging Face's named templates: [{"name", "template"}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(
            f"{config_file}: chat_template must be a string, got {type(template).__name__}."
        )
    return template


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TokenizerError(
            "A chat needs a non-empty list of {'role': ..., 'content': ...} messages; "
            f"got {messages!r:.80}."
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"Chat message {i} is a {type(message).__name__}, not a dict.")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise TokenizerError(
                f"Chat message {i} has role {role!r}; the chat template knows only "
                "'system', 'user' and 'assistant'."
            )
        if not isinstance(message.get("content"), str):
            raise TokenizerError(
                f"Chat message {i} ({role}) needs a string 'content', got "
                f"{type(message.get('content')).__name__}."
            )


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str) -> jinja2.Template:
    """Compile a chat template in the environment Hugging Face renders templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise_template_error
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(
            f"The chat template does not parse (line {exc.lineno}: {exc.message}). Fix "
            f'"chat_template" in {TOKENIZER_CONFIG_FILENAME}.'
        ) from exc
