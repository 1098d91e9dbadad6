"""Every config option composes and builds through the registries; bad values stop with one line."""
import pytest
from omegaconf import OmegaConf

from diffusion_lab.config import CONF_DIR
from diffusion_lab.config.build import build_dataset, build_model, build_objective, build_sampler, build_schedule
from diffusion_lab.config.validation import validate
from diffusion_lab.errors import ConfigError
from tests.helpers import compose_config

GROUPS = ["model", "schedule", "objective", "sampler", "logger", "eval", "train"]


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option):
    # a flow target needs a continuous process and the flow path needs a target other than eps: pair them
    pair = {("schedule", "flow"): ["objective=flow"], ("objective", "flow"): ["schedule=flow"],
            ("sampler", "consistency"): ["objective=consistency"]}.get((group, option), [])
    cfg = compose_config([f"{group}={option}", *pair])
    validate(cfg)
    if group not in ("train", "eval"):
        assert cfg[group].name == option
    schedule = build_schedule(cfg)
    if schedule.discrete:
        assert schedule.num_timesteps == cfg.schedule.noise_steps
    else:
        assert schedule.name == cfg.schedule.name and 0 <= schedule.t_min < schedule.t_max
    build_objective(cfg)
    build_sampler(cfg)
    if group == "model":
        model = build_model(cfg, image_size=32 if option == "cifar" else 8, channels=1)
        assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("option", options("data"))
def test_every_data_option_composes(option):
    overrides = [f"data={option}"] + (["data.root=/nonexistent"] if option == "folder" else [])
    cfg = compose_config(overrides)
    validate(cfg)
    assert cfg.data.name == option
    if option == "digits":
        assert len(build_dataset(cfg)) == 1438  # the training split; 359 held out


