"""File safety for every command that writes: inputs never written, outputs atomic.

- A `Guard` holds a run's input files (the model, every external data file it names, an inputs
  or data file); no output, data file, report or temp file may resolve to one of them (realpath,
  symlinks, hard links). IN's data file is never replaced, even with --in-place (the new data
  file then gets another name), so IN's model file never points into rewritten data.
- Writes are atomic: a model (and its external data file) is staged in a temporary folder
  beside its destination and renamed into place, data file first, only when the command
  commits; a failure or a signal discards it. Temp files are named
  `.normopt-tmp-<pid>@<host>-*`, so a later run removes what a killed one (SIGKILL) left.
- `Transaction` is the envelope every writing command uses: protect the inputs, check the
  outputs, stage, then commit everything or discard everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from normopt.errors import BadInput
from normopt.rewriter import io


class Guard:
    """The files a run must never write: IN (the model and its external data files), and any
    other input (an --inputs file). `check` refuses an output path that resolves to one of
    them: the same path after symlinks, or the same file by another name (a hard link)."""

    def __init__(self) -> None:
        self._files: dict[str, str] = {}  # realpath -> what it is
        self._inodes: dict[tuple[int, int], str] = {}

    def protect(self, path: str | os.PathLike, what: str) -> None:
        real = os.path.realpath(path)
        self._files.setdefault(real, f"{what} '{path}'")
        with contextlib.suppress(OSError):
            st = os.stat(real)
            self._inodes.setdefault((st.st_dev, st.st_ino), f"{what} '{path}'")

    def clash(self, path: str | os.PathLike) -> str | None:
        """What protected file `path` would write over, or None."""
        real = os.path.realpath(path)
        if real in self._files:
            return self._files[real]
        with contextlib.suppress(OSError):
            st = os.stat(real)
            return self._inodes.get((st.st_dev, st.st_ino))
        return None

    def check(self, path: str | os.PathLike, what: str) -> None:
        clash = self.clash(path)
        if clash is not None:
            raise BadInput(
                f"{what} '{path}' is {clash}: normopt never writes its inputs; choose another path"
            )


TEMP_PREFIX = ".normopt-tmp-"


def _temp_tag() -> str:
    """`<pid>@<host>-`: a temp file names the run that made it, so a later run can tell
    whether that run is gone (killed) and its leftovers may be removed."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    return f"{TEMP_PREFIX}{os.getpid()}@{host}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def temp_folder(beside: Path):
    """A temporary folder beside `beside` (same file system), named after this run so a later
    run removes it if this one is killed; removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix=_temp_tag(), dir=beside.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def scratch_folder():
    """A temporary folder in the system's temp folder (profiler traces, an in-memory model's
    files), named after this run like `temp_folder`; the leftovers of killed runs there are
    removed first."""
    system = Path(tempfile.gettempdir())
    remove_stale_temps(system)
    with temp_folder(system / "scratch") as folder:
        yield folder


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files and folders a killed normopt run on this host left in `folder`
    (SIGKILL leaves them: no handler runs). Returns what was removed."""
    host = _temp_tag().split("@", 1)[1]
    removed = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            name = entry.name
            if not name.startswith(TEMP_PREFIX) or "@" not in name:
                continue
            pid, _, rest = name[len(TEMP_PREFIX) :].partition("@")
            if not pid.isdigit() or not rest.startswith(host) or _alive(int(pid)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def check_writable_folder(path: Path, what: str = "output") -> None:
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise BadInput(f"{what} folder '{parent}' is a file, not a folder")
    if not parent.is_dir():
        raise BadInput(f"{what} folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{what} folder '{parent}' is not writable")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write through a temp file beside `path`, then rename: a reader never sees half a file."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write through a temp file beside `path`, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=_temp_tag(), suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _replace(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _replace(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise BadInput(f"cannot write '{dst}': {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------- saving


@dataclass
class StagedModel:
    """A model written into a temporary folder beside its destination, not yet visible there."""

    path: Path
    destination: Path
    data_name: str | None

    def commit(self) -> None:
        """Move into place: data file first, so the model never points at a missing file."""
        try:
            if self.data_name:
                _replace(
                    self.path.parent / self.data_name, self.destination.parent / self.data_name
                )
            _replace(self.path, self.destination)
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def data_file_name(destination: Path, guard: Guard | None, replaces_input: bool) -> str:
    """`<OUT>.data`. When OUT replaces IN (--in-place) and that is IN's data file,
    `<OUT>.<k>.data`: IN's data file is never replaced while IN's model file may still point
    into it. Otherwise a clash with an input file is refused."""
    name, k = f"{destination.name}.data", 0
    while replaces_input and guard is not None and guard.clash(destination.parent / name):
        k += 1
        name = f"{destination.name}.{k}.data"
    if guard is not None:
        guard.check(destination.parent / name, "output data file")
    return name


def stage(
    model: ir.Model,
    destination: str | os.PathLike,
    *,
    external_data: bool,
    guard: Guard | None = None,
    replaces_input: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> StagedModel:
    """Write `model` next to `destination` without touching it; `commit()` publishes it.

    With `external_data`, every initializer over io.EXTERNAL_THRESHOLD_BYTES goes to one data
    file (`data_file_name`; all tensors are rewritten, so nothing points at the input's data
    file); `guard` refuses a data file that is an input file. Without it the model is embedded,
    which protobuf allows only up to 2 GiB.
    `progress(done, total)` is called after each external tensor is written.
    """
    destination = Path(destination)
    if not external_data and io.initializer_bytes(model) > io.EMBEDDED_LIMIT_BYTES:
        external_data = True
    data_name = data_file_name(destination, guard, replaces_input) if external_data else None
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=_temp_tag(), dir=destination.parent))
    except OSError as exc:
        raise BadInput(f"cannot write into '{destination.parent}': {exc.strerror or exc}") from None
    staged = StagedModel(tmpdir / destination.name, destination, data_name)
    try:
        io.write(model, staged.path, data_name=data_name, progress=progress)
    except OSError as exc:
        staged.discard()
        raise BadInput(f"cannot write '{destination}': {exc.strerror or exc}") from None
    except BaseException:
        staged.discard()
        raise
    return staged


def save(model: ir.Model, destination: str | os.PathLike, *, external_data: bool) -> None:
    """Atomically write `model` to `destination` (see `stage`)."""
    stage(model, destination, external_data=external_data).commit()


def same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b) or (
        a.exists() and b.exists() and os.path.samefile(a, b)
    )


