"""Shared test settings: W&B never goes online from a test, and every test runs on the CPU."""
import os

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
