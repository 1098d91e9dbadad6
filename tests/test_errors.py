"""Every bad input to the real commands ends with one line `error: ...`, exit code 2, no traceback, and
leaves every existing file as it was. The commands run in this process (Hydra included) to stay cheap."""
import re

import pytest
import torch

from diffusion_lab.train import train
from diffusion_lab.training import checkpoint
from tests.helpers import TINY, compose_config, run_main, write_malicious_checkpoint, write_tiny_cifar

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [o for o in TINY if not o.startswith(("train.steps", "eval."))] + ["eval.every=0", "logger=none",
                                                                          "train.steps=2"]




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints good and bad, image folders good and bad, and a finished run dir."""
    root = tmp_path_factory.mktemp("inputs")
    run = root / "run"
    train(compose_config(FAST), run)
    good = run / "checkpoints" / "last.pt"
    state = checkpoint.load(good)
    f = {"root": root, "run": run, "good": good, "missing": root / "nope.pt", "empty": root / "empty.pt",
         "text": root / "text.pt", "truncated": root / "truncated.pt", "foreign": root / "foreign.pt",
         "nan": root / "nan.pt", "evil": write_malicious_checkpoint(root / "evil.pt", root / "MARKER"),
         "file": root / "a_file", "no_images": root / "no_images", "not_image": root / "not_image",
         "no_cifar": root / "no_cifar", "cifar": root / "cifar"}
    f["empty"].write_bytes(b"")
    f["text"].write_text("hello")
    f["truncated"].write_bytes(good.read_bytes()[:4000])
    f["file"].write_text("x")
    torch.save({"weights": torch.zeros(3)}, f["foreign"])
    next(iter(state["model"].values())).fill_(float("nan"))
    checkpoint.save(f["nan"], state)
    f["no_images"].mkdir()
    (f["no_images"] / "readme.txt").write_text("no images here")
    f["not_image"].mkdir()
    for i in range(20):
        (f["not_image"] / f"{i}.png").write_bytes(b"this is not a png")
    f["no_cifar"].mkdir()
    write_tiny_cifar(f["cifar"], per_batch=2)
    return f


TRAIN = "diffusion_lab.train"
SAMPLE = "diffusion_lab.sample"
EVALUATE = "diffusion_lab.evaluate"
LAB = "diffusion_lab.sampler_lab"
CASES = [  # (command, arguments with {name} filled from `files`, a piece of the expected line)
    (TRAIN, ["schedule=cosin"], "unknown schedule 'cosin'"),
    (TRAIN, ["model=unet9"], "unknown model 'unet9'"),
    (TRAIN, ["objective=eps2"], "unknown objective 'eps2'"),
    (TRAIN, ["sampler=nope"], "unknown sampler 'nope'"),
    (TRAIN, ["model.dropot=0.1"], "dropot"),
    (TRAIN, ["train.steps=abc"], "train.steps"),
    (TRAIN, ["train.steps=[1"], "cannot parse 'train.steps=[1'"),
    (TRAIN, ["train.lr=-1"], "train.lr=-1 must be > 0"),
    (TRAIN, ["train.batch_size=0"], "train.batch_size=0 must be > 0"),
    (TRAIN, ["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
    (TRAIN, ["data.image_size=7"], "image_size"),
    (TRAIN, ["train.betas=[0.9]"], "train.betas"),
    (TRAIN, ["train.max_bad_steps=0"], "train.max_bad_steps=0 must be > 0"),
    (TRAIN, ["train.lr_schedule=step"], "train.lr_schedule='step' must be one of constant, cosine, linear"),
    (TRAIN, ["train.grad_accum_steps=0"], "train.grad_accum_steps=0 must be > 0"),
    (TRAIN, ["train.grad_accum_steps=3"], "train.batch_size=16 must be a multiple of train.grad_accum_steps=3"),
    (TRAIN, ["sampler.steps=5000"], "sampler.steps=5000 must be <= schedule.noise_steps=1000"),
    (TRAIN, ["schedule.noise_steps=1"], "schedule.noise_steps=1 must be >= 2"),
    (TRAIN, ["device=gpu0"], "device='gpu0' must be"),
    (TRAIN, ["device=cuda:7"], "device='cuda:7' is not available"),
    (TRAIN, ["train.batch_size=5000"], "fewer than batch_size=5000"),
    (TRAIN, ["data=folder"], "data.root is required"),
    (TRAIN, ["data=folder", "data.root={missing}"], "image folder not found"),
    (TRAIN, ["data=folder", "data.root={no_images}"], "no images"),
    (TRAIN, ["data=folder", "data.root={not_image}", "data.image_size=8", "train.batch_size=4"], "cannot read image"),
    (TRAIN, ["data=cifar10", "data.download=false", "data.root={no_cifar}"], "CIFAR-10 not found"),
    (TRAIN, ["data=cifar10", "data.download=false", "data.root={cifar}", "data.verify_checksums=false", "data.image_size=8",
             "train.batch_size=64"], "fewer than batch_size=64"),
    (TRAIN, ["train.resume={missing}"], "must be auto, an existing checkpoint file or a run dir"),
    (TRAIN, ["train.resume={empty}"], "cannot read checkpoint"),
    (TRAIN, ["train.resume={text}"], "cannot read checkpoint"),
    (TRAIN, ["train.resume={truncated}"], "cannot read checkpoint"),
    (TRAIN, ["train.resume={foreign}"], "is not a diffusion_lab checkpoint"),
    (TRAIN, ["train.resume={evil}"], "refusing to load"),
    (TRAIN, ["train.resume={nan}"], "non-finite"),
    (TRAIN, ["train.resume={good}", "model.hidden_dims=[16,16]"], "model.hidden_dims: [16, 32] -> [16, 16]"),
    (TRAIN, ["train.resume={good}", "schedule=linear"], "schedule.name: cosine -> linear"),
    (TRAIN, ["train.resume={good}", "logger=wandb"], "already reached step 2 of train.steps=2"),
    (TRAIN, ["hydra.run.dir={file}/run"], "is a file"),
    (TRAIN, ["hydra.run.dir={run}"], "already holds a run"),
    (SAMPLE, [], "checkpoint is required"),
    (SAMPLE, ["checkpoint={missing}"], "no checkpoint at"),
    (SAMPLE, ["checkpoint={evil}"], "refusing to load"),
    (SAMPLE, ["checkpoint={truncated}"], "cannot read checkpoint"),
    (SAMPLE, ["checkpoint={good}", "num_samples=0"], "num_samples=0 must be > 0"),
    (SAMPLE, ["checkpoint={good}", "sampler=nope"], "unknown sampler 'nope'"),
    (SAMPLE, ["checkpoint={good}", "sampler.steps=5000"], "sampler.steps=5000"),
    (SAMPLE, ["checkpoint={good}", "device=cuda:7"], "not available"),
    (EVALUATE, ["checkpoint={foreign}"], "is not a diffusion_lab checkpoint"),
    (EVALUATE, ["checkpoint={evil}"], "refusing to load"),
    (EVALUATE, ["checkpoint={good}", "num_samples=-1"], "num_samples=-1 must be > 0"),
    (EVALUATE, ["checkpoint={good}", "samplers=[{name:nope}]", "eval.feature_extractor=small"], "unknown sampler"),
    (EVALUATE, ["checkpoint={good}", "samplers=[{name:ddim,steps:5000}]", "eval.feature_extractor=small"],
     "steps=5000"),
    (EVALUATE, ["checkpoint={good}", "samplers=[ddim]"], "samplers[0]='ddim' must be a sampler setting like"),
    (EVALUATE, ["checkpoint={good}", "samplers=[{name:ddim,steps:0}]"], "samplers[0].steps=0 must be > 0"),
    (EVALUATE, ["checkpoint={good}", "samplers=[{name:ddim,eta:2}]"], "samplers[0].eta=2 must be in [0, 1]"),
    (EVALUATE, ["checkpoint={good}", "samplers=[{name:dim}]"], "samplers[0].name='dim': unknown sampler"),
    (EVALUATE, ["checkpoint={good}", "guidance_scales=[1,-2]"], "guidance_scales[1]=-2 must be >= 0"),
    (EVALUATE, ["checkpoint={good}", "guidance_scales=2"], "guidance_scales=2 must be a non-empty list"),
    (SAMPLE, ["checkpoint={good}", "labels=[0,-1]"], "labels[1]=-1 must be >= 0"),
    (SAMPLE, ["checkpoint={good}", "sampler.stpes=5"], "unknown key sampler.stpes; did you mean sampler.steps?"),
    (TRAIN, ["train.stpes=5"], "unknown key train.stpes; did you mean train.steps?"),
    (TRAIN, ["trian.steps=5"], "unknown key trian.steps; did you mean train.steps?"),
    (TRAIN, ["logger=wandb", "logger.mode=offlin"], "logger.mode='offlin' must be one of auto, online, offline"),
    (TRAIN, ["model.hidden_dims=[16,0]"], "model.hidden_dims[1]=0 must be > 0"),
    (TRAIN, ["train.betas=[0.9,x]"], "train.betas[1]='x' must be float"),
    (LAB, ["also=[ddim,eulr]"], "also[1]='eulr': unknown sampler"),
    (LAB, ["nfe=[5,0]"], "nfe[1]=0 must be > 0"),
]


def _snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("command,args,needle", CASES,
                         ids=[f"{c.split('.')[-1]}:{' '.join(a) or 'no-args'}" for c, a, _ in CASES])
def test_bad_input_is_one_line_exit_2(files, tmp_path, capsys, monkeypatch, command, args, needle):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    before = _snapshot(files["root"])
    extra = FAST if command == TRAIN else []
    args = [re.sub(r"\{(\w+)\}", lambda m: str(files.get(m.group(1), m.group(0))), a) for a in args]
    code, _, err = run_main(command, [*extra, *args], tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert needle in lines[0], lines[0]
    assert _snapshot(files["root"]) == before, "an existing file was changed"
    assert not (files["root"] / "MARKER").exists()


def test_the_table_covers_at_least_30_cases():
    assert len(CASES) >= 30 and len({(c, tuple(a)) for c, a, _ in CASES}) == len(CASES)


REFUSED_AFTER_HYDRA_STARTS = [  # refusals found once the command runs: Hydra has made the run dir by then
    (TRAIN, ["train.batch_size=5000"]),
    (TRAIN, ["device=cuda:7"]),
    (TRAIN, ["data=cifar10", "data.download=false", "data.root={no_cifar}"]),
    (TRAIN, ["train.resume={good}", "schedule=linear"]),
    (SAMPLE, ["checkpoint={missing}"]),
    (SAMPLE, ["checkpoint={good}", "sampler.steps=5000"]),
    (EVALUATE, ["checkpoint={missing}"]),
    (EVALUATE, ["checkpoint={good}", "samplers=[{name:ddim,steps:5000}]", "eval.feature_extractor=small"]),
]


def _filled(args, files):
    return [re.sub(r"\{(\w+)\}", lambda m: str(files.get(m.group(1), m.group(0))), a) for a in args]


@pytest.mark.parametrize("command,args", REFUSED_AFTER_HYDRA_STARTS,
                         ids=[f"{c.split('.')[-1]}:{' '.join(a)}" for c, a in REFUSED_AFTER_HYDRA_STARTS])
def test_a_refused_command_leaves_no_run_dir(files, tmp_path, capsys, command, args):
    extra = FAST if command == TRAIN else []
    code, _, err = run_main(command, [*extra, *_filled(args, files)], tmp_path, capsys)
    assert code == 2 and err.startswith("error: "), err[-3000:]
    assert list(tmp_path.iterdir()) == [], f"left behind: {sorted(map(str, tmp_path.rglob('*')))}"


def test_a_refusal_keeps_a_run_dir_that_existed_before(files, tmp_path, capsys):
    given = tmp_path / "given"
    given.mkdir()
    code, _, err = run_main(SAMPLE, [f"checkpoint={files['missing']}", f"hydra.run.dir={given}"], tmp_path, capsys)
    assert code == 2 and "no checkpoint at" in err, err
    assert given.is_dir(), "a dir that existed before the command stays"


def test_only_a_dir_made_here_holding_only_hydra_files_and_logs_is_removed(tmp_path):
    from diffusion_lab.config import refused

    refused.plan(tmp_path / "outputs" / "day" / "run-0")  # nothing below tmp_path exists yet
    run_dir = tmp_path / "outputs" / "day" / "run-1"  # the dir Hydra made (another uid)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("a: 1")
    (run_dir / "sample.log").write_text("error: no checkpoint\n")
    (run_dir / "keep.txt").write_text("a file of the user's")
    assert not refused.remove_unused(run_dir) and (run_dir / "keep.txt").is_file()
    (run_dir / "keep.txt").unlink()
    assert refused.remove_unused(run_dir)
    assert list(tmp_path.iterdir()) == [], "the empty parents it made went too"
    refused.plan(None)