class Transaction:
    """One command's writes. `protect` the inputs first, `output` each path it will write (a
    file in a writable folder, not an input; leftovers of killed runs there are removed),
    `stage` models; `commit` publishes what is staged, and leaving the `with` block without a
    commit (an error, a signal) discards it."""

    def __init__(self) -> None:
        self.guard = Guard()
        self._staged: list[StagedModel] = []

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, *exc_info) -> None:
        for staged in self._staged:
            staged.discard()
        self._staged.clear()

    def protect(self, path: str | os.PathLike, what: str) -> None:
        self.guard.protect(path, what)

    def protect_model(self, path: str | os.PathLike, loaded: ir.Model | None = None) -> None:
        """IN and every external data file it names (from `loaded`, else read from the file)."""
        path = Path(path)
        self.guard.protect(path, "input model")
        data = io.external_data_files(loaded) if loaded is not None else io.model_files(path)
        for data_file in data:
            if Path(data_file) != path:
                self.guard.protect(data_file, "input data file")

    def output(self, path: str | os.PathLike, what: str = "output") -> Path:
        """Refuse `path` as an output unless it is a file path in a writable folder and no
        input; remove temp files killed runs left beside it."""
        path = Path(path)
        if path.is_dir():
            raise BadInput(f"{what} '{path}' is a directory; give a file path")
        check_writable_folder(path, what)
        self.guard.check(path, what)
        remove_stale_temps(path.parent)
        return path

    def stage(self, model: ir.Model, destination: Path, **kwargs) -> StagedModel:
        """`stage(model, destination, guard=this run's guard, ...)`, discarded unless committed."""
        staged = stage(model, destination, guard=self.guard, **kwargs)
        self._staged.append(staged)
        return staged

    def discard(self, staged: StagedModel) -> None:
        staged.discard()
        if staged in self._staged:
            self._staged.remove(staged)

    def commit(self, staged: StagedModel) -> None:
        self._staged.remove(staged)
        staged.commit()

    def write_json(self, path: str | os.PathLike, document: dict, what: str = "report") -> None:
        """Atomically, never over an input."""
        self.guard.check(path, what)
        write_json_atomic(Path(path), document)
