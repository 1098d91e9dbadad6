"""The config layer: Hydra's config groups (``conf/``), typed validation of a composed config (``validation``),
command-line pre-flight before Hydra starts (``preflight``) and config -> components (``build``, ``trained``)."""
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # shipped inside the package (a wheel holds it too)
