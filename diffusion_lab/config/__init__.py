"""The config layer: Hydra's config groups (``conf/``), typed validation of a composed config (``validation``),
command-line pre-flight before Hydra starts (``preflight``) and config -> components (``build``, ``trained``)."""
from pathlib import Path

from typing import List

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # shipped inside the package (a wheel holds it too)


def options(group: str) -> List[str]:
    """The options of a config group: the names of conf/<group>/*.yaml."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