def teacher_override(experiment, tmp_path):
    """A recipe that distils or tunes a teacher needs train.teacher: an existing file is enough to validate."""
    if "teacher: ???" not in (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text():
        return []
    (tmp_path / "last.pt").write_bytes(b"")
    return [f"train.teacher={tmp_path / 'last.pt'}"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", *teacher_override(experiment, tmp_path)])
    validate(cfg)
    if experiment == "ddpm_cifar10":
        assert (cfg.model.name, cfg.schedule.name, cfg.data.name) == ("cifar", "linear", "cifar10")
        assert (cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps) == (128, 2e-4, 5000)
        assert (cfg.train.ema_decay, cfg.model.dropout, cfg.train.steps) == (0.9999, 0.1, 800000)
    if experiment.startswith("edm_"):  # Karras et al. 2022: lognormal(-1.2, 1.2) levels, EDM weight, Heun
        assert (cfg.schedule.name, cfg.objective.name, cfg.sampler.name) == ("edm", "edm", "edm")
        assert (cfg.objective.P_mean, cfg.objective.P_std, cfg.objective.weighting) == (-1.2, 1.2, "edm")
    if experiment.startswith("rectified_flow_"):  # Liu et al. 2023: uniform t, plain velocity MSE, Euler in t
        assert (cfg.schedule.name, cfg.objective.name, cfg.sampler.name, cfg.sampler.grid) == (
            "flow", "flow", "euler", "linspace")
        assert (cfg.objective.density, cfg.objective.weighting) == ("uniform", "uniform")
    if cfg.objective.name == "consistency":  # a budget of its own, stated in the recipe
        default = compose_config([])
        assert cfg.data.name == "digits" or experiment.endswith("_cifar10")
        if experiment == "consistency_digits":  # distils the default run: its process, network and parameterisation
            assert (cfg.objective.method, cfg.objective.base, cfg.schedule, cfg.model) == (
                "cd", default.objective.name, default.schedule, default.model)
        if experiment == "ct_digits":  # iCT: the EDM process, trained for the teacher's and the distillation's steps
            assert (cfg.objective.method, cfg.schedule.name, cfg.objective.s0, cfg.objective.s1) == ("ct", "edm", 10, 1280)
            assert cfg.train.steps == default.train.steps + compose_config(
                ["experiment=consistency_digits", "train.teacher=x"]).train.steps
        if experiment == "ect_cifar10":
            assert (cfg.objective.method, cfg.schedule.name, cfg.model.name) == ("ect", "edm", "cifar")
    elif experiment.endswith("_digits"):  # the default run's data, network and training budget
        default = compose_config([])
        assert (cfg.data.name, cfg.model.name) == ("digits", default.model.name)
        assert OmegaConf.to_container(cfg.train) == OmegaConf.to_container(default.train)


@pytest.mark.parametrize("launcher,keys", [("joblib", ["n_jobs"]), ("submitit_slurm", ["partition", "timeout_min"])])
def test_launchers_compose(launcher, keys):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    for key in keys:
        assert key in cfg.hydra.launcher


@pytest.mark.parametrize("overrides,needle", [
    (["model=cifar", "model.dropout=2"], "model.dropout"), (["train.batch_size=0"], "train.batch_size"),
    (["train.lr=abc"], "train.lr"), (["sampler=ddim", "sampler.eta=1.5"], "sampler.eta"),
    (["train.precision=fp8"], "train.precision"),
    (["logger.mode=offlin"], "logger.mode='offlin' must be one of auto, online, offline, disabled"),
])
def test_validate_rejects_bad_values(overrides, needle):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as info:
        validate(cfg)
    assert "\n" not in str(info.value)


def test_validate_accepts_defaults():
    validate(compose_config())
    assert OmegaConf.select(compose_config(), "train.steps") > 0


def test_cifar_model_brings_cifar10_unless_data_is_given():
    """`python -m diffusion_lab.train model=cifar schedule=linear` trains on CIFAR-10 (the headline command)."""
    assert compose_config(["model=cifar", "schedule=linear"]).data.name == "cifar10"
    assert compose_config(["model=cifar", "data=digits"]).data.name == "digits"
    assert compose_config([]).data.name == "digits"


@pytest.mark.parametrize("overrides,config_name,needle", [
    (["checkpoint=x", "samplers=[ddim]"], "evaluate", "samplers[0]='ddim' must be a sampler setting like {name: ddim"),
    (["checkpoint=x", "samplers=[{name:heun,steps:-1}]"], "evaluate", "samplers[0].steps=-1 must be > 0"),
    (["checkpoint=x", "guidance_scales=[0,a]"], "evaluate", "guidance_scales[1]='a' must be float"),
    (["checkpoint=x", "labels=[3,-1]"], "sample", "labels[1]=-1 must be >= 0"),
    (["also=[heun,eulr]"], "sampler_lab", "also[1]='eulr': unknown sampler"),
    (["nfe=[5,0]"], "sampler_lab", "nfe[1]=0 must be > 0"),
    (["model.hidden_dims=[16,0]"], "config", "model.hidden_dims[1]=0 must be > 0"),
    (["train.betas=[0.9,x]"], "config", "train.betas[1]='x' must be float"),
])
def test_list_values_are_checked_entry_by_entry(overrides, config_name, needle):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides, config_name=config_name))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_choices_are_the_ones_the_code_reads():
    from diffusion_lab.config.validation import choice_rules
    from diffusion_lab.training.loggers import WANDB_MODES

    [(_, _, ok, expected)] = [r for r in choice_rules(compose_config()) if r[0] == "logger.mode"]
    assert all(ok(mode) for mode in WANDB_MODES) and not ok("offlin") and expected.endswith(", ".join(WANDB_MODES))


@pytest.mark.parametrize("override,close", [("train.stpes=5", "train.steps"), ("sampler.stpes=5", "sampler.steps"),
                                            ("trian.steps=5", "train.steps"), ("model.dropot=0.1", "model.dropout")])
def test_a_misspelt_key_is_answered_with_the_close_one_first(capsys, override, close):
    from diffusion_lab.config.preflight import check_overrides

    with pytest.raises(SystemExit) as info:
        check_overrides([override])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err == f"error: unknown key {override.split('=')[0]}; did you mean {close}?\n"
    assert "+" not in err, "never Hydra's advice to add the misspelt key"


def evaluated_steps(cfg):
    """The steps a run scores FID at: every eval.every steps and at the last step."""
    steps, every = cfg.train.steps, cfg.eval.every
    return [s for s in range(1, steps + 1) if s % every == 0 or s == steps]


def test_the_default_run_scores_fid_once_at_its_end_and_375_makes_it_a_curve():
    """The default run scores one FID, at its last step (the mid-run one paid for the default sampler's extra
    model evaluations: docs/comparisons.md#the-default-run); eval.every=375 adds the half-way point."""
    cfg = compose_config([])
    assert evaluated_steps(cfg) == [cfg.train.steps]
    assert evaluated_steps(compose_config(["eval.every=375"])) == [375, cfg.train.steps]
