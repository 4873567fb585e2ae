"""Output folders are never lost: no replace of what appeared meanwhile, --force only over our
own folders, stale temporaries of killed runs cleaned, a full disk is one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from convert_fixtures import write_hf_safetensors
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.errors import DiskFullError, OpenELMWarning, OutputExistsError
from mlx_openelm.folder import atomic_output
from mlx_openelm.outputs import rename_noreplace

from tiny import random_weights, tiny_config

runner = CliRunner()


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "openelm"}))
    (path / "model.safetensors").write_bytes(b"old")
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while it was being written"):
        with atomic_output(out) as tmp:
            (tmp / "new.txt").write_text("new")
            out.mkdir()  # another process (or the user) creates OUT, empty: rename would take it
    assert out.is_dir() and not any(out.iterdir())
    assert _leftovers(tmp_path) == []


def test_force_replaces_only_the_folder_seen_at_the_start(tmp_path):
    out = _model_folder(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="appeared while"):
        with atomic_output(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            shutil.rmtree(out)
            time.sleep(0.02)  # past the clock tick of the ctime that tells the folders apart
            _model_folder(out)
            (out / "theirs.txt").write_text("keep me")
    assert (out / "theirs.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == []
    with atomic_output(out, force=True) as tmp:  # unchanged since the start: replaced
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_rename_noreplace_refuses_an_empty_folder_and_a_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for dst in (tmp_path / "empty", tmp_path / "file"):
        dst.mkdir() if dst.name == "empty" else dst.write_text("x")
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
    assert src.is_dir() and (tmp_path / "file").read_text() == "x"
    rename_noreplace(src, tmp_path / "free")
    assert (tmp_path / "free").is_dir() and not src.exists()


@pytest.mark.parametrize("kind", ["project", "file", "cwd", "parent", "home"])
def test_force_refuses_folders_that_are_not_ours(tmp_path, monkeypatch, kind):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("mine")
    target, why = {
        "project": (project, "not a model or adapter folder (it holds README.md, src)"),
        "file": (project / "README.md", "it is not a folder"),
        "cwd": (Path("."), "the current folder"),
        "parent": (Path(".."), "one of its parents"),
        "home": (project, "your home folder"),
    }[kind]
    monkeypatch.chdir(project / "src" if kind in ("cwd", "parent") else tmp_path)
    if kind == "home":
        monkeypatch.setenv("HOME", str(project))
    with pytest.raises(OutputExistsError, match="--force will not replace") as info:
        with atomic_output(target, force=True):
            pytest.fail("the folder was opened for writing")
    assert why in str(info.value)
    assert (project / "README.md").read_text() == "mine" and (project / "src").is_dir()


def test_force_replaces_a_model_folder_and_an_empty_one(tmp_path):
    for out in (_model_folder(tmp_path / "model"), tmp_path / "empty"):
        out.mkdir(exist_ok=True)
        with atomic_output(out, force=True) as tmp:
            (tmp / "x").write_text("new")
        assert [p.name for p in out.iterdir()] == ["x"]


def test_stale_temporaries_are_removed_and_reported_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    gone = tmp_path / ".out.tmp-999999999-abc"  # above any pid_max: no such process
    live = tmp_path / f".out.tmp-{os.getpid()}-def"
    other = tmp_path / ".other.tmp-999999999-abc"
    for folder in (gone, live, other):
        folder.mkdir()
    with pytest.warns(OpenELMWarning, match=r"removed .*\.out\.tmp-999999999-abc.*interrupted"):
        with atomic_output(out) as tmp:
            (tmp / "x").write_text("x")
    assert not gone.exists() and live.is_dir() and other.is_dir()


def test_the_file_writer_removes_its_stale_temporaries(tmp_path):
    from mlx_openelm.folder import atomic_write_text

    gone = tmp_path / ".notes.tmp-999999999-ab12.txt"
    live = tmp_path / f".notes.tmp-{os.getpid()}-cd34.txt"
    gone.write_text("partial")
    live.write_text("being written")
    with pytest.warns(OpenELMWarning, match=r"\.notes\.tmp-999999999-ab12\.txt"):
        atomic_write_text(tmp_path / "notes.txt", "done")
    assert (tmp_path / "notes.txt").read_text() == "done"
    assert not gone.exists() and live.read_text() == "being written"


def test_cli_reports_stale_temporaries_and_a_full_disk(tmp_path, tiny_spm, monkeypatch):
    cfg = tiny_config(vocab_size=400)
    src = write_hf_safetensors(tmp_path / "src", cfg, random_weights(cfg, seed=3))
    out = tmp_path / "out"
    (tmp_path / ".out.tmp-999999999-abc").mkdir()
    args = ["convert", str(src), str(out), "--tokenizer", str(tiny_spm)]

    import mlx_openelm.folder as folder

    real = folder.write_safetensors

    def full_disk(tmp, *a, **k):
        real(tmp, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "config.json"))

    monkeypatch.setattr(folder, "write_safetensors", full_disk)
    result = runner.invoke(app, args)
    lines = result.output.splitlines()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert lines[0].startswith("Warning: removed") and ".out.tmp-999999999-abc" in lines[0]
    text = " ".join(lines[1:])
    assert text.startswith("Error: no space left on the disk while writing") and "free" in text
    assert "needed" in text  # the converter knows the size it writes
    assert str(out) in text and len(lines) == 2
    assert not out.exists() and _leftovers(tmp_path) == []


def test_disk_full_error_names_path_and_need(tmp_path):
    from mlx_openelm.outputs import disk_full_error

    e = disk_full_error(OSError(errno.ENOSPC, "full", str(tmp_path / "a")), tmp_path, 3 * 10**9)
    assert isinstance(e, DiskFullError)
    assert str(tmp_path) in str(e) and "about 3.0 GB needed" in str(e)
