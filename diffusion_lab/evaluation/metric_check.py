"""`python -m diffusion_lab.metric_check`: is the offline digits FID a metric? A table of floors and ceilings.

Every row is n images scored against the same reference (the digits test split), so every FID is at the
same sample size: real training images (the noise floor), a bootstrap of them, and image sets that are
wrong in known ways (a Gaussian fitted to the pixels, blurred digits, one digit class only, the mean
image, uniform noise). A useful extractor puts every wrong set far above the floor. Each extractor gets
its own columns (FID and FID / floor, KID with its std over subsets, improved precision and recall); the
digits classifier adds its classifier score. The first row's values are the floors of every column: KID
near 0, precision and recall near those of real images (not 1: a finite sample covers its manifold partly).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import console, files
from ..config.early import CommandParser
from ..data.datasets import digits
from .features import digits_classifier
from .fid import FIDEvaluator

EXTRACTORS = ("digits", "small")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a 5-tap kernel, reflect padding."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5))
    return F.conv2d(x, k.view(1, 1, 5, 1))


def image_sets(train: torch.Tensor, labels: torch.Tensor, n: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """n images per row, all [-1, 1], [n, 1, 8, 8]; the first row is the floor."""
    g = torch.Generator().manual_seed(seed)
    subset = train[torch.randperm(len(train), generator=g)[:n]]
    flat = train.flatten(1).double()
    mean, cov = flat.mean(0), torch.cov(flat.T)
    gauss = torch.distributions.MultivariateNormal(mean, cov + 1e-6 * torch.eye(len(mean), dtype=torch.float64))
    torch.manual_seed(seed)  # MultivariateNormal.sample uses the global RNG (run under fork_rng)
    zeros = train[labels == 0]
    return {
        "real train images (the floor)": subset,
        "bootstrap of train images": train[torch.randint(len(train), (n,), generator=g)],
        "Gaussian fitted to train pixels": gauss.sample((n,)).float().clamp(-1, 1).view(n, *train.shape[1:]),
        "blurred train images (sigma 1 px)": _gaussian_blur(subset, 1.0),
        "one class only (digit 0)": zeros[torch.randint(len(zeros), (n,), generator=g)],
        "mean train image": train.mean(0, keepdim=True).expand(n, -1, -1, -1),
        "uniform noise": torch.rand(n, *train.shape[1:], generator=g) * 2 - 1,
    }


def metric_table(n: int = 500, extractors: Sequence[str] = EXTRACTORS, seed: int = 0) -> List[Dict]:
    """One dict per image set: FID (and FID / floor), KID (and its std) and precision/recall per extractor
    against the digits test split; the digits classifier's IS-like score and label entropy."""
    train, test = digits(split="train"), digits(split="test")
    with torch.random.fork_rng(devices=[]):
        sets = image_sets(train.images, train.labels, n, seed)
    rows = [{"images": name, "n": n} for name in sets]
    for name in extractors:
        extractor = digits_classifier(train.images, train.labels) if name == "digits" else name
        ev = FIDEvaluator(feature_extractor=extractor, device="cpu", progress=False, download=False)
        ev.set_reference("digits", test.images, split="test")
        floor: Optional[float] = None
        for row, images in zip(rows, sets.values()):
            result = ev.score(images)
            floor = result.value if floor is None else floor
            row[f"FID {name}"], row[f"FID/floor {name}"] = result.value, result.value / floor
            row[f"KID {name}"], row[f"KID std {name}"] = result.kid, result.kid_std
            row[f"precision {name}"], row[f"recall {name}"] = result.precision, result.recall
            if result.scores:
                row["IS-like"], row["label entropy"] = result.scores["is_like"], result.scores["label_entropy"]
        rows[0]["reference"] = ev.reference
    return rows


def markdown(rows: List[Dict]) -> str:
    columns = [c for c in rows[0] if c != "reference"]
    fmt: Callable = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + f"\n\nAll against {rows[0]['reference']}, n={rows[0]['n']} images per row."


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = CommandParser("python -m diffusion_lab.metric_check", "is the offline digits FID a metric? A table of "
                           "floors and ceilings (metric_check.md and .csv).",
                           ["--n 1000  (images per row: the n of the FIDs you report)",
                            "--extractors digits,inception  (which feature extractors get columns)",
                            "--out DIR  (where the .md and .csv go)"])
    parser.add_argument("--n", type=int, default=500, help="images per row (use the n of the FIDs you report)")
    parser.add_argument("--out", type=Path, default=Path("outputs/metric_check"), help="where the .md and .csv go")
    parser.add_argument("--extractors", default=",".join(EXTRACTORS), help=f"comma-separated, of {', '.join(EXTRACTORS)}")
    args = parser.parse_args(argv)
    chosen = [e for e in args.extractors.split(",") if e]
    unknown = [e for e in chosen if e not in EXTRACTORS]
    if unknown or not chosen or not 2 <= args.n <= 1438:
        problem = f"unknown extractor '{unknown[0]}'; known: {', '.join(EXTRACTORS)}" if unknown else \
            "no extractor given" if not chosen else f"--n={args.n} must be in [2, 1438] (the digits train split)"
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    console.log_to(args.out, "metric_check")  # metric_check.log: every line printed here
    rows = metric_table(args.n, chosen)
    text = markdown(rows)
    files.write_text(args.out / "metric_check.md", text + "\n")
    files.write_csv(args.out / "metric_check.csv", rows, [c for c in rows[0] if c != "reference"])
    console.say(text)
    console.info(f"wrote {args.out / 'metric_check.md'} and {args.out / 'metric_check.csv'}")


if __name__ == "__main__":
    main()
