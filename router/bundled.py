from pathlib import Path

# The bundled checkpoint ships in the repository beside the code (the editable install finds it).
REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "models" / "tiny-mixtral"
