"""The read-eval-print loop behind ``mlx-openelm chat``, over a :class:`~.chat.ChatSession`.

All input and output go through a small ``ChatIO`` object, so the loop runs (and is tested)
without a terminal. Slash commands (``/help`` lists them) act on the session; any other line is a
message whose reply is streamed to ``ChatIO.write``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .errors import DataError, GenerationError, OpenELMError

if TYPE_CHECKING:
    from .chat import ChatSession

__all__ = ["HELP", "PROMPT", "ChatIO", "run_repl", "stats_lines"]

HELP = """\
/help          this list
/reset         forget the conversation (keeps the system prompt)
/system TEXT   set the system prompt (/system alone shows it)
/save FILE     write the transcript as JSONL, one {"role", "content"} per line
/load FILE     continue a transcript written by /save
/stats         tokens prefilled and generated per turn, speed, memory
/quit          leave (also Ctrl-D); Ctrl-C stops a reply"""


class ChatIO(Protocol):
    """The REPL's terminal: ``read`` returns a line without its newline (None at end of input,
    Ctrl-D), ``write`` streams reply text, ``info`` shows a dim status line, ``error`` one line."""

    def read(self, prompt: str) -> str | None: ...
    def write(self, text: str) -> None: ...
    def info(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...


PROMPT = ">>> "


def run_repl(session: ChatSession, io: ChatIO) -> int:
    """Read messages and commands until ``/quit``, end of input or Ctrl-C at the prompt.

    A Ctrl-C during a reply stops that reply and the session goes on. An error in one command
    or turn is reported on one line and the session goes on.

    Returns:
        The number of commands or turns that failed (for the exit status of scripted runs).
    """
    failures = 0
    while True:
        try:
            line = io.read(PROMPT)
        except KeyboardInterrupt:
            io.write("\n")
            return failures
        if line is None:
            return failures
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _run_command(session, line, io):
                    return failures
            else:
                _reply(session, line, io)
        except OpenELMError as e:
            io.error(str(e))
            failures += 1


def _reply(session: ChatSession, text: str, io: ChatIO) -> None:
    turn = session.send(text)
    if turn.dropped_turns:
        io.info(
            f"(context full: dropped the {turn.dropped_turns} oldest turn(s) to stay within "
            f"{session.context_length} tokens; cache rebuilt)"
        )
    responses = iter(turn)
    try:
        for r in responses:
            io.write(r.text)
        io.write("\n")
    except KeyboardInterrupt:
        io.write("\n")
        io.info("(reply stopped)")
    finally:
        responses.close()


def _run_command(session: ChatSession, line: str, io: ChatIO) -> bool:
    """Run one slash command; False means leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/help":
        io.info(HELP)
    elif name == "/reset":
        session.reset()
        io.info("(conversation cleared)")
    elif name == "/system":
        if arg:
            session.set_system(arg)
            io.info("(system prompt set)")
        else:
            io.info(f"(system prompt: {session.system!r})")
    elif name in ("/save", "/load") and not arg:
        raise DataError(f"{name} needs a file name, e.g. {name} chat.jsonl")
    elif name == "/save":
        session.save(arg)
        io.info(f"(saved {len(session.messages)} messages to {arg})")
    elif name == "/load":
        session.load(arg)
        io.info(f"(loaded {len(session.messages)} messages from {arg})")
    elif name == "/stats":
        io.info("\n".join(stats_lines(session)))
    else:
        raise GenerationError(f"unknown command {name}; /help lists the commands")
    return True


def stats_lines(session: ChatSession) -> list[str]:
    """A small table of every turn: prompt, prefilled and generated tokens, speed, memory, and
    prompt-lookup candidates accepted/proposed when lookup is on."""
    lookup = any(t.lookup_proposed for t in session.turns)
    rows = [
        f"{'turn':>4} {'prompt':>7} {'prefilled':>9} {'generated':>9} "
        f"{'prefill tok/s':>13} {'gen tok/s':>9} {'peak GB':>7}  finish"
        + ("   lookup accepted/proposed" if lookup else "")
    ]
    for i, t in enumerate(session.turns, 1):
        rows.append(
            f"{i:>4} {t.prompt_tokens:>7} {t.prefilled_tokens:>9} {t.generated_tokens:>9} "
            f"{t.prompt_tps:>13.1f} {t.generation_tps:>9.1f} {t.peak_memory:>7.3f}  "
            + (
                f"{t.finish_reason:<11} {t.draft_tokens}/{t.lookup_proposed}"
                if lookup
                else t.finish_reason
            )
        )
    rows.append(
        f"cache: {session.cached_tokens} of {session.context_length} context tokens; "
        f"{len(session.messages)} messages"
    )
    return rows
