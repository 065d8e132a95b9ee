from pathlib import Path

# The bundled checkpoint ships in the repository beside the code (the editable install finds it).
REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "models" / "tiny-mixtral"


def resolve_model(path: str | Path) -> Path:
    """A checkpoint path as given; a relative one that is not there is looked up in the repository,
    so the default `models/tiny-mixtral` works from any directory and inside a container."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO / p
