from pathlib import Path

# The bundled checkpoint ships inside the package tree (installed editable, found beside the code).
REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "tiny-mixtral"
