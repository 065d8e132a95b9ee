"""The training corpus: this interpreter's standard-library Python, tests excluded, a fixed few held out."""

import sysconfig
from pathlib import Path

# Held out for validation (bits per byte, the routing report). Present in every CPython since 3.9.
HELD_OUT = ("bisect.py", "csv.py", "fractions.py", "graphlib.py", "heapq.py", "json/decoder.py", "queue.py",
            "shlex.py", "string.py", "textwrap.py")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_source(rel: Path) -> bool:
    return (rel.suffix == ".py" and not _SKIP_DIRS.intersection(rel.parts[:-1])
            and not rel.name.startswith("test_"))


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths (posix, sorted) of the standard library's Python files outside test directories."""
    root = root or stdlib_root()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if _is_source(p.relative_to(root)))


def read_texts(paths: list[str], root: Path | None = None) -> dict[str, str]:
    """path -> UTF-8 text; the few files that are not valid UTF-8 are left out."""
    root = root or stdlib_root()
    texts = {}
    for rel in paths:
        try:
            texts[rel] = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def split(paths: list[str], held_out: tuple[str, ...] = HELD_OUT) -> tuple[list[str], list[str]]:
    """(train, validation) file lists; every held-out file must exist."""
    missing = sorted(set(held_out) - set(paths))
    if missing:
        raise FileNotFoundError(f"held-out files {missing} are not in the standard library at {stdlib_root()}")
    return [p for p in paths if p not in held_out], [p for p in paths if p in held_out]
