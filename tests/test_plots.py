"""Picture helpers: the moving average has no lag and keeps the length; figures are written."""
import numpy as np
import pytest
import torch

from diffusion_lab.diffusion.schedules import cosine, linear
from diffusion_lab.evaluation.plots import forward_diffusion, plot_loss, smooth


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_smooth_keeps_length_and_has_no_lag(n):
    line = list(np.arange(n, dtype=float))
    out = smooth(line, fraction=0.2)
    assert len(out) == n
    interior = slice(n // 5, n - n // 5) if n > 10 else slice(0, n)
    assert np.allclose(np.array(out)[interior], np.array(line)[interior], atol=1e-9 if n > 10 else 0.5)


def test_forward_diffusion_and_loss_pictures(tmp_path):
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    path = forward_diffusion(x0, {"linear": linear(100), "cosine": cosine(100)}, [0, 50, 99], tmp_path / "f.png")
    assert path.stat().st_size > 1000
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    assert plot_loss(tmp_path / "m.jsonl", tmp_path / "loss.png").stat().st_size > 1000


def _cost_rows(scales):
    return [{"sampler": "ddim", "nfe": nfe, "guidance_scale": w, "fid": 10.0 / nfe + (w or 0), "seconds_per_image": nfe / 1e3}
            for nfe in (10, 20) for w in scales]


def test_fid_vs_cost_draws_one_labelled_line_per_guidance_scale():
    from diffusion_lab.evaluation.plots import fid_vs_cost_figure

    fig = fid_vs_cost_figure(_cost_rows([0.0, 1.0, 2.0, 4.0]), "FID[...]", floor=(3.0, 500))
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if line.get_linestyle() != "--"]  # the floor is dashed
        assert [line.get_label() for line in lines] == ["ddim, w=0", "ddim, w=1", "ddim, w=2", "ddim, w=4"]
        assert all(len(set(line.get_xdata())) == 2 for line in lines)  # each runs along NFE, never vertical
        assert ax.get_title().startswith("FID against")
    unguided = fid_vs_cost_figure(_cost_rows([None]), "FID[...]")
    assert [line.get_label() for line in unguided.axes[0].get_lines()] == ["ddim"]


def test_guidance_picture_has_a_precision_and_recall_panel(tmp_path):
    from diffusion_lab.evaluation.plots import guidance_figure, plot_guidance

    rows = [{"sampler": "edm", "nfe": 25, "guidance_scale": w, "fid": 5 + w, "accuracy": 0.5 + w / 10,
             "precision": 0.6 + w / 10, "recall": 0.8 - w / 10} for w in (2.0, 0.0, 1.0, 4.0)]
    fig = guidance_figure(rows, "FID[...]", floor=(3.0, 500), floors={"precision": 0.9, "recall": 0.85})
    assert len(fig.axes) == 3 and fig.axes[2].get_ylim() == (-0.03, 1.03)
    lines = {line.get_label(): line for line in fig.axes[2].get_lines()}
    assert list(lines) == ["precision, edm, NFE 25", "recall, edm, NFE 25", "precision of real train images",
                           "recall of real train images"]
    assert list(lines["precision, edm, NFE 25"].get_xdata()) == [0.0, 1.0, 2.0, 4.0]  # in order of w
    assert list(lines["recall, edm, NFE 25"].get_ydata()) == pytest.approx([0.8, 0.7, 0.6, 0.4])
    assert lines["recall, edm, NFE 25"].get_color() == lines["precision, edm, NFE 25"].get_color()
    assert list(lines["precision of real train images"].get_ydata()) == [0.9, 0.9]
    without = [{**r, "precision": None, "recall": None} for r in rows]  # no reference features: an empty panel
    assert guidance_figure(without, "FID[...]").axes[2].get_lines() == []
    assert plot_guidance(rows, tmp_path / "guidance.png", "FID[...]").is_file()


def test_fid_history_is_one_curve_per_sample_size(tmp_path):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from diffusion_lab.evaluation.plots import curves_per_size, fid_title, plot_curves
    from diffusion_lab.evaluation.tracker import FIDTracker

    data = SimpleNamespace(channels=1, image_size=8)
    tracker = FIDTracker(OmegaConf.create({"every": 0, "num_samples": 1000}), lambda split: data, "cpu")
    tracker.load_state_dict({"history": [(100, 30.0)], "best": 30.0, "label": "x"})  # a checkpoint without sizes
    tracker.load_state_dict({**tracker.state_dict(), "history": [(100, 30.0), (200, 25.0)], "sizes": [None, 200]})
    tracker.record(300, SimpleNamespace(value=12.0))  # resumed with eval.num_samples=1000
    assert tracker.sizes == [None, 200, 1000] and tracker.summary()["fid_history_n"] == [None, 200, 1000]
    curves = curves_per_size(tracker.history, tracker.sizes, "run")
    assert curves == {"run, n not recorded": [{"step": 100, "fid": 30.0}], "run, n=200": [{"step": 200, "fid": 25.0}],
                      "run, n=1000": [{"step": 300, "fid": 12.0}]}
    assert "one curve per number of generated samples" in fid_title("FID[clean, digits, 1000 samples vs test]",
                                                                     tracker.sizes)
    assert fid_title("FID[clean, digits, 1000 samples vs test]", [1000, 1000]).startswith("FID[clean")
    assert plot_curves(curves, "fid", tmp_path / "fid.png", "t").stat().st_size > 1000


def test_sample_grid_carries_its_caption_and_class_labels(tmp_path):
    from PIL import Image

    from diffusion_lab.data.images import row_labels, save_grid

    images = torch.rand(20, 1, 8, 8) * 2 - 1
    assert row_labels(20, 2) == [f"class {k}" for k in range(10)] and row_labels(20, None) is None
    plain = np.asarray(Image.open(save_grid(images, tmp_path / "plain.png", nrow=2)).convert("L"))
    captioned = np.asarray(Image.open(save_grid(images, tmp_path / "cap.png", nrow=2, caption="step 500",
                                                labels=row_labels(20, 2))).convert("L"))
    top, left = captioned.shape[0] - plain.shape[0], captioned.shape[1] - plain.shape[1]
    assert top > 0 and left > 0, "a strip above for the caption, a margin left for the class labels"
    assert (captioned[:top] < 128).any() and (captioned[top:, :left] < 128).any(), "text is drawn in both"
    assert np.array_equal(captioned[top:, left:], plain), "the images themselves are unchanged"
