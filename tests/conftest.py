"""Shared test settings: W&B never goes online from a test, every test runs on the CPU, and the cache of
reference statistics, floors and trained extractors is a fresh temporary dir (never ~/.cache)."""
import os
import tempfile

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["DIFFUSION_LAB_CACHE"] = tempfile.mkdtemp(prefix="diffusion_lab_cache_")
